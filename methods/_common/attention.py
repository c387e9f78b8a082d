"""Attention pieces of a timm ``Block`` that token methods need to see or change.

timm's ``Attention`` hides the logits and keys behind SDPA. Methods that need them (DynamicViT/SPViT
policies, Evo-ViT's class attention, ToMe's key metric and size bias) call these functions on timm's
own modules instead of copying timm's attention code: the weights, ``q_norm``/``k_norm``, layer
scale and drop path are timm's, so a method with sparsity switched off computes exactly timm's block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block

if TYPE_CHECKING:
    from ..base import Geometry

__all__ = ["check_block", "fit_backbone", "qkv_heads", "merge_heads", "policy_attention", "block_forward", "sdpa"]

#: exp() of a logit gap above this would overflow fp32; only the policy's gradient for keys this far
#: above every visible one is affected (their forward weight is exactly zero either way).
_MAX_EXPONENT = 80.0


def check_block(blk: Block) -> None:
    """Refuse timm blocks these helpers do not reproduce exactly (rather than silently diverge)."""
    if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
        raise NotImplementedError(f"only timm's standard Block/Attention are supported, got {type(blk).__name__}")
    if getattr(blk.attn, "gate", None) is not None:
        raise NotImplementedError("gated attention is not supported")


def fit_backbone(vit, cfg) -> "Geometry":
    """A method model's first step: ``cfg.validate_for`` the backbone's geometry, every block checked
    with ``check_block``; returns the geometry."""
    from ..base import Geometry

    geometry = Geometry.of(vit)
    cfg.validate_for(geometry)
    for blk in vit.blocks:
        check_block(blk)
    return geometry


def qkv_heads(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, N, C]`` (already normed) -> q, k, v ``[B, H, N, D]``, after timm's q/k norms."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def merge_heads(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    """Per-head outputs ``[B, H, N, D]`` -> timm's post-attention norm and projection ``[B, N, C]``."""
    B, _, N, _ = out.shape
    x = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    return attn.proj_drop(attn.proj(attn.norm(x)))


def policy_attention(attn: Attention, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Attention in which each token sees only the kept keys (and itself): DynamicViT's Eq. 7, exact.

    ``A_ij = exp(a_ij) p'_ij / sum_k exp(a_ik) p'_ik`` with ``p'_ij = p_j`` off the diagonal and 1 on
    it. Unlike the reference's ``(e + eps/N) / (sum e + eps)`` (and an additive ``log(p + eps)``
    mask), a dropped key gets exactly zero weight at any logit range, so with hard decisions the
    kept tokens compute what they compute after really dropping the others; the gradient reaching
    ``p`` is that of the multiplicative form. The softmax runs in fp32 (as the reference's under AMP)
    and is shifted by the largest *visible* logit, so no visible row underflows to zero.

    Args:
        attn: a timm ``Attention``.
        x: normed tokens ``[B, N, C]``.
        policy: keep decisions ``[B, N]`` in [0, 1] (prefix/package tokens 1), differentiable.

    Returns:
        the attention branch's output ``[B, N, C]`` (after ``proj``).
    """
    q, k, v = qkv_heads(attn, x)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, H, N, N]
    n = policy.shape[1]
    eye = torch.eye(n, device=policy.device, dtype=torch.float32)
    p = policy.float()[:, None, None, :]
    p = p + (1.0 - p) * eye  # [B, 1, N, N]: a token always sees itself
    visible = p.detach() > 0
    shift = logits.detach().masked_fill(~visible, float("-inf")).amax(-1, keepdim=True)
    weights = torch.exp((logits - shift).clamp(max=_MAX_EXPONENT)) * p
    weights = weights / weights.sum(-1, keepdim=True)
    weights = attn.attn_drop(weights)
    return merge_heads(attn, (weights @ v.float()).to(v.dtype))


def block_forward(blk: Block, x: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """timm's ``Block.forward`` with ``attention(norm1(x))`` in place of ``blk.attn``."""
    x = x + blk.drop_path1(blk.ls1(attention(blk.norm1(x))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def sdpa(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over prepared heads (the kernel timm's dense attention runs), with an optional additive bias."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
