"""Evaluate and measure one model from a checkpoint on an image folder, without a sweep.

``prunetune eval`` uses it for published models (DynamicViT's or Evo-ViT's model zoo, a DeiT release
under ToMe) and for any trial's checkpoint: top-1/top-5 on ``DATA/val``, then latency, throughput
and GFLOPs beside the dense backbone, measured in this process on this device.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from methods import CheckpointError, create_backbone, get_method
from methods.checkpoint import load_method_checkpoint
from methods.dense import DenseViT

from . import loop, storage
from .config import ExperimentConfig
from .data import build_val_dataset
from .errors import UserError

__all__ = ["evaluate_checkpoint"]

_logger = logging.getLogger(__name__)


def evaluate_checkpoint(exp: ExperimentConfig, checkpoint: str, layout: str = "auto", device: str | None = None) -> dict:
    """Accuracy of ``exp``'s method model with the weights in ``checkpoint`` (a path or ``s3://``),
    and its speed beside the dense backbone. Returns the metrics, the layout found and the device."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method = get_method(exp.method)
    base = create_backbone(replace(exp.model, pretrained=None))
    dense = DenseViT(copy.deepcopy(base)).to(dev).eval()  # timing only: its weights do not matter
    cfg = method.resolve(exp.method_config, base, dev, loop.cache_dir(exp))
    model = method.build_model(cfg, base)
    try:
        found = load_method_checkpoint(method, cfg, model, storage.fetch(checkpoint), layout)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    model.to(dev).eval()
    img = base.patch_embed.img_size
    loader = DataLoader(build_val_dataset(exp.data, img[0]), batch_size=exp.train.batch_size, num_workers=exp.data.loader_workers)
    _logger.info("evaluating %s (%s layout) on %s, %d images", exp.method, found, exp.data.path, len(loader.dataset))
    metrics = loop.evaluate_model(model, loader, dev)
    measured = method.measure(model, dense, cfg, loader, (3, *img), dev, exp.measure)
    metrics.update(measured.metrics)
    metrics.update(method.stats(model))
    return {
        "method": exp.method, "backbone": exp.model.name, "checkpoint_layout": found, "device": str(dev),
        "metrics": metrics, "tables": measured.tables,
    }
