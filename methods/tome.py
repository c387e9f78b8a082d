"""ToMe: training-free token merging by bipartite soft matching in every block.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, https://arxiv.org/abs/2210.09461.
Reference code: facebookresearch/ToMe at af95e4b (``tome/merge.py``, ``tome/patch/timm.py``,
``tome/utils.py``).

In every block, between the attention residual and the MLP, ``r`` tokens are merged away:

1. Metric: the keys (after timm's ``k_norm``) averaged over heads, cosine-normalised.
2. Bipartite split by position: A = even indices (CLS is A's first), B = odd indices.
3. Each a in A picks its most similar b in B; the prefix tokens (CLS, and DeiT's distillation token,
   which is B's first) can neither be merged nor be merged into.
4. The ``r`` A tokens with the best edges are merged into their b by a size-weighted average (one b
   may absorb several a); ``r`` is capped at ``floor((N - protected) / 2)``.
5. Output order: the unmerged A tokens in their original order, then B (the prefix tokens are put
   back in front, so CLS stays at index 0).

Token sizes ``s`` (how many input patches a token stands for) start at 1 and add up on merging.
Proportional attention (``prop_attn``) adds ``log s_j`` to every query's logit for key ``j``.
The sequence really shrinks, in training and in eval mode alike: the forward is the same in both,
and merging (an ``index_select`` and an ``index_add``) is differentiable, so the model can be fine-tuned.

Schedules (ToMe's ``parse_r``): a constant ``r``; ``(r, inflect)`` with ``inflect`` in [-1, 1]
(-1 is the paper's "decreasing schedule", 2r down to 0); or an explicit per-block list.

Differences from the reference:
    * Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (the kernel timm's
      dense ``Attention`` uses) with ``log s`` as an additive bias, instead of ToMe's explicit
      ``softmax(q k^T * scale + log s)``: the same function, and dense and ToMe models are timed on
      the same kernel. The first block, where every size is 1, gets no bias at all (as the reference).
      Under ``torch.compile`` a small biased attention (up to ``WRITTEN_OUT_MAX_SCORES`` scores) is
      written out as the reference does (``biased_attention``), which Inductor fuses (scale, bias
      add, softmax between two matmuls); a large one stays SDPA's, whose kernel never holds the whole
      score matrix. Measured on DeiT-S, 2 CPU cores, compiled, the two forms in one process
      (15 rounds each): at batch 1 (0.2M scores in the first merged block) written out was 1.015x
      SDPA's speed, at batch 32 (6.5M) 0.988x. The threshold between them (2^20 scores, 4 MiB in
      fp32) is not measured finer than that.
    * timm 1.0's ``q_norm``/``k_norm``, post-attention ``norm``, layer scale (``ls1``/``ls2``) and
      drop path are honoured (the reference's patched block ignores layer scale and the q/k norms),
      so a ToMe model with ``r = 0`` computes exactly timm's model.
    * A merged token is computed as ``x_b + sum_a s_a (x_a - x_b) / (s_b + sum_a s_a)`` instead of
      ``merge(x * s) / merge(s)``: the same size-weighted mean (the two differ by float rounding,
      <= 5e-7 on DeiT-S activations), with the unmerged tokens copied exactly. It takes one copy of
      the rows that stay plus arithmetic on the ``r`` merged rows, with ``index_select``/``index_add``
      over the batch's rows flattened, where the reference multiplies, gathers, scatters,
      concatenates and divides every token (``torch.gather``/``scatter_add`` with an index expanded
      over the channels walk it element by element on CPU): the merge of DeiT-S's first block at
      batch 32 takes 2.0 ms instead of 4.3 ms, about 3% of the forward over 12 blocks.
    * The per-forward state (token sizes, the remaining schedule) lives in local variables, not in
      a shared ``_tome_info`` dict that blocks pop from, so the model is re-entrant.
    * The metric is normalised as ``F.normalize`` does (norm clamped at 1e-12), so an all-zero key
      gives zero similarity instead of NaN. The unmerged A tokens are always put back in their original order
      (the reference sorts them only when there is a class token).
    * A per-layer list (``r_per_layer``) must have one entry per block; the reference pads a short
      list with zeros.
    * With ``global_pool='avg'`` the head averages the patch tokens weighted by their sizes (the
      reference's plain mean ignores them); prunetune's backbones pool the CLS token, as DeiT.
    * ``trace_source`` (the visualisation's source map) is not a model flag: ``ToMeMethod.token_trace``
      runs the same blocks carrying it; ``aux["sizes"]`` gives each final patch token's size.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn
from timm.models.vision_transformer import Block, VisionTransformer

from ._common import batch_rows, fit_backbone, merge_heads, qkv_heads, sdpa, vit_stem
from ._common.trace import traced
from .base import Geometry, MethodConfig, MethodOutput, SparsityMethod, TokenStage, register_method

__all__ = [
    "ToMeConfig",
    "ToMeViT",
    "ToMeMethod",
    "parse_r",
    "tome_attention",
    "biased_attention",
    "bipartite_merge",
    "tome_block_forward",
]


def parse_r(depth: int, r: int, inflect: float = 0.0) -> list[int]:
    """Tokens to merge in each of ``depth`` blocks for a constant ``r`` bent by ``inflect`` (ToMe's ``parse_r``).

    The schedule is linear from ``int(r * (1 - inflect))`` to ``2 * r - int(r * (1 - inflect))``,
    each entry truncated to an int: ``inflect = 0`` is constant, ``-1`` decreases from ``2r`` to 0,
    ``+1`` increases from 0 to ``2r``.
    """
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    step = (last - first) / (depth - 1) if depth > 1 else 0.0
    return [int(first + step * i) for i in range(depth)]


def _is_count(value) -> bool:
    """An integer >= 0 (an int, or a float with an integer value; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return float(value).is_integer() and value >= 0


@dataclass(frozen=True)
class ToMeConfig(MethodConfig):
    """ToMe's knobs, with the paper's DeiT-S setting (r = 13, constant, proportional attention).

    Attributes:
        r: tokens merged per block (before the cap ``floor((N - protected) / 2)``).
        inflect: bends the schedule as ToMe's ``parse_r``: 0 constant, -1 decreasing, +1 increasing
            (any value in [-1, 1]).
        r_per_layer: an explicit schedule, one entry per block; when given it overrides ``r`` and
            ``inflect``.
        prop_attn: proportional attention (``log`` of the key's size added to its logits).
    """

    r: int = 13
    inflect: float = 0.0
    r_per_layer: tuple[int, ...] = ()
    prop_attn: bool = True

    def __post_init__(self) -> None:
        if not _is_count(self.r):
            raise ValueError(f"r must be an integer >= 0, got {self.r!r}")
        object.__setattr__(self, "r", int(self.r))
        if not (isinstance(self.inflect, numbers.Real) and not isinstance(self.inflect, bool)
                and math.isfinite(self.inflect) and -1.0 <= self.inflect <= 1.0):
            raise ValueError(f"inflect must be in [-1, 1], got {self.inflect!r}")
        object.__setattr__(self, "inflect", float(self.inflect))
        per_layer = tuple(self.r_per_layer)
        if not all(_is_count(v) for v in per_layer):
            raise ValueError(f"r_per_layer entries must be integers >= 0, got {list(per_layer)}")
        object.__setattr__(self, "r_per_layer", tuple(int(v) for v in per_layer))
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be true or false, got {self.prop_attn!r}")

    def validate_for(self, geometry: Geometry) -> None:
        if self.r_per_layer and len(self.r_per_layer) != geometry.depth:
            raise ValueError(
                f"r_per_layer {list(self.r_per_layer)} has {len(self.r_per_layer)} entries, "
                f"the backbone has {geometry.depth} blocks"
            )

    def schedule(self, depth: int) -> tuple[int, ...]:
        """Requested merges per block (before the per-block cap): ``r_per_layer``, or ``parse_r(depth, r, inflect)``."""
        if self.r_per_layer:
            if len(self.r_per_layer) != depth:
                raise ValueError(f"r_per_layer has {len(self.r_per_layer)} entries, the backbone has {depth} blocks")
            return self.r_per_layer
        return tuple(parse_r(depth, self.r, self.inflect))

    def tokens_per_block(self, num_tokens: int, depth: int, protected: int = 1) -> list[int]:
        """Sequence length entering each block, and after the last: ``depth + 1`` numbers.

        ``N_0 = num_tokens`` (patches plus prefix tokens) and
        ``N_l = N_{l-1} - min(r_l, floor((N_{l-1} - protected) / 2))``, ``protected`` being the
        prefix tokens that are never merged (1 for CLS, 2 for DeiT's CLS + distillation token).
        For DeiT-S at r = 13: 197, 184, ..., 54, and 41 after the last block.
        """
        counts = [int(num_tokens)]
        for r in self.schedule(depth):
            n = counts[-1]
            counts.append(n - max(0, min(r, (n - protected) // 2)))
        return counts

    def tokens_for(self, geometry: Geometry) -> list[int]:
        """``tokens_per_block`` for a backbone's geometry (all prefix tokens protected)."""
        return self.tokens_per_block(
            geometry.num_patches + geometry.num_prefix_tokens, geometry.depth, geometry.num_prefix_tokens
        )


# ---------------------------------------------------------------------------------------- the pieces

_NORM_EPS = 1e-12  # F.normalize's: an all-zero key has zero similarity, not NaN
#: Under torch.compile, the biased attention is written out (``biased_attention``) up to this many
#: attention scores per call (B * heads * N * N; 4 MiB in fp32), else it stays SDPA's: see the module's notes.
WRITTEN_OUT_MAX_SCORES = 2**20


def tome_attention(
    attn: nn.Module, x: torch.Tensor, sizes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's attention with proportional attention, and ToMe's metric.

    Args:
        attn: a timm ``Attention``.
        x: normed tokens ``[B, N, C]``.
        sizes: token sizes ``[B, N, 1]``, or None for no size bias.

    Returns:
        the attention branch's output ``[B, N, C]`` (after ``proj``) and the metric ``[B, N, D]``
        (the keys averaged over heads).
    """
    q, k, v = qkv_heads(attn, x)
    if sizes is None:
        return merge_heads(attn, sdpa(attn, q, k, v)), k.mean(1)
    bias = sizes.log().transpose(1, 2).unsqueeze(1)  # [B, 1, 1, N], over keys
    if bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if torch.compiler.is_compiling() and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= WRITTEN_OUT_MAX_SCORES:
        out = biased_attention(attn, q, k, v, bias)  # Inductor fuses it: see the module's notes
    else:
        out = sdpa(attn, q, k, v, bias=bias)
    return merge_heads(attn, out), k.mean(1)


def biased_attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` written out (ToMe's own form, and timm's unfused path), over
    prepared heads ``[B, H, N, D]``; ``bias`` broadcasts to ``[B, H, N, N]``."""
    weights = (q * attn.scale) @ k.transpose(-2, -1) + bias
    return attn.attn_drop(weights.softmax(dim=-1)) @ v


def bipartite_merge(
    x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, protected: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of ``x`` by bipartite soft matching on ``metric``, size-weighted.

    Args:
        x: tokens ``[B, N, C]``.
        sizes: their sizes ``[B, N, 1]``, float32 (as ``_tome_block`` makes them).
        metric: similarity features ``[B, N, D]`` (no gradient flows through the matching).
        r: tokens to merge away; capped at ``floor((N - protected) / 2)``.
        protected: leading tokens (CLS, distillation) that are never merged nor merged into.

    Returns:
        ``x`` and ``sizes`` with ``N - r`` tokens: the prefix tokens, the unmerged even-position
        tokens in their original order, then the odd-position ones (each the size-weighted mean of
        itself and whatever merged into it).
    """
    b, n, c = x.shape
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return x, sizes
    pa, pb = (protected + 1) // 2, protected // 2  # prefix tokens on the A (even) and B (odd) side
    na = (n + 1) // 2
    with torch.no_grad():  # written for few operators: at batch 1 ToMe's time is mostly their dispatch
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)  # F.normalize, one operator less
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # [B, Na, Nb] cosine similarities
        if pa:
            scores[:, :pa] = -math.inf
        if pb:
            scores[:, :, :pb] = -math.inf
        best, best_b = scores.max(dim=-1)  # each a's most similar b
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]  # the r best edges: these a are merged
        keep = order[:, r:].sort(dim=-1).values  # the rest stay, in their original order
        dst = best_b.gather(1, src)
        # Rows of x that make the output: the prefix in its original order, the unmerged A tokens,
        # then B; and the output row each merged token joins (B's j-th is row na - r + j).
        odd = torch.arange(2 * pb + 1, n, 2, device=x.device).expand(b, -1)
        if pb:
            prefix = torch.arange(protected, device=x.device).expand(b, -1)
            take = torch.cat([prefix, 2 * keep[:, pa:], odd], dim=1)
        else:  # the prefix is A's first pa tokens, which never merge: keep starts with them
            take = torch.cat([2 * keep, odd], dim=1)
        take, src, into = batch_rows(take, n), batch_rows(2 * src, n), batch_rows(dst + (na - r), n - r)
    # The size-weighted mean of b and the a merged into it, written as b + sum_a s_a (a - b) / (s_b + sum s_a):
    # one copy of the rows that stay (unmerged tokens are carried exactly) and arithmetic on r rows.
    rows = x.reshape(b * n, c)
    s = sizes.reshape(b * n)
    s_src = s.index_select(0, src)
    total = s.index_select(0, take).index_add_(0, into, s_src)
    out = rows.index_select(0, take)
    weight = (s_src / total.index_select(0, into)).unsqueeze(-1)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    out.index_add_(0, into, (rows.index_select(0, src) - out.index_select(0, into)) * weight)
    return out.view(b, n - r, c), total.view(b, n - r, 1)


def tome_block_forward(
    blk: Block, x: torch.Tensor, sizes: torch.Tensor | None, r: int, protected: int = 1, prop_attn: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm ``Block`` with ToMe between the attention residual and the MLP.

    ``sizes`` None means every token has size 1 (no merge has happened yet): no attention bias.
    Returns the block's output tokens and their sizes (None while nothing was merged).
    """
    x, sizes, _ = _tome_block(blk, x, sizes, r, protected, prop_attn)
    return x, sizes


def _tome_block(
    blk: Block, x: torch.Tensor, sizes: torch.Tensor | None, r: int, protected: int = 1, prop_attn: bool = True,
    source: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``tome_block_forward``, also merging ``source`` ``[B, N, M]`` (which of M input tokens each token
    holds; ToMe's ``trace_source``) by the same matching, when given."""
    out, metric = tome_attention(blk.attn, blk.norm1(x), sizes if prop_attn else None)
    x = x + blk.drop_path1(blk.ls1(out))
    if min(r, (x.shape[1] - protected) // 2) > 0:
        if sizes is None:
            sizes = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        if source is not None:  # the matching depends on ``metric`` only: the same merge as ``x``'s
            source = (bipartite_merge(source, sizes, metric, r, protected)[0] > 0).to(source.dtype)
        x, sizes = bipartite_merge(x, sizes, metric, r, protected)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, sizes, source


# ---------------------------------------------------------------------------------------- the model


class ToMeViT(nn.Module):
    """A timm ViT that merges tokens in every block (the same forward in training and eval mode).

    ``forward`` returns ``MethodOutput(logits, aux={"tokens": final normed patch tokens [B, N, C],
    "sizes": their sizes [B, N, 1]})``; the sizes of the patch tokens add up to the number of patches.
    """

    def __init__(self, vit: VisionTransformer, cfg: ToMeConfig) -> None:
        super().__init__()
        geometry = fit_backbone(vit, cfg)
        self.vit = vit
        self.cfg = cfg
        self.protected = geometry.num_prefix_tokens
        self.schedule = cfg.schedule(geometry.depth)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        vit = self.vit
        x = vit_stem(vit, images)
        sizes = None
        for blk, r in zip(vit.blocks, self.schedule):
            x, sizes = tome_block_forward(blk, x, sizes, r, self.protected, self.cfg.prop_attn)
        if sizes is None:
            sizes = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        x = vit.norm(x)
        npre = vit.num_prefix_tokens
        if getattr(vit, "global_pool", "token") == "avg" and getattr(vit, "attn_pool", None) is None:
            pooled = x if getattr(vit, "pool_include_prefix", False) else x[:, npre:]
            weights = sizes if getattr(vit, "pool_include_prefix", False) else sizes[:, npre:]
            pooled = (pooled * weights.to(x.dtype)).sum(1) / weights.sum(1).to(x.dtype)
            logits = vit.head(vit.head_drop(vit.fc_norm(pooled)))
        else:
            logits = vit.forward_head(x)
        return MethodOutput(logits, {"tokens": x[:, npre:], "sizes": sizes[:, npre:]})


@register_method("tome")
class ToMeMethod(SparsityMethod[ToMeConfig]):
    """Training-free by default (``train.epochs: 0``); fine-tuning uses the plain task loss."""

    config_cls = ToMeConfig
    needs_teacher = False
    needs_pretrained = True

    def build_model(self, cfg: ToMeConfig, base: nn.Module) -> nn.Module:
        return ToMeViT(base, cfg)

    def token_trace(self, model: nn.Module, images: torch.Tensor) -> list[TokenStage]:
        """After each block that merges: the token (group) every input patch has been merged into
        (ToMe's source map, traced through the same blocks as the forward)."""
        stages = []
        with traced(model) as m:
            vit, npre = m.vit, m.vit.num_prefix_tokens
            x = vit_stem(vit, images)
            source = torch.eye(x.shape[1], device=x.device).expand(x.shape[0], -1, -1)
            sizes = None
            for i, (blk, r) in enumerate(zip(vit.blocks, m.schedule)):
                n = x.shape[1]
                x, sizes, source = _tome_block(blk, x, sizes, r, m.protected, m.cfg.prop_attn, source)
                if x.shape[1] < n:
                    token = source[:, npre:, npre:].argmax(dim=1)  # [B, patches]: the token holding each patch
                    label = f"block {i}: {x.shape[1] - npre} tokens for {token.shape[1]} patches"
                    stages.append(TokenStage(i, token, label))  # merged between block i's attention and MLP
        return stages

    def convert_reference_state(self, state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
        """A timm/DeiT release (e.g. ``deit_small_patch16_224``'s ``{"model": ...}``) is this model's
        published layout: the backbone's keys under ``vit.``."""
        return {"vit." + k: v for k, v in state.items()}
