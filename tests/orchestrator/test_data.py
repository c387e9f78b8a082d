"""Digits in ImageNet layout, the layout check, and the timm-transformed ImageFolder datasets."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.config import DataConfig
from orchestrator.data import build_datasets, check_image_folder, write_digits
from orchestrator.errors import DataError, UserError

CLASSES = [str(i) for i in range(10)]


def listing(root: Path) -> dict[str, list[str]]:
    return {split: sorted(str(p.relative_to(root / split)) for p in (root / split).rglob("*.png")) for split in ("train", "val")}


def test_digits_layout(digits_root):
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits_root / split).iterdir()) == CLASSES
    files = listing(digits_root)
    assert len(files["train"]) + len(files["val"]) == 1797
    assert len(files["val"]) == 360  # 20 %, rounded up by scikit-learn
    assert not set(files["train"]) & set(files["val"])  # each image in one split only (file names are the index)
    assert not any(p.name.startswith(".") for p in digits_root.parent.iterdir())  # no temporary folder left


def test_digits_images_are_32px_rgb(digits_root):
    path = next((digits_root / "val" / "3").glob("*.png"))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
        pixels = np.asarray(img)
    assert (pixels[..., 0] == pixels[..., 1]).all() and pixels.max() > 128 and pixels.min() < 64  # grey digit on dark


def test_split_is_stratified(digits_root):
    train = Counter(p.split("/")[0] for p in listing(digits_root)["train"])
    val = Counter(p.split("/")[0] for p in listing(digits_root)["val"])
    for c in CLASSES:
        assert abs(val[c] / (train[c] + val[c]) - 0.2) < 0.01, c


def test_split_is_deterministic_for_a_seed(tmp_path, digits_root):
    again = tmp_path / "again"
    counts = write_digits(again, img_size=8, seed=0)
    assert counts == {"train": 1437, "val": 360}
    assert listing(again) == listing(digits_root)  # same seed, same images in each split (any size)
    other = tmp_path / "other"
    write_digits(other, img_size=8, seed=1)
    assert listing(other)["val"] != listing(digits_root)["val"]


def test_rerun_keeps_an_existing_folder(tmp_path):
    root = tmp_path / "digits"
    write_digits(root, img_size=8)
    victim = next((root / "train" / "0").glob("*.png"))
    victim.unlink()
    marker = root / "train" / "0" / "notes.txt"
    marker.write_text("kept")
    counts = write_digits(root, img_size=8)
    assert counts == {"train": 1436, "val": 360}  # counted, not rewritten
    assert not victim.exists() and marker.read_text() == "kept"


def test_rerun_on_a_broken_folder_fails(tmp_path):
    (tmp_path / "digits" / "train").mkdir(parents=True)
    with pytest.raises(DataError):
        write_digits(tmp_path / "digits")


# ---- check_image_folder -------------------------------------------------------------------------


def make_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """``{"train": {"cat": 2}, ...}``: that many 4x4 PNGs per class folder (0 makes an empty one)."""
    for split, classes in layout.items():
        for name, n in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (4, 4), (i, i, i)).save(folder / f"{i}.png")
    return root


def test_check_counts_images_only(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "a" / "labels.txt").write_text("not an image")
    (root / "train" / "a" / "x.JPEG").write_bytes(b"")  # extensions are case-insensitive
    assert check_image_folder(root) == {"train": 6, "val": 2}


@pytest.mark.parametrize(
    "layout, words, where",
    [
        (None, "does not exist", "ds"),
        ({"train": {"a": 1}}, "has no val/ folder", "ds"),
        ({"val": {"a": 1}}, "has no train/ folder", "ds"),
        ({"train": {}, "val": {"a": 1}}, "has no class folders", "train"),
        ({"train": {"a": 1, "b": 0}, "val": {"a": 1, "b": 1}}, "has no images", "b"),
        ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}}, "different classes", "ds"),
    ],
)
def test_check_errors_name_the_path(tmp_path, layout, words, where):
    root = tmp_path / "ds"
    if layout is not None:
        root.mkdir()
        for split, classes in layout.items():
            (root / split).mkdir()
            make_folder(root, {split: classes})
    with pytest.raises(DataError) as e:
        check_image_folder(root)
    msg = str(e.value)
    assert words in msg and str(root) in msg and where in msg and "\n" not in msg
    assert isinstance(e.value, UserError)


def test_check_mismatched_classes_lists_them(tmp_path):
    root = make_folder(tmp_path / "ds", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}})
    with pytest.raises(DataError, match=r"\['b', 'c'\]"):
        check_image_folder(root)


@pytest.mark.parametrize("path", ["", None])
def test_check_empty_path_is_not_the_working_directory(tmp_path, monkeypatch, path):
    make_folder(tmp_path, {"train": {"a": 1}, "val": {"a": 1}})
    monkeypatch.chdir(tmp_path)  # a valid folder here must not be picked up for an unset data.path
    with pytest.raises(DataError, match="no data folder given"):
        check_image_folder(path)


def test_check_a_file_instead_of_a_folder(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError, match="data.zip"):
        check_image_folder(f)


# ---- datasets -----------------------------------------------------------------------------------


def test_build_datasets(digits_root):
    cfg = DataConfig(path=str(digits_root), color_jitter=None, loader_workers=0)
    train, val = build_datasets(cfg, 32)
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == val.classes == CLASSES and train.class_to_idx == val.class_to_idx
    x, y = train[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    v, vy = val[len(val) - 1]
    assert v.shape == (3, 32, 32) and vy == 9
    # normalized with the ImageNet mean/std: background pixels (0) map to -mean/std
    assert v.min().item() == pytest.approx(-0.485 / 0.229, abs=0.05)
    # val transform is deterministic, train transform is random (crop/flip)
    assert torch.equal(val[0][0], val[0][0])
    assert not all(torch.equal(train[0][0], train[0][0]) for _ in range(3))


def test_build_datasets_resizes_to_the_model(digits_root):
    _, val = build_datasets(DataConfig(path=str(digits_root)), 48)
    assert val[0][0].shape == (3, 48, 48)


def test_build_datasets_checks_the_folder(tmp_path):
    with pytest.raises(DataError, match="missing"):
        build_datasets(DataConfig(path=str(tmp_path / "missing")), 32)
