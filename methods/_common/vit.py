"""The parts of timm's ``VisionTransformer.forward_features``/``forward_head`` that methods reuse."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer


def vit_stem(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` -> tokens ``[B, 1 + N, C]`` before the first block (as timm does it)."""
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def vit_head(vit: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens after the last block -> (logits ``[B, K]``, normed patch tokens ``[B, N, C]``)."""
    x = vit.norm(x)
    return vit.forward_head(x), x[:, vit.num_prefix_tokens:]
