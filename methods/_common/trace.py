"""Token traces for visualisation: which input patches a stage's tokens carry (``SparsityMethod.token_trace``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..base import TokenStage


@contextmanager
def traced(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (unwrapped from DDP) in eval mode under ``no_grad``; its mode is restored afterwards."""
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            yield inner
    finally:
        inner.train(was_training)


def kept_stage(block: int, positions: torch.Tensor, num_patches: int, label: str = "") -> TokenStage:
    """A pruning stage: ``positions [B, K]`` are the original patch indices of the stage's patch
    tokens in sequence order; every other patch is out of the sequence (-1)."""
    b, k = positions.shape
    token = positions.new_full((b, num_patches), -1)
    token.scatter_(1, positions, torch.arange(k, device=positions.device).expand(b, k))
    return TokenStage(block, token, label or f"block {block}: {k} of {num_patches} patches kept")
