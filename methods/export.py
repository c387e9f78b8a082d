"""A method model as a deployment runs it: eval mode, the network inference really runs, logits out.

Method models return ``MethodOutput`` in both modes; serving stacks (MLflow's pytorch and pyfunc
flavors, TorchScript, ONNX) expect a module that maps ``[B, 3, H, W]`` images to ``[B, classes]``
logits. ``inference_module`` gives that module around ``SparsityMethod.inference_model`` (e.g.
S2ViTE's physically smaller export), so what is deployed is what was measured.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import MethodConfig, MethodOutput, SparsityMethod

__all__ = ["LogitsOnly", "inference_module"]


class LogitsOnly(nn.Module):
    """``model``'s logits ``[B, num_classes]`` for images ``[B, 3, H, W]`` (whatever ``model`` returns)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out.logits if isinstance(out, MethodOutput) else out


def inference_module(method: SparsityMethod, model: nn.Module, cfg: MethodConfig) -> LogitsOnly:
    """The deployable network of ``model`` (built by ``method`` with ``cfg``): eval mode, no gradients."""
    module = LogitsOnly(method.inference_model(model.eval(), cfg)).eval()
    module.requires_grad_(False)
    return module
