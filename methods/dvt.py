"""DVT: a cascade of ViTs on coarse-to-fine token grids that exits as soon as it is confident.

Wang et al., "Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image
Recognition", NeurIPS 2021, https://arxiv.org/abs/2105.15075. Reference code:
blackfeather-wang/Dynamic-Vision-Transformer at 22cc895 (``models_deit.py``, the vendored
``timm/models/vision_transformer.py``, ``main.py``, ``inference.py``).

The model is ``K`` complete ViTs (``exits``), each the backbone's architecture on a coarser token
grid (DeiT-S at 224 px: 7x7, 10x10, 14x14; by default ``round(g/2), round(5g/7), g`` of the
backbone's grid ``g``). Exit ``k`` reuses exit ``k-1``:

* feature reuse: the upstream exit's last-block output (before its final norm) goes, in every
  downstream block, through its own ``LN -> Linear(C, 128) -> GELU -> Linear(128, 48)``, is
  resized from the upstream grid to this one (nearest upsampling by an integer factor, then adaptive
  average pooling), gets zeros at the prefix (CLS) tokens and is concatenated to the post-attention
  hidden state, so ``norm2`` and the MLP's ``fc1`` take ``C + 48`` channels (the MLP still outputs C);
* relation reuse: the pre-softmax attention logits of all ``L`` upstream blocks (``L*H`` channels,
  each already carrying the upstream exit's own reuse) go through a 1x1-conv MLP
  ``LH -> 3LH -> LH`` (GELU), are resized the same way on the key and then the query axis (prefix
  rows and columns kept apart), split into ``L`` groups of ``H`` and added to the matching
  downstream blocks' logits.

Training runs every exit on every image; the loss is the sum of the task losses of all exits,
equal weights (``main.py``). Inference (eval mode) really exits early: exit 1 runs on the batch,
samples whose max softmax is ``>= T_1`` leave, the rest (and their reuse tensors, gathered on the
batch axis) go on to exit 2, and so on; ``T_K = -inf``. The logits come back in the batch's order
with ``aux["exit"]`` (0-based exit index per sample). The only host syncs are the sizes of the
remaining batches.

Thresholds (``thresholds`` buffer, saved with the model) are fitted by ``DVTMethod.calibrate`` on
held-out training images, as ``inference.py``'s ``dynamic_find_threshold``: for ``q = p/20``,
``p = 1..59``, the target exit shares are ``q^k / sum_j q^j``; exit ``k`` takes the most confident
not-yet-exited samples until its share is reached. The chosen ``q`` is the one with the best
calibration accuracy whose expected cost ``sum_k share_k * GFLOPs(exits 1..k)`` fits the budget
(``budget`` x the dense backbone's GFLOPs). ``threshold_policy="fixed"`` keeps ``thresholds`` from
the config instead. Every ``q``'s thresholds are kept (``threshold_table``, as the reference's
``dynamic_threshold``) for ``measure``'s accuracy-against-budget table.

Differences from the reference:
    * prunetune starts from a trained dense backbone; the reference trains all exits from scratch
      (300 epochs). Every exit is a copy of the backbone: the last one exactly, the coarser ones with
      their patch-embedding kernel resampled (timm's ``resample_patch_embed``, FlexiViT's
      pseudo-inverse resize) to the strided kernel and the position embedding resampled (bicubic)
      to their grid. With feature reuse the widened ``norm2``/``fc1`` keep the dense weights on the
      first C channels (the extra LN channels start at weight 1, bias 0, the extra ``fc1`` columns
      trunc-normal(0.02) as the reference initialises Linear layers). The reuse MLPs' Linear layers
      and the relation 1x1 convs start trunc-normal(0.02), bias 0 (the reference leaves the convs at
      PyTorch's default init, whose output would swamp the pretrained logits).
    * Coarse exits embed with a strided convolution on the full image (as the reference): kernel =
      stride ``s = ceil(img / g)``, padding ``ceil((s*g - img) / 2)``; for 224 px that is the
      reference's 32/0 (7x7) and 23/3 (10x10). The reference hard-codes these (and tests for 100
      tokens); grids here are configurable and checked against the backbone.
    * The resize factor is generalised: nearest by ``max(2, ceil(g_down / g_up))``, then adaptive
      average pooling; for 7 -> 10 -> 14 this is the reference's 14x14 and 20x20 intermediates.
    * All prefix tokens (CLS, and DeiT's distillation token) are treated as the reference treats
      CLS: zero reused feature, relation rows and columns not resized. The feature MLP runs on the
      patch tokens only (the reference also runs it on CLS and then drops the result).
    * The last exit's last block has no feature-reuse MLP (the reference has one, but it only feeds
      patch tokens that the CLS head never reads: its output cannot change the logits and its
      gradient is always zero); that block still takes ``C + 48`` channels, zeros in the extra 48,
      which is exactly what the reference gives the CLS token there.
    * Attention logits are ``(q * scale) k^T`` with the bias added, softmax in fp32. An exit whose
      logits no later exit reads (the last one, or every exit without relation reuse) runs SDPA
      with the reuse bias as an additive mask: the same function on the kernel timm's dense model
      uses. With both reuse paths off every exit is timm's own forward.
    * Threshold search: the target count of exit ``k`` is ``floor(n * sum_{j<=k} share_j)`` minus the
      samples that already left (the reference floors each share separately and keeps ``T = 1e8``
      when the count is never reached), so every realised share, the last one included, is within
      ``1/n`` of its target unless confidences tie at a threshold. ``T_K = -inf`` (reference: -1e8).
      The reference only reports the accuracy/FLOPs curve; choosing the point for a budget is ours.
    * Early exit is real and batched; the reference's ``inference.py`` runs all exits on all samples
      and simulates the exits offline.
    * Calibration uses clean held-out training images (the reference: 50k training images with
      training augmentation).
    * ``convert_reference_state`` maps the DeiT cascade (``DVT_Deit_small``: ``less_less_token``,
      ``less_token``, ``normal_token``); the T2T-ViT cascades are not supported. The checkpoint's
      ``flops`` and ``dynamic_threshold`` are not tensors of the state dict (prunetune's reader keeps
      ``model_state_dict`` only), so thresholds are left uncalibrated (``+inf``: every sample runs the
      whole cascade) until ``calibrate`` fits them on this data.
    * Mixup/cutmix, EMA and AMP belong to the training loop.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp, resample_abs_pos_embed, resample_patch_embed, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from ._common import fit_backbone, merge_heads, qkv_heads, sdpa, vit_head, vit_stem
from .base import Geometry, LossOutput, Measurement, MethodConfig, MethodOutput, SparsityMethod, TaskLoss, register_method

__all__ = [
    "DVTConfig",
    "DVT",
    "DVTMethod",
    "Q_GRID",
    "default_grids",
    "strided_embedding",
    "resize_grid",
    "geometric_shares",
    "find_thresholds",
    "route",
    "dvt_block_forward",
]

#: The reference's threshold sweep: q = p / 20 for p = 1..59 (``inference.py``).
Q_GRID: tuple[float, ...] = tuple(p / 20 for p in range(1, 60))
_PUBLISHED_THRESHOLDS = "__dynamic_threshold__"  # a released checkpoint's table, on its way to the buffer
_POLICIES = ("geometric", "fixed")
#: The reference checkpoint's sub-model names, exit by exit (``DVT_Deit_small_model``).
_REFERENCE_EXITS = ("less_less_token", "less_token", "normal_token")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_grids(grid: int) -> tuple[int, int, int]:
    """The reference's 7/10/14 scaled to a backbone grid ``g``: ``(round(g/2), round(5g/7), g)``."""
    return (_round_half_up(grid / 2), _round_half_up(grid * 5 / 7), grid)


def strided_embedding(img: int, grid: int) -> tuple[int, int]:
    """Kernel (= stride) and padding of a patch embedding giving ``grid`` tokens per side on ``img`` px.

    ``s = ceil(img / grid)``, ``pad = ceil((s * grid - img) / 2)``: 224 px -> 7: (32, 0), 10: (23, 3).
    """
    s = -(-img // grid)
    pad = -(-(s * grid - img) // 2)
    if (img + 2 * pad - s) // s + 1 != grid or pad >= s:
        raise ValueError(f"no strided patch embedding gives a {grid}x{grid} grid on {img} px")
    return s, pad


#: ``_resize_weights``'s matrices by ``(g_in, g_out, device, dtype)``: built and moved once, not on
#: every call (on a GPU each move would be a host-to-device copy per block). A plain dict:
#: torch.compile warns on lru_cache.
_RESIZE_WEIGHTS: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}


def _resize_weights(g_in: int, g_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One axis of ``resize_grid`` as a ``[g_out, g_in]`` matrix, built in float64 with torch's own
    1-D nearest upsampling and adaptive average pooling applied to each source cell alone."""
    key = (g_in, g_out, device, dtype)
    if key not in _RESIZE_WEIGHTS:
        m = g_in * max(2, -(-g_out // g_in))
        cells = torch.eye(g_in, dtype=torch.float64).reshape(g_in, 1, g_in)
        w = F.adaptive_avg_pool1d(F.interpolate(cells, size=m, mode="nearest"), g_out)
        _RESIZE_WEIGHTS[key] = w.reshape(g_in, g_out).T.contiguous().to(device=device, dtype=dtype)
    return _RESIZE_WEIGHTS[key]


def resize_grid(t: torch.Tensor, g_in: int, g_out: int) -> torch.Tensor:
    """Resize the last axis, a ``g_in x g_in`` grid flattened row-major, to ``g_out x g_out``.

    Nearest upsampling by ``max(2, ceil(g_out / g_in))``, then adaptive average pooling (the
    reference: 7 -> 14 -> 10, 10 -> 20 -> 14). Both are linear and separable, so this applies them
    as one small matrix per axis: the same figures up to float rounding, about 10x faster on CPU
    than ``F.interpolate`` + ``F.adaptive_avg_pool2d`` over the relation maps' many tiny planes,
    which took 42% of DVT's time on DeiT-S (``prunetune bench --profile``).
    """
    lead = t.shape[:-1]
    w = _resize_weights(g_in, g_out, t.device, t.dtype)
    x = t.reshape(-1, g_in) @ w.T  # columns: [N * g_in, g_out]
    x = torch.matmul(w, x.reshape(-1, g_in, g_out))  # rows: [N, g_out, g_out]
    return x.reshape(*lead, g_out * g_out)


def _resize_tokens(t: torch.Tensor, npre: int, g_in: int, g_out: int) -> torch.Tensor:
    """Resize the last (token) axis: the first ``npre`` entries kept, the patch grid resized."""
    return torch.cat([t[..., :npre], resize_grid(t[..., npre:], g_in, g_out)], dim=-1)


def geometric_shares(q: float, num_exits: int) -> list[float]:
    """Target exit shares ``q^k / sum_j q^j``, k = 1..K (``inference.py``)."""
    w = [q ** k for k in range(1, num_exits + 1)]
    s = sum(w)
    return [v / s for v in w]


def find_thresholds(conf: torch.Tensor, shares: Sequence[float]) -> torch.Tensor:
    """Exit thresholds realising target ``shares`` on confidences ``conf [K, n]`` (``dynamic_find_threshold``).

    Walking exit ``k``'s confidences in descending order and skipping samples that already exited,
    ``T_k`` is the confidence of the last sample needed to bring the exited count to
    ``floor(n * sum_{j<=k} share_j)`` (``+inf`` when none is needed); ``T_K = -inf``.
    """
    num_exits, n = conf.shape
    thresholds = torch.full((num_exits,), math.inf, dtype=torch.float32)
    thresholds[-1] = -math.inf
    exited = torch.zeros(n, dtype=torch.bool)
    cumulative = 0.0
    for k in range(num_exits - 1):
        cumulative += float(shares[k])
        want = int(math.floor(n * cumulative + 1e-9)) - int(exited.sum())
        candidates = conf[k][~exited]
        if want > 0 and candidates.numel() > 0:
            ordered = candidates.sort(descending=True).values
            thresholds[k] = ordered[min(want, ordered.numel()) - 1]
            exited |= conf[k] >= thresholds[k]
    return thresholds


def route(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """0-based exit of each sample: the first ``k`` with ``conf[k] >= T_k`` (the last exit takes the rest)."""
    hits = conf >= thresholds.to(conf)[:, None]
    hits[-1] = True
    return hits.to(torch.uint8).argmax(0)


@dataclass(frozen=True)
class DVTConfig(MethodConfig):
    """DVT's knobs, with the reference's DeiT-S architecture.

    Attributes:
        grids: tokens per side of each exit, coarse to fine, the last one the backbone's grid
            (empty: ``default_grids`` of the backbone, 7/10/14 for DeiT-S at 224 px).
        feature_reuse: upstream features into every downstream block's MLP input.
        relation_reuse: upstream attention logits added to the downstream logits.
        reuse_dim: channels of the reused feature (the reference's 48).
        reuse_hidden: hidden width of the feature-reuse MLP (the reference's 128).
        relation_expansion: hidden channels of the relation MLP over ``L*H`` (the reference's 3).
        budget: target expected GFLOPs per image as a fraction of the dense backbone's (fvcore,
            batch 1); ``calibrate`` picks the exit thresholds to fit it.
        threshold_policy: ``geometric`` (the reference's sweep of geometric exit shares, chosen for
            ``budget``) or ``fixed`` (``thresholds`` as given; ``calibrate`` only reports).
        thresholds: thresholds of exits 1..K-1 on the max softmax before calibration (empty:
            ``+inf``, every sample runs the whole cascade); the policy ``fixed`` keeps them.
    """

    grids: tuple[int, ...] = ()
    feature_reuse: bool = True
    relation_reuse: bool = True
    reuse_dim: int = 48
    reuse_hidden: int = 128
    relation_expansion: int = 3
    budget: float = 0.5
    threshold_policy: Literal["geometric", "fixed"] = "geometric"
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        grids = tuple(self.grids)
        if not all(isinstance(g, (int, float)) and not isinstance(g, bool) and float(g).is_integer() and g >= 1 for g in grids):
            raise ValueError(f"grids must be integers >= 1, got {list(grids)}")
        object.__setattr__(self, "grids", tuple(int(g) for g in grids))
        for name in ("feature_reuse", "relation_reuse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("reuse_dim", "reuse_hidden", "relation_expansion"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
            object.__setattr__(self, name, int(v))
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"budget must be a number > 0 (a fraction of the dense GFLOPs), got {self.budget!r}")
        object.__setattr__(self, "budget", float(self.budget))
        if self.threshold_policy not in _POLICIES:
            raise ValueError(f"threshold_policy must be one of {list(_POLICIES)}, got {self.threshold_policy!r}")
        thresholds = tuple(self.thresholds)
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and not math.isnan(t) for t in thresholds):
            raise ValueError(f"thresholds must be numbers (inf allowed), got {list(thresholds)}")
        object.__setattr__(self, "thresholds", tuple(float(t) for t in thresholds))
        if self.grids:
            self._check_grids(self.grids, None)

    def _check_grids(self, grids: tuple[int, ...], grid: int | None) -> None:
        source = "grids" if self.grids else f"grids derived from the backbone's {grid}x{grid} grid"
        if len(grids) < 2:
            raise ValueError(f"{source} {list(grids)}: DVT needs at least 2 exits")
        if any(b <= a for a, b in zip(grids, grids[1:])) or grids[0] < 1:
            raise ValueError(f"{source} {list(grids)} must be strictly increasing and >= 1")
        if grid is not None and grids[-1] != grid:
            raise ValueError(f"grids {list(grids)} must end with the backbone's grid {grid} (the last exit is the backbone)")
        if self.thresholds and len(self.thresholds) != len(grids) - 1:
            raise ValueError(f"thresholds {list(self.thresholds)} need {len(grids) - 1} entries, one per exit but the last")

    def validate_for(self, geometry: Geometry) -> None:
        rows, cols = geometry.grid
        if rows != cols:
            raise ValueError(f"DVT needs a square patch grid, the backbone's is {rows}x{cols}")
        self._check_grids(self.exit_grids(rows), rows)

    def exit_grids(self, grid: int) -> tuple[int, ...]:
        """Tokens per side of each exit on a backbone with a ``grid x grid`` patch grid."""
        return self.grids or default_grids(grid)


# ---------------------------------------------------------------------------------------- the pieces


def dvt_block_forward(
    blk: Block, x: torch.Tensor, bias: torch.Tensor | None, feature: torch.Tensor | None, want_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm ``Block`` with DVT's reuse.

    Args:
        blk: a timm ``Block`` (``norm2``/``mlp.fc1`` widened when ``feature`` is given).
        x: tokens ``[B, N, C]``.
        bias: relation reuse ``[B, H, N, N]`` added to the attention logits, or None.
        feature: reused feature ``[B, N, r]`` concatenated to the MLP's input, or None.
        want_logits: return the pre-softmax logits (bias included) for a downstream exit.

    Returns:
        the block's output and its logits ``[B, H, N, N]`` (None unless ``want_logits``).
    """
    attn = blk.attn
    q, k, v = qkv_heads(attn, blk.norm1(x))
    logits = None
    if want_logits:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        weights = attn.attn_drop(logits.float().softmax(dim=-1).to(v.dtype))
        out = merge_heads(attn, weights @ v)
    else:
        out = merge_heads(attn, sdpa(attn, q, k, v, None if bias is None else bias.to(q.dtype)))
    x = x + blk.drop_path1(blk.ls1(out))
    h = x if feature is None else torch.cat([x, feature.to(x.dtype)], dim=-1)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h)))), logits


def _init_linear(module: nn.Module) -> None:
    """The reference's init for new layers: trunc-normal(0.02) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _coarsen(vit: VisionTransformer, grid: int) -> None:
    """Give ``vit`` (a copy of the backbone) a strided patch embedding for ``grid x grid`` tokens."""
    pe = vit.patch_embed
    img_h, img_w = pe.img_size
    old_grid = tuple(pe.grid_size)
    s, pad = strided_embedding(int(img_h), grid)
    if strided_embedding(int(img_w), grid) != (s, pad):
        raise ValueError(f"DVT needs a square input, got {img_h}x{img_w}")
    old = pe.proj
    conv = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=s, stride=s, padding=pad, bias=old.bias is not None)
    conv = conv.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(resample_patch_embed(old.weight.detach().float(), [s, s]).to(old.weight.dtype))
        if old.bias is not None:
            conv.bias.copy_(old.bias)
        npt = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        pos = resample_abs_pos_embed(vit.pos_embed.detach().float(), [grid, grid], list(old_grid), num_prefix_tokens=npt)
    pe.proj = conv
    pe.patch_size = (s, s)
    pe.grid_size = (grid, grid)
    pe.num_patches = grid * grid
    vit.pos_embed = nn.Parameter(pos.to(vit.pos_embed.dtype))


def _widen_mlp_input(blk: Block, extra: int) -> None:
    """``norm2`` and ``mlp.fc1`` take ``C + extra`` channels, the dense weights on the first C."""
    norm, fc1 = blk.norm2, blk.mlp.fc1
    c = fc1.in_features
    new_norm = nn.LayerNorm(c + extra, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                            bias=norm.bias is not None)
    new_fc1 = nn.Linear(c + extra, fc1.out_features, bias=fc1.bias is not None)
    new_norm = new_norm.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
    new_fc1 = new_fc1.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
    with torch.no_grad():
        if norm.elementwise_affine:
            new_norm.weight[:c] = norm.weight
            if norm.bias is not None:
                new_norm.bias[:c] = norm.bias
        trunc_normal_(new_fc1.weight, std=0.02)
        new_fc1.weight[:, :c] = fc1.weight
        if fc1.bias is not None:
            new_fc1.bias.copy_(fc1.bias)
    blk.norm2, blk.mlp.fc1 = new_norm, new_fc1


class _ExitReuse(nn.Module):
    """What exit k (k >= 2) learns to reuse exit k-1 with: per-block feature MLPs, one relation MLP."""

    def __init__(self, dim: int, depth: int, heads: int, eps: float, cfg: DVTConfig, feature_blocks: int) -> None:
        super().__init__()
        if cfg.feature_reuse:
            self.features = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(dim, eps=eps), Mlp(dim, cfg.reuse_hidden, cfg.reuse_dim)) for _ in range(feature_blocks)
            )
        if cfg.relation_reuse:
            lh = depth * heads
            self.relations = nn.Sequential(
                nn.Conv2d(lh, lh * cfg.relation_expansion, 1), nn.GELU(), nn.Conv2d(lh * cfg.relation_expansion, lh, 1)
            )
        _init_linear(self)


# ---------------------------------------------------------------------------------------- the model


class DVT(nn.Module):
    """A cascade of timm ViTs on coarse-to-fine grids with feature and relation reuse, exiting early in eval mode.

    Training: ``MethodOutput(logits of the last exit, aux={"exit_logits": [l_1, ..., l_K]})``.
    Eval: ``MethodOutput(logits, aux={"exit": 0-based exit per sample})`` with real early exit on the
    ``thresholds`` buffer. ``forward_all`` runs every exit on every sample in either mode.
    """

    def __init__(self, vit: VisionTransformer, cfg: DVTConfig) -> None:
        super().__init__()
        geometry = fit_backbone(vit, cfg)
        if getattr(vit, "dynamic_img_size", False):
            raise NotImplementedError("DVT needs a fixed input size (dynamic_img_size=False)")
        if cfg.feature_reuse:
            for blk in vit.blocks:
                if not isinstance(blk.mlp, Mlp) or not isinstance(blk.norm2, nn.LayerNorm):
                    raise NotImplementedError("feature reuse needs timm's Mlp and a LayerNorm norm2 in every block")
        self.cfg = cfg
        self.grids = cfg.exit_grids(geometry.grid[0])
        self.num_exits = len(self.grids)
        self.depth, self.num_heads = geometry.depth, geometry.num_heads
        self.npre = geometry.num_prefix_tokens
        self.image_shape = (int(vit.patch_embed.proj.in_channels), *(int(s) for s in vit.patch_embed.img_size))
        exits = []
        for k, g in enumerate(self.grids):
            exit_vit = copy.deepcopy(vit)
            if g != geometry.grid[0]:
                _coarsen(exit_vit, g)
            if k > 0 and cfg.feature_reuse:
                for blk in exit_vit.blocks:
                    _widen_mlp_input(blk, cfg.reuse_dim)
            exits.append(exit_vit)
        self.exits = nn.ModuleList(exits)
        eps = getattr(vit.blocks[0].norm1, "eps", 1e-6)
        self.reuse = nn.ModuleDict()
        if cfg.feature_reuse or cfg.relation_reuse:
            # The last exit's last block needs no reused feature: the head reads only the prefix
            # tokens, whose reused feature is zero, so that block's feature MLP could never matter.
            dead = 1 if getattr(vit, "global_pool", "token") == "token" else 0
            for k in range(1, self.num_exits):
                blocks = self.depth - (dead if k == self.num_exits - 1 else 0)
                self.reuse[f"exit{k + 1}"] = _ExitReuse(geometry.embed_dim, self.depth, self.num_heads, eps, cfg, blocks)
        weight = vit.patch_embed.proj.weight
        self.reuse.to(device=weight.device, dtype=weight.dtype)
        for name, value in _initial_buffers(cfg, self.num_exits).items():
            self.register_buffer(name, value.to(weight.device))

    # -- one exit

    def _relation_bias(self, k: int, relations: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Upstream logits ``[B, L*H, N_up, N_up]`` -> this exit's per-block biases ``[B, H, N, N]``."""
        r = self.reuse[f"exit{k + 1}"].relations(relations)
        g_in, g_out = self.grids[k - 1], self.grids[k]
        r = _resize_tokens(r, self.npre, g_in, g_out)  # keys
        r = _resize_tokens(r.transpose(-1, -2), self.npre, g_in, g_out).transpose(-1, -2)  # queries
        return r.chunk(self.depth, dim=1)

    def _reused_feature(self, k: int, i: int, feature: torch.Tensor) -> torch.Tensor:
        """Upstream last-block tokens ``[B, N_up, C]`` -> block ``i``'s reused feature ``[B, N, r]`` (zero at
        prefix tokens; all zero in a block without a feature MLP, the last exit's last block)."""
        mlps = self.reuse[f"exit{k + 1}"].features
        if i >= len(mlps):
            return feature.new_zeros(feature.shape[0], self.npre + self.grids[k] ** 2, self.cfg.reuse_dim)
        f = mlps[i](feature[:, self.npre:])
        f = resize_grid(f.transpose(1, 2), self.grids[k - 1], self.grids[k]).transpose(1, 2)
        return torch.cat([f.new_zeros(f.shape[0], self.npre, f.shape[2]), f], dim=1)

    def run_exit(
        self, k: int, images: torch.Tensor, feature: torch.Tensor | None, relations: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Exit ``k`` (0-based) on ``images`` with exit ``k-1``'s reuse tensors.

        Returns its logits, and for the next exit (None at the last exit or with that reuse off) its
        last-block tokens before the final norm ``[B, N, C]`` and its blocks' logits ``[B, L*H, N, N]``.
        """
        vit = self.exits[k]
        last = k == self.num_exits - 1
        emit_relations = self.cfg.relation_reuse and not last
        biases = self._relation_bias(k, relations) if relations is not None else None
        x = vit_stem(vit, images)
        logits = []
        for i, blk in enumerate(vit.blocks):
            bias = biases[i] if biases is not None else None
            feat = self._reused_feature(k, i, feature) if feature is not None else None
            if bias is None and feat is None and not emit_relations:
                x = blk(x)  # timm's own block
                continue
            x, blk_logits = dvt_block_forward(blk, x, bias, feat, emit_relations)
            if emit_relations:
                logits.append(blk_logits)
        out, _ = vit_head(vit, x)
        next_feature = x if self.cfg.feature_reuse and not last else None
        next_relations = torch.cat(logits, dim=1) if emit_relations else None
        return out, next_feature, next_relations

    # -- the cascade

    def forward_all(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits on every sample (training, calibration)."""
        feature = relations = None
        outs = []
        for k in range(self.num_exits):
            logits, feature, relations = self.run_exit(k, images, feature, relations)
            outs.append(logits)
        return outs

    def early_exit(self, images: torch.Tensor, thresholds: torch.Tensor) -> MethodOutput:
        """Batched early exit: after exit k the samples with max softmax ``>= thresholds[k]`` leave."""
        b = images.shape[0]
        remaining = torch.arange(b, device=images.device)
        exit_index = torch.full((b,), self.num_exits - 1, dtype=torch.long, device=images.device)
        out = None
        feature = relations = None
        x = images
        for k in range(self.num_exits):
            logits, feature, relations = self.run_exit(k, x, feature, relations)
            if out is None:
                out = logits.new_empty(b, logits.shape[-1])
            out.index_copy_(0, remaining, logits)  # later exits overwrite the samples that go on
            exit_index.index_fill_(0, remaining, k)
            if k == self.num_exits - 1:
                break
            confidence = logits.float().softmax(dim=-1).amax(dim=-1)
            stay = (confidence < thresholds[k]).nonzero().squeeze(1)  # the one host sync per exit
            if stay.numel() == 0:
                break
            if stay.numel() < remaining.numel():
                remaining = remaining.index_select(0, stay)
                x = x.index_select(0, stay)
                feature = feature.index_select(0, stay) if feature is not None else None
                relations = relations.index_select(0, stay) if relations is not None else None
        return MethodOutput(out, {"exit": exit_index})

    def forward(self, images: torch.Tensor) -> MethodOutput:
        if self.training:
            outs = self.forward_all(images)
            return MethodOutput(outs[-1], {"exit_logits": outs})
        return self.early_exit(images, self.thresholds)


def _initial_buffers(cfg: DVTConfig, num_exits: int) -> dict[str, torch.Tensor]:
    """The threshold buffers before calibration: ``cfg.thresholds`` (or ``+inf``), ``T_K = -inf``, an
    uncalibrated table (one row per q of ``Q_GRID``) and the ``calibrated`` flag."""
    initial = list(cfg.thresholds) if cfg.thresholds else [math.inf] * (num_exits - 1)
    table = torch.full((len(Q_GRID), num_exits), math.inf)
    table[:, -1] = -math.inf
    return {
        "thresholds": torch.tensor(initial + [-math.inf], dtype=torch.float32),
        "threshold_table": table,
        "calibrated": torch.zeros((), dtype=torch.bool),
    }


class _ExitAt(nn.Module):
    """The early-exit pipeline forced to exit every sample at exit ``k`` (what exiting there costs)."""

    def __init__(self, model: DVT, k: int) -> None:
        super().__init__()
        self.model = model
        forced = [math.inf] * k + [-math.inf] * (model.num_exits - k)
        self.register_buffer("forced", torch.tensor(forced, dtype=torch.float32, device=model.thresholds.device), persistent=False)
        self.train(model.training)

    def forward(self, images: torch.Tensor) -> MethodOutput:
        return self.model.early_exit(images, self.forced)


def _dense_equivalent(model: DVT) -> nn.Module:
    """A plain timm ViT with the backbone's architecture (the last exit without reuse), for counting."""
    vit = copy.deepcopy(model.exits[-1])
    if model.cfg.feature_reuse:
        for blk in vit.blocks:
            c = blk.mlp.fc1.in_features - model.cfg.reuse_dim
            blk.norm2 = nn.LayerNorm(c, eps=blk.norm2.eps).to(blk.mlp.fc1.weight.device)
            blk.mlp.fc1 = nn.Linear(c, blk.mlp.fc1.out_features).to(blk.mlp.fc1.weight.device)
    return vit


# ---------------------------------------------------------------------------------------- measuring


def _batches(loader: Any):
    for batch in loader:
        images, target = batch[0], batch[1]
        yield images, target


@torch.no_grad()
def _collect(model: DVT, loader: Any, device: torch.device, amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's max-softmax confidence and correctness on every sample: ``[K, n]`` each (CPU)."""
    model.eval()
    conf, correct = [], []
    for images, target in _batches(loader):
        images, target = images.to(device), target.to(device)
        with _autocast(device, amp):
            outs = model.forward_all(images)
        probs = torch.stack([o.float().softmax(dim=-1) for o in outs])  # [K, B, classes]
        c, pred = probs.max(dim=-1)
        conf.append(c.cpu())
        correct.append(pred.eq(target[None]).cpu())
    if not conf:
        raise ValueError("DVT: the loader gave no images")
    return torch.cat(conf, dim=1), torch.cat(correct, dim=1)


def _autocast(device: torch.device, amp: bool | torch.dtype | None):
    if amp is None or amp is False:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp if isinstance(amp, torch.dtype) else torch.float16 if device.type == "cuda" else torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _exit_costs(model: DVT, image_shape: tuple[int, int, int], device: torch.device) -> list[float]:
    """fvcore GFLOPs (batch 1) of exiting at each exit: the cascade's prefixes, cumulative."""
    from .measure import count_gflops

    return [count_gflops(_ExitAt(model, k), image_shape, device) for k in range(model.num_exits)]


def _evaluate_thresholds(conf: torch.Tensor, correct: torch.Tensor, thresholds: torch.Tensor, costs: Sequence[float]) -> dict[str, Any]:
    """Exit shares, expected cost (in ``costs``' unit) and top-1 (percent) of ``thresholds`` on recorded confidences."""
    exits = route(conf, thresholds)
    n = exits.numel()
    shares = torch.bincount(exits, minlength=conf.shape[0]).double() / n
    top1 = correct.gather(0, exits[None]).double().mean().item() * 100.0
    cost = float(sum(s * c for s, c in zip(shares.tolist(), costs)))
    return {"shares": shares.tolist(), "cost": cost, "top1": top1}


def _time_loader(model: nn.Module, loader: Any, device: torch.device, amp: bool, dvt: bool) -> tuple[float, int, torch.Tensor | None, torch.Tensor]:
    """Wall seconds to run ``loader`` through ``model`` (everything counted), images, exits, correct."""
    exits, correct = [], []
    n = 0
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), _autocast(device, amp):
        for images, target in _batches(loader):
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            out = model(images)
            logits = out.logits if isinstance(out, MethodOutput) else out
            correct.append(logits.argmax(dim=-1).eq(target))
            if dvt:
                exits.append(out.aux["exit"])
            n += images.shape[0]
    _sync(device)
    wall = time.perf_counter() - start
    return wall, n, (torch.cat(exits).cpu() if dvt else None), torch.cat(correct).cpu()


# ---------------------------------------------------------------------------------------- the method


@register_method("dvt")
class DVTMethod(SparsityMethod[DVTConfig]):
    """DVT: trains the cascade (sum of the exits' task losses), calibrates exit thresholds for a budget."""

    config_cls = DVTConfig
    needs_teacher = False
    needs_pretrained = True
    needs_calibration = True
    cost_depends_on_training = True  # the exit distribution sets the cost
    find_unused_parameters = False  # training runs every exit on every image

    def build_model(self, cfg: DVTConfig, base: nn.Module) -> nn.Module:
        return DVT(base, cfg)

    def loss(
        self, out: MethodOutput, target: torch.Tensor, cfg: DVTConfig, task_loss: TaskLoss, teacher: MethodOutput | None = None,
    ) -> LossOutput:
        """The sum of every exit's task loss, equal weights (``main.py``)."""
        exit_logits = out.aux.get("exit_logits") or [out.logits]
        losses = [task_loss(logits, target) for logits in exit_logits]
        total = torch.stack(losses).sum()
        terms = {"task_loss": total.detach(), **{f"exit{k + 1}_loss": l.detach() for k, l in enumerate(losses)}}
        return LossOutput(total, terms)

    @torch.no_grad()
    def calibrate(self, model: nn.Module, cfg: DVTConfig, loader: Any, device: torch.device) -> dict[str, float]:
        """Fit the exit thresholds on ``loader`` (held-out training images, eval transforms) for ``budget``.

        Every ``q`` of ``Q_GRID`` gives thresholds realising its geometric exit shares (stored in
        ``threshold_table``); with the ``geometric`` policy the thresholds in force become those of
        the most accurate ``q`` whose expected GFLOPs fit ``budget`` x the dense GFLOPs (the cheapest
        ``q`` if none fits: ``calib_budget_met`` 0). Returns ``calib_*`` metrics and ``threshold_{k}``.
        """
        was_training = model.training
        model.eval()
        conf, correct = _collect(model, loader, device)
        costs = _exit_costs(model, model.image_shape, device)
        from .measure import count_gflops

        dense = count_gflops(_dense_equivalent(model), model.image_shape, device)
        table = torch.stack([find_thresholds(conf, geometric_shares(q, model.num_exits)) for q in Q_GRID])
        rows = [_evaluate_thresholds(conf, correct, t, costs) for t in table]
        budget = cfg.budget * dense
        chosen_q = 0.0
        if cfg.threshold_policy == "geometric":
            feasible = [i for i, r in enumerate(rows) if r["cost"] <= budget * (1 + 1e-9)]
            if feasible:
                pick = max(feasible, key=lambda i: (rows[i]["top1"], -rows[i]["cost"]))
            else:
                pick = min(range(len(rows)), key=lambda i: rows[i]["cost"])
            model.thresholds.copy_(table[pick])
            chosen_q = Q_GRID[pick]
        model.thresholds[-1] = -math.inf
        model.threshold_table.copy_(table)
        model.calibrated.fill_(True)
        result = _evaluate_thresholds(conf, correct, model.thresholds.cpu(), costs)
        model.train(was_training)
        metrics = {
            "calib_images": float(conf.shape[1]),
            "calib_top1": result["top1"],
            "calib_expected_gflops": result["cost"],
            "calib_budget_gflops": budget,
            "calib_dense_gflops": dense,
            "calib_budget_met": float(result["cost"] <= budget * (1 + 1e-9)),
        }
        if cfg.threshold_policy == "geometric":
            metrics["calib_q"] = chosen_q
        for k in range(model.num_exits):
            metrics[f"calib_exit_share_{k + 1}"] = result["shares"][k]
            metrics[f"calib_exit{k + 1}_top1"] = correct[k].double().mean().item() * 100.0
            metrics[f"gflops_exit{k + 1}"] = costs[k]
        for k in range(model.num_exits - 1):
            metrics[f"threshold_{k + 1}"] = float(model.thresholds[k])
        return metrics

    def measure(
        self, model: nn.Module, dense: nn.Module, cfg: DVTConfig, loader: Any, image_shape: tuple[int, int, int],
        device: torch.device, measure_cfg: Any,
    ) -> Measurement:
        """Over the val ``loader``: accuracy at the calibrated thresholds, exit shares, per-exit and
        expected latency/GFLOPs, and the wall-clock throughput of the real early-exit pipeline beside
        the dense model's, plus the ``accuracy_vs_budget`` table (one row per ``q``: the calibrated
        thresholds, or thresholds fitted on the val set itself when the model was never calibrated).

        Without a loader, the default random-input ``measure_pair`` (exits decided on noise).
        """
        if loader is None:
            return super().measure(model, dense, cfg, loader, image_shape, device, measure_cfg)
        from .measure import count_gflops, time_forward

        was_training = model.training
        model.eval()
        dense.eval()
        k_exits = model.num_exits
        amp = measure_cfg.autocast_dtype(device) if hasattr(measure_cfg, "autocast_dtype") else bool(getattr(measure_cfg, "amp", False))
        warmup, iters, rounds = int(measure_cfg.warmup), int(measure_cfg.iters), int(measure_cfg.rounds)

        costs = _exit_costs(model, image_shape, device)
        dense_gflops = count_gflops(dense, image_shape, device)
        forced = [_ExitAt(model, k) for k in range(k_exits)]
        one = torch.randn(1, *image_shape, device=device)
        lat: list[list[float]] = [[] for _ in range(k_exits)]
        dense_lat: list[float] = []
        for _ in range(rounds):
            for k in range(k_exits):
                lat[k].append(time_forward(forced[k], one, warmup, iters, amp))
            dense_lat.append(time_forward(dense, one, warmup, iters, amp))
        exit_ms = [statistics.median(v) * 1e3 for v in lat]
        dense_ms = statistics.median(dense_lat) * 1e3

        conf, correct_all = _collect(model, loader, device, amp)  # also warms the loader and kernels
        wall, n, exits, correct = _time_loader(model, loader, device, amp, dvt=True)
        dense_wall, dense_n, _, _ = _time_loader(dense, loader, device, amp, dvt=False)
        shares = (torch.bincount(exits, minlength=k_exits).double() / n).tolist()
        latency = sum(s * t for s, t in zip(shares, exit_ms))
        gflops = sum(s * c for s, c in zip(shares, costs))
        throughput, dense_throughput = n / wall, dense_n / dense_wall
        metrics = {
            "budget_top1": correct.double().mean().item() * 100.0,
            "latency_ms": latency,
            "dense_latency_ms": dense_ms,
            "speedup": dense_ms / latency,
            "gflops": gflops,
            "dense_gflops": dense_gflops,
            "throughput_ips": throughput,
            "dense_throughput_ips": dense_throughput,
            "throughput_ratio": throughput / dense_throughput,
        }
        for k in range(k_exits):
            metrics[f"exit_share_{k + 1}"] = shares[k]
            metrics[f"latency_exit{k + 1}_ms"] = exit_ms[k]
            metrics[f"gflops_exit{k + 1}"] = costs[k]
            metrics[f"exit{k + 1}_top1"] = correct_all[k].double().mean().item() * 100.0

        calibrated = bool(model.calibrated)
        table = model.threshold_table.cpu() if calibrated else None
        rows = []
        for i, q in enumerate(Q_GRID):
            t = table[i] if calibrated else find_thresholds(conf, geometric_shares(q, k_exits))
            r = _evaluate_thresholds(conf, correct_all, t, costs)
            row = {"gflops": r["cost"], "top1": r["top1"], "latency_ms": sum(s * ms for s, ms in zip(r["shares"], exit_ms)), "q": q}
            row.update({f"exit_share_{k + 1}": r["shares"][k] for k in range(k_exits)})
            rows.append(row)
        metrics["table_thresholds_from_val"] = float(not calibrated)
        model.train(was_training)
        return Measurement(metrics, {"accuracy_vs_budget": rows})

    def convert_reference_state(self, state: dict[str, torch.Tensor], cfg: DVTConfig) -> dict[str, torch.Tensor]:
        """The authors' DeiT cascade (``DVT_Deit_small``'s ``model_state_dict``) -> this model's keys.

        ``less_less_token.*``, ``less_token.*``, ``normal_token.*`` are exits 1-3 (timm ViT keys);
        ``<exit>.blocks.{i}.feature_resuse_mlp.{0,1.fc1,1.fc2}`` -> ``reuse.exit{k}.features.{i}.{...}``;
        ``<exit>.relation_reuse_conv.{0,2}`` -> ``reuse.exit{k}.relations.{0,2}``. Keys the map does not
        know pass through unchanged (so they show up as unexpected). ``normal_token``'s last block's
        ``feature_resuse_mlp`` is dropped: it only feeds patch tokens the head never reads, so this
        model does not have it. A released file's ``dynamic_threshold`` (one row of thresholds per q,
        read by ``read_reference_state``) becomes ``threshold_table``, so the accuracy-against-budget
        curve uses the authors' thresholds; the thresholds in force stay ``+inf`` (every sample to the
        last exit) until ``calibrate`` picks a row for this config's budget on held-out images, since
        choosing one needs the exit shares the file does not hold.
        """
        num_exits = len(cfg.grids) or 3
        if num_exits != len(_REFERENCE_EXITS):
            raise ValueError(f"the reference's DeiT cascade has 3 exits, this config has {num_exits}")
        last = _REFERENCE_EXITS[-1]
        last_block = max((int(k.split(".")[2]) for k in state if k.startswith(f"{last}.blocks.")), default=-1)
        dead = f"{last}.blocks.{last_block}.feature_resuse_mlp."  # never affects the logits: not kept
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            root, _, rest = key.partition(".")
            if root not in _REFERENCE_EXITS:
                out[key] = value
                continue
            if key.startswith(dead):
                continue
            k = _REFERENCE_EXITS.index(root)
            parts = rest.split(".")
            if parts[0] == "relation_reuse_conv":
                out[f"reuse.exit{k + 1}.relations." + ".".join(parts[1:])] = value
            elif parts[0] == "blocks" and len(parts) > 2 and parts[2] == "feature_resuse_mlp":
                out[f"reuse.exit{k + 1}.features.{parts[1]}." + ".".join(parts[3:])] = value
            else:
                out[f"exits.{k}." + rest] = value
        buffers = _initial_buffers(cfg, num_exits)
        published = out.pop(_PUBLISHED_THRESHOLDS, None)
        if published is not None:  # the authors' per-q thresholds (their inference.py), one row per q of Q_GRID
            if tuple(published.shape) != tuple(buffers["threshold_table"].shape):
                raise ValueError(f"dynamic_threshold has shape {tuple(published.shape)}, expected {tuple(buffers['threshold_table'].shape)}")
            table = published.float().clone()
            table[:, -1] = -math.inf  # the reference's -1e8: the last exit takes everyone
            buffers["threshold_table"] = table
            buffers["calibrated"] = torch.ones((), dtype=torch.bool)
        out.update(buffers)
        return out

    def read_reference_state(self, path: Path) -> dict[str, torch.Tensor] | None:
        """A released DVT checkpoint: ``model_state_dict`` plus its ``dynamic_threshold`` table (kept
        under a private key for ``convert_reference_state``); None for any other file."""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("model_state_dict"), dict):
            return None
        state = {k.removeprefix("module."): v for k, v in obj["model_state_dict"].items()}
        if isinstance(obj.get("dynamic_threshold"), torch.Tensor):
            state[_PUBLISHED_THRESHOLDS] = obj["dynamic_threshold"]
        return state
