"""Datasets in ImageNet folder layout: scikit-learn's digits written out, and loaders with timm transforms.

The layout is ILSVRC2012's as the seed repos read it: ``ROOT/train/<class>/*.png|jpg|...`` and
``ROOT/val/<class>/...``, the same class folders in both.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from .config import DataConfig
from .errors import DataError

__all__ = [
    "write_digits", "check_image_folder", "build_datasets", "build_calibration_datasets", "build_val_dataset",
    "holdout_split", "IMAGE_EXTENSIONS",
]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")


def write_digits(out: str | Path, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write scikit-learn's 1,797 digits (8x8, 10 classes) as an ImageNet-layout folder of RGB PNGs.

    Images are scaled to ``img_size`` (bicubic) and split with a fixed seed, stratified by class.
    The folder is written next to ``out`` and renamed into place, so an interrupted run leaves
    nothing half-written. An existing valid folder is kept.

    Returns:
        image counts per split.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out)
    if out.exists():
        counts = check_image_folder(out)
        _logger.info("digits already at %s: %s", out, counts)
        return counts
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    idx_train, idx_val = train_test_split(
        np.arange(len(images)), test_size=val_fraction, random_state=seed, stratify=digits.target
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, indices in (("train", idx_train), ("val", idx_val)):
            for i in sorted(indices):
                folder = tmp / split / str(int(digits.target[i]))
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(images[i], mode="L").resize((img_size, img_size), Image.BICUBIC)
                img.convert("RGB").save(folder / f"{i:04d}.png")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"train": len(idx_train), "val": len(idx_val)}


def check_image_folder(root: str | Path) -> dict[str, int]:
    """Check ``root`` is an ImageNet-layout folder; returns image counts per split.

    Raises:
        DataError: missing folder or split, no class folders, an empty class, or train/val classes differ.
    """
    if not root:  # Path("") would be the working directory
        raise DataError("no data folder given (set data.path in the config)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist")
    counts, classes = {}, {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"data folder {str(root)!r} has no {split}/ folder (expected ImageNet layout: train/ and val/ with one folder per class)")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not names:
            raise DataError(f"data folder {str(folder)!r} has no class folders")
        total = 0
        for name in names:
            n = sum(1 for f in (folder / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if n == 0:
                raise DataError(f"class folder {str(folder / name)!r} has no images")
            total += n
        counts[split], classes[split] = total, names
    if classes["train"] != classes["val"]:
        diff = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise DataError(f"data folder {str(root)!r}: train/ and val/ have different classes, e.g. {diff[:3]}")
    return counts


def build_datasets(cfg: DataConfig, img_size: int) -> tuple[Dataset, Dataset]:
    """torchvision ``ImageFolder`` datasets for train and val with timm's transforms."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    check_image_folder(cfg.path)
    train_tf = create_transform(
        input_size=img_size, is_training=True, hflip=cfg.hflip, scale=cfg.scale, ratio=cfg.ratio,
        color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
        mean=cfg.mean, std=cfg.std,
    )
    val_tf = create_transform(
        input_size=img_size, is_training=False, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct,
        mean=cfg.mean, std=cfg.std,
    )
    root = Path(cfg.path)
    return ImageFolder(str(root / "train"), transform=train_tf), ImageFolder(str(root / "val"), transform=val_tf)


def holdout_split(train: Dataset, calibration: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``train`` without a held-out ``fraction`` of its images, and those images from ``calibration``
    (the same folder with eval transforms). The split depends on ``seed`` only, so every rank agrees."""
    n = len(train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, int(round(n * fraction)))
    held = sorted(order[:k])
    kept = sorted(order[k:])
    return Subset(train, kept), Subset(calibration, held)


def build_calibration_datasets(cfg: DataConfig, img_size: int, seed: int) -> tuple[Dataset, Dataset, Dataset]:
    """Train (minus the held-out share), the held-out share with eval transforms, and val."""
    from torchvision.datasets import ImageFolder

    train, val = build_datasets(cfg, img_size)
    clean = ImageFolder(str(Path(cfg.path) / "train"), transform=val.transform)
    train, calibration = holdout_split(train, clean, cfg.holdout, seed)
    return train, calibration, val


def build_val_dataset(cfg: DataConfig, img_size: int) -> Dataset:
    """The ``val/`` split alone (``ROOT/val/<class>/...``) with timm's eval transform: enough to evaluate a model."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    val = Path(cfg.path) / "val"
    if not val.is_dir() or not any(p.is_dir() for p in val.iterdir()):
        raise DataError(f"data folder {cfg.path!r} has no val/ folder with one folder per class")
    tf = create_transform(
        input_size=img_size, is_training=False, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct,
        mean=cfg.mean, std=cfg.std,
    )
    return ImageFolder(str(val), transform=tf)
