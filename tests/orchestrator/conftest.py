"""Fixtures for the orchestrator tests: a digits folder written once (and smaller copies of it), the
tiny experiment on it, and one torch thread for modules that train."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from methods import BackboneConfig, MeasureConfig
from methods.dynamicvit import DynamicViTConfig
from orchestrator.config import DataConfig, ExperimentConfig, TrainConfig


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """scikit-learn's digits as an ImageNet-layout folder (train/ and val/, 32x32 RGB PNGs), written once."""
    from orchestrator.data import write_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    write_digits(root)
    return root


@pytest.fixture(scope="session")
def make_digits_subset(digits_root, tmp_path_factory) -> Callable[[int, int], Path]:
    """Factory: ``make_digits_subset(train_per_class, val_per_class)``, a folder with the first images
    of each class of ``digits_root`` (same layout)."""

    def make(train_per_class: int, val_per_class: int) -> Path:
        root = tmp_path_factory.mktemp("subset") / "digits"
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for folder in sorted((digits_root / split).iterdir()):
                (root / split / folder.name).mkdir(parents=True)
                for f in sorted(folder.glob("*.png"))[:n]:
                    shutil.copy(f, root / split / folder.name / f.name)
        return root

    return make


@pytest.fixture(scope="session")
def small_digits(make_digits_subset) -> Path:
    """The first 32 train / 12 val digits of each class (320 / 120 images): 5 optimizer steps an epoch at batch 64."""
    return make_digits_subset(32, 12)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module that trains: on 2 shared cores, two OpenMP threads made an
    epoch 2x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_experiment(data_path: str | Path, **changes) -> ExperimentConfig:
    """DynamicViT on the conftest tiny ViT (32 px, patch 4, 6 blocks, C=96), one quick epoch per stage."""
    exp = ExperimentConfig(
        name="tiny",
        method="dynamicvit",
        method_config=DynamicViTConfig(pruning_loc=(1, 3, 5)),
        model=BackboneConfig(
            name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=6, embed_dim=96, num_heads=3, num_classes=10,
        ),
        data=DataConfig(path=str(data_path), loader_workers=0, color_jitter=None),
        pretrain=TrainConfig(epochs=1, batch_size=64, lr=2e-3, warmup_epochs=0, amp=False),
        train=TrainConfig(epochs=1, batch_size=64, lr=1e-3, warmup_epochs=0, amp=False),
        measure=MeasureConfig(batch_size=8, warmup=1, iters=2, rounds=1),
    )
    return dataclasses.replace(exp, **changes)


@pytest.fixture(scope="session")
def make_tiny_experiment() -> Callable[..., ExperimentConfig]:
    """Factory: ``make_tiny_experiment(data_path, **field_changes)`` (DynamicViT, pruning_loc (1, 3, 5), 1 epoch)."""
    return _tiny_experiment
