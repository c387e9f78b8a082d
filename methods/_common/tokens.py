"""Token selection helpers: real gathering for inference, attention masks for training."""
from __future__ import annotations

import torch

_POLICY_EPS = 1e-6


def gather_tokens(x: torch.Tensor, index: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Select tokens per sample: ``x [B, N, C]``, ``index [B, K]`` -> ``x[b, start + index[b]]``, ``[B, K, C]``.

    DynamicViT's ``batch_index_select``: one ``index_select`` over the batch's rows flattened. On CPU
    that copies whole rows and is 5-7x faster than ``torch.gather`` with an index expanded over the
    channels (DeiT-S, batch 32, 92 of 197 tokens: 0.2 ms against 1.3 ms), which walks the index
    element by element. ``start`` selects from ``x[:, start:]`` without copying that slice first.
    """
    b, n, c = x.shape
    rows = batch_rows(index + start if start else index, n)
    return x.reshape(b * n, c).index_select(0, rows).view(b, index.shape[1], c)


def batch_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample token indices ``[B, K]`` into sequences of ``n`` -> row numbers ``[B * K]`` of the
    batch's tokens flattened to ``[B * n, ...]`` (for ``index_select``/``index_add`` over them).

    Few operators, since token methods call it in every pruning stage and at batch 1 their time is
    mostly operator dispatch: no offsets at batch 1, one strided ``arange`` otherwise."""
    b = index.shape[0]
    if b == 1:
        return index.flatten()
    return (index + torch.arange(0, b * n, n, device=index.device).unsqueeze(1)).flatten()


def prefixed(index: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Patch indices ``[B, K]`` -> sequence positions ``[B, num_prefix + K]``: the prefix tokens, then the
    patches (shifted past the prefix), so one ``gather_tokens`` builds the whole new sequence."""
    head = torch.arange(num_prefix, device=index.device, dtype=index.dtype).expand(index.shape[0], -1)
    return torch.cat([head, index + num_prefix], dim=1)


def policy_attn_mask(policy: torch.Tensor, eps: float = _POLICY_EPS) -> torch.Tensor:
    """Additive attention mask that hides dropped keys, as DynamicViT's ``softmax_with_policy``.

    ``softmax(a + log(p' + eps))`` with ``p'_ij = p_j`` off the diagonal and 1 on it equals
    ``e_ij (p'_ij + eps) / sum_j e_ij (p'_ij + eps)``: dropped keys get ~eps weight, every token still
    sees itself (no empty rows), and the gradient reaches the straight-through policy exactly as
    through the paper's multiplicative form (checked in tests/methods/test_dynamicvit.py). Passing it
    as ``attn_mask`` lets timm's own ``Block``/``Attention`` run unmodified.

    Args:
        policy: keep decisions ``[B, N]`` in [0, 1], prefix tokens included (always 1).

    Returns:
        float mask ``[B, 1, N, N]`` to add to the attention logits.
    """
    n = policy.shape[1]
    p = policy.float()[:, None, None, :]  # [B, 1, 1, N], over keys
    eye = torch.eye(n, device=policy.device, dtype=p.dtype)
    p = p + (1.0 - p) * eye
    return torch.log(p + eps)
