"""The dense baseline as a method: the unmodified timm ViT, trained with the task loss only.

It is the reference every sparse trial is measured against, and the model prunetune trains first
when a sweep has no pretrained weights (the teacher and starting point of DynamicViT-style methods).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ._common import vit_head, vit_stem
from .base import MethodConfig, MethodOutput, SparsityMethod, register_method

__all__ = ["DenseConfig", "DenseViT", "DenseMethod"]


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """No knobs: the dense model."""


class DenseViT(nn.Module):
    """A timm ViT whose forward returns ``MethodOutput(logits, aux={"tokens": normed patch tokens})``."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> MethodOutput:
        x = self.vit.blocks(vit_stem(self.vit, x))
        logits, tokens = vit_head(self.vit, x)
        return MethodOutput(logits, {"tokens": tokens})


@register_method("dense")
class DenseMethod(SparsityMethod[DenseConfig]):
    """Trains the backbone as configured (from ``model.pretrained`` when given, else from its init)."""

    config_cls = DenseConfig
    needs_pretrained = False

    def build_model(self, cfg: DenseConfig, base: nn.Module) -> nn.Module:
        return DenseViT(base)

    def convert_reference_state(self, state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
        """A timm/DeiT release (e.g. ``deit_small_patch16_224``'s ``{"model": ...}``) is this model's
        published layout: the backbone's keys under ``vit.``."""
        return {"vit." + k: v for k, v in state.items()}
