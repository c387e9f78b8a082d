"""Fixtures for the orchestrator tests: a digits folder written once, and the tiny experiment on it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import pytest

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
