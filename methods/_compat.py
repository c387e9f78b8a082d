"""One guarded fix so that timm imports on a CPU-only torch with a PyPI torchvision.

torchvision 0.28.0 from PyPI ships C++ ops built for CUDA torch. On the CPU build of torch 2.13.0
its ``_C`` extension fails to load, and ``torchvision/_meta_registrations.py`` then registers fake
kernels for ``torchvision::nms`` and ``torchvision::qnms``, operators that were never defined, so
``import torchvision`` (and therefore ``import timm``) raises. Defining the two schemas first makes
the import succeed; nms itself then stays unavailable, which no ViT code path uses.

:func:`ensure_torchvision_importable` does that, and only when the extension cannot load: a CUDA
install, or any torchvision whose ops load, is left untouched. ``methods/__init__.py`` calls it
before anything imports timm, so every process that imports ``methods`` (Ray workers included,
since they unpickle functions from ``orchestrator``, which imports ``methods``) is covered.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

_logger = logging.getLogger(__name__)
_library: torch.library.Library | None = None  # kept alive: a collected Library drops its defs
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _torchvision_ops_load() -> bool:
    """Whether torchvision's compiled ops load into this torch (True if there is nothing to do)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to patch
    libs = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, RuntimeError):
        return False
    return True


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Define the ``torchvision::nms``/``qnms`` schemas if, and only if, torchvision's ops cannot load."""
    global _library
    if _library is not None or _torchvision_ops_load():
        return
    missing = [s for s in _SCHEMAS if not _op_exists(s.split("(")[0])]
    if not missing:
        return
    _library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - schema-only library
    for schema in missing:
        _library.define(schema)
    _logger.debug("torchvision C++ ops unavailable; defined placeholder schemas for %s", missing)
