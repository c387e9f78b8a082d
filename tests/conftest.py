"""Shared pytest fixtures.

``methods`` is imported first: on the CPU-only torch used in development it makes torchvision, and
so timm, importable (see ``methods/_compat.py``).
"""
from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from typing import Callable

import pytest
import torch

import methods  # noqa: F401  (must precede any timm import)
from methods import BackboneConfig, create_backbone

# 32 px images in 4 px patches: 64 patches + CLS, 6 blocks, 10 classes; milliseconds per forward on CPU.
TINY_VIT = BackboneConfig(
    name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=6, embed_dim=96, num_heads=3, num_classes=10,
)


@pytest.fixture
def make_tiny_vit() -> Callable[..., torch.nn.Module]:
    """Factory: ``make_tiny_vit(seed=0, **overrides)`` builds a fresh tiny timm ViT with seeded random weights."""

    def make(seed: int = 0, **overrides) -> torch.nn.Module:
        cfg = dataclasses.replace(TINY_VIT, **overrides)
        torch.manual_seed(seed)
        return create_backbone(cfg)

    return make


@pytest.fixture
def tiny_vit(make_tiny_vit) -> torch.nn.Module:
    """A fresh tiny timm ``VisionTransformer`` (seed 0): 32 px, patch 4, depth 6, C=96, 3 heads, 10 classes."""
    return make_tiny_vit(0)


@pytest.fixture
def rng() -> torch.Generator:
    """A CPU generator seeded with 0, for synthetic inputs independent of the global RNG."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def mlflow_tmp(tmp_path) -> str:
    """A fresh MLflow tracking URI: a sqlite file under ``tmp_path`` (MLflow 3.13+ refuses the old file store)."""
    return f"sqlite:///{tmp_path}/mlflow.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def port_factory() -> Callable[[], int]:
    """``port_factory()`` gives a free loopback TCP port, for services the tests start."""
    return free_port


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint: ``moto.server`` in a subprocess on a free loopback port; yields its URL."""
    import requests

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit code {proc.poll()})") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
