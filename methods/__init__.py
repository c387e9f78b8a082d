"""prunetune's sparsification methods on timm ViT/DeiT backbones, behind one interface.

Depends on torch, timm and fvcore only. Importing this package first makes torchvision (and so
timm) importable on a CPU-only torch (see ``_compat``), then registers every method.
"""
from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from . import dense, dynamicvit, evovit, tome, spvit, dvt, svite  # noqa: E402  (registers the methods)
from .backbone import BackboneConfig, CheckpointError, create_backbone, load_backbone_weights  # noqa: E402
from .base import (  # noqa: E402
    Geometry,
    LossOutput,
    Measurement,
    MethodConfig,
    MethodOutput,
    SparsityMethod,
    StepHooks,
    TokenStage,
    UnknownMethodError,
    get_method,
    list_methods,
    register_method,
)
from .measure import MeasureConfig, bench_models, bench_pair, count_gflops, measure_pair  # noqa: E402

__all__ = [
    "BackboneConfig", "CheckpointError", "create_backbone", "load_backbone_weights",
    "Geometry", "LossOutput", "Measurement", "MethodConfig", "MethodOutput", "SparsityMethod", "StepHooks", "TokenStage", "UnknownMethodError",
    "get_method", "list_methods", "register_method",
    "MeasureConfig", "bench_models", "bench_pair", "count_gflops", "measure_pair",
]
