"""SViTE / S2ViTE / SViTE+: sparse ViTs trained end to end with dynamic sparse training (DST).

Chen et al., "Chasing Sparsity in Vision Transformers: An End-to-End Exploration", NeurIPS 2021,
https://arxiv.org/abs/2106.04533. Reference code: VITA-Group/SViTE at 7dc89fd (``SViTE/main.py``,
``engine.py``, ``dst_utils/core.py``, ``vision_transformer.py``).

Two registered methods share this module:

``svite`` (unstructured, SViTE). Every ``nn.Linear``/``nn.Conv2d`` weight of the backbone (patch
embedding, qkv, proj, fc1, fc2, head; not biases, norms, ``cls_token``, ``pos_embed``) gets a bool
mask, a buffer named ``<param>_mask`` beside the parameter (``vit.blocks.0.attn.qkv.weight_mask``).
Layer densities follow ERK at the target ``density``: ``d_l = eps * sum(shape_l) / prod(shape_l)``,
``eps`` solving ``sum_l d_l n_l = density * sum_l n_l``; layers whose ``d_l`` would exceed 1 are made
dense and ``eps`` is recomputed (``erk_densities``). Each layer keeps exactly ``round(d_l * n_l)``
weights (at least one), chosen uniformly at random. Every ``update_frequency`` optimizer steps while
the step count is below ``t_end * total_steps``, each non-dense layer drops the ``ceil(dr * nnz)``
active weights of smallest magnitude and grows as many among the other positions with the largest
gradient magnitude (RigL; ``growth: random`` picks them at random), so its nnz never changes.
``dr`` decays from ``death_rate`` to ``final_death_rate`` on a cosine over ``total_steps``.

``s2vite`` (structured, S2ViTE). The units are attention heads (the q, k and v row blocks of
``qkv.weight`` with their biases, and the head's input columns of ``proj.weight``) and MLP neurons
(an ``fc1`` row with its bias and the matching ``fc2`` column). Each block keeps exactly
``int(H * atten_density)`` heads (``attn.head_mask [H]``) and ``int(hidden * other_density)`` neurons
(``mlp.neuron_mask [hidden]``), chosen at random at build time. An update prunes per block the
``ceil(dr * active)`` neurons with the lowest ``L1(fc1 row) + L1(fc2 column)`` and the heads with the
lowest first-order Taylor score ``|<dL/d out_h, out_h>|``, and regrows as many of the others by
gradient L1 (see the differences below). Eval mode runs only the active heads and neurons (sliced
weights), and ``inference_model`` exports a physically smaller timm network: per block a timm
``Attention`` with fewer heads (``num_heads = h``, head dim unchanged) and an ``Mlp`` with fewer
hidden units, whose outputs equal the masked model's.

Token sparsity (SViTE+, either method, ``token_number > 0``): a learnable ``Linear(C, 1)`` scores the
patch tokens after the position embedding; training draws a hard Gumbel top-k (``k = token_number``
patches, the prefix/CLS tokens always kept) on ``log_softmax`` of the scores, straight-through, with
the temperature going linearly from ``tau_start`` (10) to ``tau_end`` (0.1) over training (set by the
hooks). Eval mode really drops the other tokens: the ``k`` best-scoring patches (no noise) are
gathered, in their spatial order, and the sequence shrinks to ``k + prefix`` tokens.

Both methods train from scratch as the paper (``needs_pretrained = False``); given dense weights they
start from those instead.

What the training loop must do (``SViTEHooks``): call ``method.hooks(model, cfg, optimizer,
total_steps=epochs * steps_per_epoch)`` (or set ``cfg.total_steps``) once per run, then per step
``after_backward(step)`` after the (DDP all-reduced) backward and before clipping/the optimizer
step, and ``after_optimizer_step(step)`` after it, ``step`` counting optimizer steps from 0. Mask
updates read only the all-reduced gradients and the (replicated) weights, break ties by position
(stable sorts) and draw random choices from generators seeded by ``seed`` and the step, so every DDP
rank computes the same masks without any broadcast; the masks, the step count, the current death
rate and the Gumbel temperature are buffers, so a checkpoint resumes the same schedule.

Differences from the reference:
    * ERK keeps exactly ``round(d_l * n_l)`` weights per layer (a random subset of that size), where
      the reference samples Bernoulli(``d_l``) masks: per-layer and global densities equal the ERK
      targets exactly. ``sparse_init: uniform`` gives every layer ``density`` the same way.
    * Prune and grow are exact top-k with positional tie-breaking; the reference thresholds the
      sorted values and can prune more than ``ceil(dr * nnz)`` on ties. Growth candidates are all
      positions inactive after pruning (as the reference and RigL); a just-pruned weight that is
      regrown simply stays, with its value and optimizer state. Genuinely new weights start at 0.
    * Optimizer state: the gradients of masked weights (and of inactive units) are zeroed in
      ``after_backward``, so they never reach AdamW's moments or the gradient-norm clipping, and on
      every mask update every per-element optimizer buffer (``exp_avg``, ``exp_avg_sq``,
      ``max_exp_avg_sq``, ``momentum_buffer``) is zeroed at the pruned and at the newly grown
      positions. The reference masks only SGD's ``momentum_buffer``, so its AdamW moments keep
      evolving at pruned positions and regrown weights inherit stale moments.
    * No mask broadcast: the reference broadcasts every mask from rank 0 after every step (and so
      needs a process group even on one GPU); here the masks are computed identically on every rank.
      DDP's own per-forward buffer broadcast is redundant for this method (``broadcast_buffers``).
    * Mask updates are driven by the loop's step (``after_optimizer_step``), prune by the post-step
      magnitudes and grow by that step's gradients, as the reference; ``death_rate`` follows the
      closed-form cosine of ``CosineDecay`` (``eta_min = final_death_rate``).
    * S2ViTE units include what the reference leaves unmasked: the q/k/v biases and the heads'
      ``proj`` input columns (the reference's "pruned" heads still emit a bias-driven value through
      an unmasked ``proj``, so they cannot really be removed). An inactive unit's outgoing weights
      (``proj`` columns, ``fc2`` column) are held at exactly zero, so it contributes nothing and the
      export is exact; its incoming weights (q/k/v rows and biases, ``fc1`` row and bias) are kept,
      frozen (their gradient is exactly zero; AdamW's decoupled weight decay still shrinks them).
      Zeroing both sides would put the unit at a saddle (every gradient of an all-zero unit is zero):
      it could never be scored for regrowth nor train again once regrown. With the incoming side
      kept, the outgoing gradient of an inactive unit is informative, and a regrown unit starts
      function-preserving (outgoing weights exactly 0, zero moments) and trains at once.
    * S2ViTE scores come from the all-reduced weight gradients instead of per-rank forward/backward
      hooks: heads are pruned by ``|<W_proj[:, h], dL/dW_proj[:, h]>|``, which equals
      ``|sum over batch and tokens of <dL/d out_h, out_h>|`` (the reference averages the per-sample
      absolute value), and regrown by ``L1(dL/dW_proj[:, h])`` (the reference's
      ``L1(dL/d out_h)`` is zero for a head whose ``proj`` columns are zero). Neurons are regrown by
      ``L1(dL/dW_fc1[j]) + |dL/db_fc1[j]| + L1(dL/dW_fc2[:, j])`` (the reference: the weights only).
      The reference's structured growth by ``random.sample`` is replaced by ``growth: random`` with
      seeded generators.
    * Token selection: ``k`` patch tokens are drawn and the prefix tokens are always kept
      (``k + 1`` tokens for a DeiT); the reference draws ``k`` among all tokens, CLS included, then
      forces CLS (``k`` or ``k + 1`` kept). The selector has no bias (under ``log_softmax`` a bias
      cancels exactly; the reference's gets no gradient). Gumbel noise is drawn from clamped
      uniforms (no resampling loop, no host sync) and the hard mask is scattered on the device (the
      reference's ``.tolist()`` scatter syncs every forward).
    * Token masking in training (``token_masking``): the reference multiplies the dropped tokens by
      zero, but zeroed tokens are not removed: after the next LayerNorm they are non-zero again and
      take part in every attention, so its training forward is not the forward that drops them, and
      its evaluation (tau = 1 with Gumbel noise) is random. Here eval mode really drops them
      (deterministic top-k), and training with ``token_masking: attention`` (default) additionally
      hides the dropped tokens as keys in every block (``_common.policy_attention``), which makes the
      training forward, for the drawn selection, equal to the forward that removes those tokens.
      ``token_masking: zero`` is the reference's training forward.
    * Mixup/cutmix, EMA, distillation and the 600-epoch schedule belong to the loop's config.
    * ``convert_reference_state`` reads the authors' checkpoints (see there); ``fired_mask`` (a
      statistic) is not kept.
"""
from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from ._common import block_forward, check_block, gather_tokens, policy_attention, prefixed, vit_head, vit_stem
from .backbone import CheckpointError
from ._common.trace import kept_stage, traced
from .base import Geometry, Measurement, MethodConfig, MethodOutput, SparsityMethod, StepHooks, TokenStage, register_method

__all__ = [
    "SViTEConfig", "S2ViTEConfig", "SViTE", "SViTEHooks", "SViTEExport", "SViTEMethod", "S2ViTEMethod",
    "erk_densities", "death_rate_at", "tau_at", "update_due", "theoretical_gflops", "export_structured",
    "read_reference_checkpoint",
]

#: Prefixes under which ``read_reference_checkpoint`` returns the authors' sibling mask dicts.
_REF_MASK_DICTS = ("mask", "other_mask", "atten_mask", "fired_mask")
#: The head dimension of every DeiT (SViTE's published backbones), used to split a reference qkv mask into heads.
_REF_HEAD_DIM = 64


# ------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class _SViTECommon(MethodConfig):
    """Knobs shared by SViTE and S2ViTE (schedule, token selection)."""

    update_frequency: int = 15000
    death_rate: float = 0.5
    final_death_rate: float = 0.005
    decay_schedule: Literal["cosine", "constant"] = "cosine"
    t_end: float = 0.8
    growth: Literal["gradient", "random"] = "gradient"
    token_number: int = 0
    tau_start: float = 10.0
    tau_end: float = 0.1
    token_masking: Literal["attention", "zero"] = "attention"
    seed: int = 0
    total_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.update_frequency, bool) or int(self.update_frequency) != self.update_frequency or self.update_frequency < 1:
            raise ValueError(f"update_frequency must be an integer >= 1, got {self.update_frequency!r}")
        object.__setattr__(self, "update_frequency", int(self.update_frequency))
        if not 0.0 <= self.death_rate <= 1.0:
            raise ValueError(f"death_rate must be in [0, 1], got {self.death_rate}")
        if not 0.0 <= self.final_death_rate <= 1.0:
            raise ValueError(f"final_death_rate must be in [0, 1], got {self.final_death_rate}")
        if self.decay_schedule not in ("cosine", "constant"):
            raise ValueError(f"decay_schedule must be 'cosine' or 'constant', got {self.decay_schedule!r}")
        if not 0.0 <= self.t_end <= 1.0:
            raise ValueError(f"t_end must be in [0, 1], got {self.t_end}")
        if self.growth not in ("gradient", "random"):
            raise ValueError(f"growth must be 'gradient' or 'random', got {self.growth!r}")
        for name in ("token_number", "seed", "total_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise ValueError(f"tau_start and tau_end must be > 0, got {self.tau_start}, {self.tau_end}")
        if self.token_masking not in ("attention", "zero"):
            raise ValueError(f"token_masking must be 'attention' or 'zero', got {self.token_masking!r}")

    def validate_for(self, geometry: Geometry) -> None:
        if self.token_number > geometry.num_patches:
            raise ValueError(f"token_number {self.token_number} exceeds the backbone's {geometry.num_patches} patch tokens")

    @property
    def structured(self) -> bool:
        return False


@dataclass(frozen=True)
class SViTEConfig(_SViTECommon):
    """SViTE (unstructured DST), with the README's DeiT-S/B command as defaults.

    Attributes:
        density: global fraction of the masked weights kept (the README's 0.4; 1.0 is dense).
        sparse_init: ``erk`` (the reference's ``fixed_ERK``) or ``uniform`` (every layer at ``density``).
        death: how weights are pruned (``magnitude``, the only mode of the paper's runs).
        update_frequency: optimizer steps between mask updates (15000 for DeiT-S at 8x64 images a step).
        death_rate, final_death_rate: the prune fraction ``dr``, decayed ``death_rate -> final_death_rate``.
        decay_schedule: ``cosine`` (the reference's ``CosineDecay`` over all steps) or ``constant``.
        t_end: no mask update once the step count reaches ``t_end * total_steps``.
        growth: ``gradient`` (RigL: largest |gradient|) or ``random``.
        token_number: patch tokens kept by the SViTE+ token selector; 0 switches it off.
        tau_start, tau_end: the Gumbel temperature, linear over training.
        token_masking: how training hides unselected tokens: ``attention`` (hidden as keys; exact
            w.r.t. removal) or ``zero`` (the reference: multiplied by 0 only).
        seed: seeds the initial masks and random growth (the same on every rank).
        total_steps: optimizer steps of the whole run; 0 lets the loop pass it to ``hooks``.
    """

    density: float = 0.4
    sparse_init: Literal["erk", "uniform"] = "erk"
    death: Literal["magnitude"] = "magnitude"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.sparse_init not in ("erk", "uniform"):
            raise ValueError(f"sparse_init must be 'erk' or 'uniform', got {self.sparse_init!r}")
        if self.death != "magnitude":
            raise ValueError(f"death must be 'magnitude', got {self.death!r}")


@dataclass(frozen=True)
class S2ViTEConfig(_SViTECommon):
    """S2ViTE (structured DST of heads and MLP neurons), with the reference's DeiT-S command as defaults.

    Attributes:
        atten_density: fraction of heads kept per block, ``int(H * atten_density)`` (0.7: 4 of 6).
        other_density: fraction of MLP neurons kept per block, ``int(hidden * other_density)`` (0.6: 921 of 1536).
        (the other fields as ``SViTEConfig``)
    """

    atten_density: float = 0.7
    other_density: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("atten_density", "other_density"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    def validate_for(self, geometry: Geometry) -> None:
        super().validate_for(geometry)
        if int(geometry.num_heads * self.atten_density) < 1:
            raise ValueError(
                f"atten_density {self.atten_density} keeps no head of {geometry.num_heads} "
                f"(int({geometry.num_heads} * {self.atten_density}) = 0)"
            )

    @property
    def structured(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------- schedules


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float, power: float = 1.0) -> dict[str, float]:
    """ERK layer densities for a global ``density`` (the reference's ``fixed_ERK``, without sampling).

    ``d_l = eps * (sum(shape_l) / prod(shape_l)) ** power``, with ``eps`` such that the expected kept
    count ``sum_l d_l n_l`` is ``density * sum_l n_l``; while the largest ``d_l`` exceeds 1, the
    layers with the largest raw probability become dense (``d = 1``) and ``eps`` is solved again
    for the others.
    """
    if density >= 1.0:
        return {name: 1.0 for name in shapes}
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / numel[name]) ** power for name, shape in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(shapes):
        sparse = [n for n in shapes if n not in dense]
        rhs = sum(density * numel[n] for n in sparse) - sum((1.0 - density) * numel[n] for n in dense)
        eps = rhs / sum(raw[n] * numel[n] for n in sparse)
        top = max(raw[n] for n in sparse)
        if top * eps <= 1.0:
            break
        dense |= {n for n in sparse if raw[n] == top}
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def death_rate_at(cfg: _SViTECommon, step: int, total_steps: int) -> float:
    """The prune fraction after ``step`` optimizer steps: cosine ``death_rate -> final_death_rate`` over ``total_steps``."""
    if cfg.decay_schedule == "constant" or total_steps <= 0:
        return float(cfg.death_rate)
    t = min(max(step, 0), total_steps) / total_steps
    return cfg.final_death_rate + (cfg.death_rate - cfg.final_death_rate) * (1.0 + math.cos(math.pi * t)) / 2.0


def tau_at(cfg: _SViTECommon, step: int, total_steps: int) -> float:
    """The Gumbel temperature for the forward of optimizer step ``step`` (the reference's ``get_tau``)."""
    if total_steps <= 0:
        return float(cfg.tau_start)
    t = min(max(step, 0), total_steps) / total_steps
    return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * t


def update_due(cfg: _SViTECommon, steps_done: int, total_steps: int) -> bool:
    """Whether the masks are updated once ``steps_done`` optimizer steps are complete (the reference's
    ``steps % update_frequency == 0 and steps < t_end * total``)."""
    return steps_done > 0 and steps_done % cfg.update_frequency == 0 and steps_done < cfg.t_end * total_steps


# -------------------------------------------------------------------------------------- small pieces


def _masked_layers(vit: nn.Module) -> list[str]:
    """Names (within ``vit``) of the modules whose weight SViTE masks: every Linear and Conv2d."""
    return [n for n, m in vit.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.ndim >= 2]


def _stable_order(score: torch.Tensor, descending: bool) -> torch.Tensor:
    """Indices sorting a flat ``score``; ties keep their positional order (identical on every rank)."""
    return torch.sort(score, descending=descending, stable=True).indices


def _random_scores(shape: tuple[int, ...], seed: int, step: int, slot: int, device: torch.device) -> torch.Tensor:
    """Uniform scores from a generator seeded by (seed, step, slot): the same draw on every rank."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 10_007 + slot) % (2**63 - 1))
    return torch.rand(shape, generator=g).to(device)


def _prune_grow(active: torch.Tensor, prune_score: torch.Tensor, grow_score: torch.Tensor, n: int) -> torch.Tensor:
    """One DST move on flat bool ``active``: drop the ``n`` active entries of lowest ``prune_score``, then
    add the ``n`` entries of highest ``grow_score`` among all inactive ones (just-dropped included)."""
    if n <= 0:
        return active.clone()
    inf = torch.finfo(prune_score.dtype).max
    drop = _stable_order(torch.where(active, prune_score, torch.full_like(prune_score, inf)), descending=False)[:n]
    survivors = active.clone()
    survivors[drop] = False
    grow_score = torch.nan_to_num(grow_score.float(), nan=0.0, posinf=3e38, neginf=0.0)
    grow = _stable_order(torch.where(survivors, torch.full_like(grow_score, -1.0), grow_score), descending=True)[:n]
    new = survivors
    new[grow] = True
    return new


def _active_index(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the ``count`` True entries of a 1-d bool ``mask``, without a host sync."""
    if count == mask.numel():
        return torch.arange(count, device=mask.device)
    return mask.to(torch.float32).topk(count, sorted=False).indices.sort().values


def _head_rows(idx: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of ``qkv.weight`` (``[3 * H * D, C]``) that belong to heads ``idx``: q, then k, then v blocks."""
    d = torch.arange(head_dim, device=idx.device)
    part = torch.arange(3, device=idx.device) * (num_heads * head_dim)
    return (part[:, None, None] + idx[None, :, None] * head_dim + d[None, None, :]).reshape(-1)


def _head_cols(idx: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Columns of ``proj.weight`` (``[C, H * D]``) read from heads ``idx``."""
    return (idx[:, None] * head_dim + torch.arange(head_dim, device=idx.device)[None, :]).reshape(-1)


def _check_structured_block(blk: nn.Module) -> None:
    check_block(blk)
    if not isinstance(blk.attn.norm, nn.Identity):
        raise NotImplementedError("S2ViTE cannot remove heads ahead of a post-attention norm (scale_attn_norm)")
    if not isinstance(blk.mlp, Mlp) or not isinstance(blk.mlp.norm, nn.Identity) or not isinstance(blk.mlp.fc1, nn.Linear):
        raise NotImplementedError("S2ViTE needs timm's plain Mlp (fc1, act, fc2; no hidden norm)")


def _sliced_attention(attn: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """timm's attention (eval) computed with heads ``idx`` only; the others contribute exactly nothing."""
    B, N, _ = x.shape
    h, D = idx.numel(), attn.head_dim
    rows = _head_rows(idx, attn.num_heads, D)
    bias = attn.qkv.bias.index_select(0, rows) if attn.qkv.bias is not None else None
    qkv = F.linear(x, attn.qkv.weight.index_select(0, rows), bias).reshape(B, N, 3, h, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, h * D)
    return attn.proj_drop(F.linear(out, attn.proj.weight.index_select(1, _head_cols(idx, D)), attn.proj.bias))


def _sliced_mlp(mlp: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """timm's Mlp computed with hidden units ``idx`` only."""
    bias = mlp.fc1.bias.index_select(0, idx) if mlp.fc1.bias is not None else None
    x = mlp.drop1(mlp.act(F.linear(x, mlp.fc1.weight.index_select(0, idx), bias)))
    return mlp.drop2(F.linear(mlp.norm(x), mlp.fc2.weight.index_select(1, idx), mlp.fc2.bias))


# ------------------------------------------------------------------------------------------- models


class _TokenSelector(nn.Module):
    """SViTE+'s token scorer: ``Linear(C, 1)`` (no bias: it would cancel under ``log_softmax``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1, bias=False)
        trunc_normal_(self.score.weight, std=0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.score(patches).squeeze(-1)  # [B, N]


def _gumbel_topk(scores: torch.Tensor, k: int, tau: torch.Tensor) -> torch.Tensor:
    """Hard Gumbel top-k over the last dim, straight-through: values exactly 0/1, gradient of the soft sample."""
    logp = F.log_softmax(scores.float(), dim=-1)
    u = torch.rand_like(logp).clamp_(min=1e-10, max=1.0 - 1e-7)
    y_soft = ((logp - torch.log(-torch.log(u))) / tau).softmax(dim=-1)
    index = y_soft.detach().topk(k, dim=-1).indices
    y_hard = torch.zeros_like(y_soft).scatter_(-1, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def _select_eval(vit: nn.Module, selector: _TokenSelector, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode token selection: keep the prefix tokens and the ``k`` best-scoring patches, in spatial
    order. Returns the new sequence and the kept patches' indices ``[B, k]``."""
    npre = vit.num_prefix_tokens
    keep = selector(x[:, npre:]).topk(k, dim=-1).indices.sort(dim=-1).values
    return gather_tokens(x, prefixed(keep, npre)), keep


class SViTE(nn.Module):
    """A timm ViT under SViTE's masks (unstructured weights, or heads and neurons), with an optional token selector.

    Buffers: ``<param>_mask`` per masked weight (``svite``) or ``attn.head_mask``/``mlp.neuron_mask``
    per block (``s2vite``), and the schedule: ``dst_step`` (optimizer steps done), ``death_rate``
    (current prune fraction) and, with token selection, ``gumbel_tau``.
    """

    def __init__(self, vit: VisionTransformer, cfg: _SViTECommon) -> None:
        super().__init__()
        cfg.validate_for(Geometry.of(vit))
        for blk in vit.blocks:
            (_check_structured_block if cfg.structured else check_block)(blk)
        self.vit = vit
        self.cfg = cfg
        self.structured = cfg.structured
        self.token_number = cfg.token_number
        self.selector = _TokenSelector(vit.embed_dim) if cfg.token_number else None
        self.register_buffer("dst_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("death_rate", torch.tensor(float(cfg.death_rate)))
        if self.selector is not None:
            self.register_buffer("gumbel_tau", torch.tensor(float(cfg.tau_start)))
        gen = torch.Generator().manual_seed(cfg.seed)
        self.masked_layers: list[str] = []
        self.heads_active = self.neurons_active = 0
        if self.structured:
            self._init_units(cfg, gen)
        else:
            self._init_weight_masks(cfg, gen)
        self.enforce_masks()

    # -- masks

    def _init_weight_masks(self, cfg: SViTEConfig, gen: torch.Generator) -> None:
        if cfg.density >= 1.0:
            return
        names = _masked_layers(self.vit)
        shapes = {n: tuple(self.vit.get_submodule(n).weight.shape) for n in names}
        if cfg.sparse_init == "erk":
            densities = erk_densities(shapes, cfg.density)
        else:
            densities = {n: cfg.density for n in names}
        for n in names:
            module = self.vit.get_submodule(n)
            numel = module.weight.numel()
            keep = min(numel, max(1, round(densities[n] * numel)))
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[torch.randperm(numel, generator=gen)[:keep]] = True
            module.register_buffer("weight_mask", mask.view_as(module.weight).to(module.weight.device))
        self.masked_layers = names

    def _init_units(self, cfg: S2ViTEConfig, gen: torch.Generator) -> None:
        blk0 = self.vit.blocks[0]
        num_heads, hidden = blk0.attn.num_heads, blk0.mlp.fc1.out_features
        self.heads_active = int(num_heads * cfg.atten_density)
        self.neurons_active = int(hidden * cfg.other_density)
        if self.neurons_active < 1:
            raise ValueError(f"other_density {cfg.other_density} keeps no MLP neuron of {hidden}")
        for blk in self.vit.blocks:
            if blk.attn.num_heads != num_heads or blk.mlp.fc1.out_features != hidden:
                raise NotImplementedError("S2ViTE needs the same heads and MLP width in every block")
            heads = torch.zeros(num_heads, dtype=torch.bool)
            heads[torch.randperm(num_heads, generator=gen)[: self.heads_active]] = True
            neurons = torch.zeros(hidden, dtype=torch.bool)
            neurons[torch.randperm(hidden, generator=gen)[: self.neurons_active]] = True
            device = blk.attn.qkv.weight.device
            blk.attn.register_buffer("head_mask", heads.to(device))
            blk.mlp.register_buffer("neuron_mask", neurons.to(device))

    def weight_masks(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every unstructured-masked layer; the module has ``weight`` and ``weight_mask``."""
        return [(n, self.vit.get_submodule(n)) for n in self.masked_layers]

    @torch.no_grad()
    def enforce_masks(self) -> None:
        """Zero every masked weight (``svite``), or the outgoing weights of inactive units (``s2vite``)."""
        for _, m in self.weight_masks():
            m.weight.masked_fill_(~m.weight_mask, 0.0)
        if self.structured:
            for blk in self.vit.blocks:
                attn, mlp = blk.attn, blk.mlp
                attn.proj.weight.view(attn.proj.out_features, attn.num_heads, attn.head_dim).masked_fill_(
                    ~attn.head_mask.view(1, -1, 1), 0.0
                )
                mlp.fc2.weight.masked_fill_(~mlp.neuron_mask.view(1, -1), 0.0)

    # -- forward

    def forward(self, x: torch.Tensor) -> MethodOutput:
        x = vit_stem(self.vit, x)
        aux: dict = {}
        policy = None
        if self.selector is not None:
            if self.training:
                npre = self.vit.num_prefix_tokens
                keep = _gumbel_topk(self.selector(x[:, npre:]), self.token_number, self.gumbel_tau).to(x.dtype)
                policy = torch.cat([keep.new_ones(keep.shape[0], npre), keep], dim=1)
                x = x * policy.unsqueeze(-1)
                aux["token_mask"] = keep.detach()
            else:
                x, aux["keep_index"] = _select_eval(self.vit, self.selector, x, self.token_number)
        sliced = self.structured and not self.training
        for blk in self.vit.blocks:
            if sliced:
                x = self._sliced_block(blk, x)
            elif policy is not None and self.cfg.token_masking == "attention":
                x = block_forward(blk, x, lambda h, blk=blk: policy_attention(blk.attn, h, policy))
            else:
                x = blk(x)
        logits, tokens = vit_head(self.vit, x)
        aux["tokens"] = tokens
        return MethodOutput(logits, aux)

    def _sliced_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn, mlp = blk.attn, blk.mlp
        if self.heads_active == attn.num_heads and self.neurons_active == mlp.fc1.out_features:
            return blk(x)
        heads = _active_index(attn.head_mask, self.heads_active)
        x = x + blk.drop_path1(blk.ls1(_sliced_attention(attn, blk.norm1(x), heads)))
        neurons = _active_index(mlp.neuron_mask, self.neurons_active)
        return x + blk.drop_path2(blk.ls2(_sliced_mlp(mlp, blk.norm2(x), neurons)))

    # -- reporting

    @torch.no_grad()
    def layer_densities(self) -> dict[str, float]:
        """Kept fraction of each masked layer (``svite``)."""
        return {n: float(m.weight_mask.float().mean()) for n, m in self.weight_masks()}

    @torch.no_grad()
    def density(self) -> float:
        """Kept fraction of all masked weights (``svite``; 1.0 without masks)."""
        layers = self.weight_masks()
        if not layers:
            return 1.0
        kept = sum(int(m.weight_mask.sum()) for _, m in layers)
        return kept / sum(m.weight_mask.numel() for _, m in layers)


class SViTEExport(nn.Module):
    """What S2ViTE's inference runs: a physically smaller timm ViT (and the token selector, if any)."""

    def __init__(self, vit: VisionTransformer, selector: _TokenSelector | None, token_number: int) -> None:
        super().__init__()
        self.vit = vit
        self.selector = selector
        self.token_number = token_number

    def forward(self, x: torch.Tensor) -> MethodOutput:
        x = vit_stem(self.vit, x)
        if self.selector is not None:
            x, _ = _select_eval(self.vit, self.selector, x, self.token_number)
        x = self.vit.blocks(x)
        logits, tokens = vit_head(self.vit, x)
        return MethodOutput(logits, {"tokens": tokens})


def _linear_like(src: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.train(src.training)
    return layer


#: Exported MLP widths are rounded up to a multiple of this with zero neurons (see ``export_structured``).
MLP_ALIGN = 8


@torch.no_grad()
def export_structured(model: SViTE, align: int = MLP_ALIGN) -> SViTEExport:
    """The masked S2ViTE model as a smaller timm network: inactive heads and neurons removed.

    Deviation from the reference (which only masks): the MLP keeps its active neurons plus zero ones
    up to a multiple of ``align`` (921 of DeiT-S's 1536 at density 0.6 becomes 928). A zero neuron
    (zero ``fc1`` row and bias, zero ``fc2`` column) adds exactly nothing, so the function is the
    masked model's; the GEMMs stay aligned for tensor cores. Measured on an H100 at batch 256 in
    bf16: with 921 neurons cuBLAS fell back to an ``align1`` kernel and S2ViTE ran at 0.69x the dense
    DeiT-S; the zero neurons cost 0.8% more MLP FLOPs, counted in its GFLOPs.
    """
    vit = copy.deepcopy(model.vit)
    for blk in vit.blocks:
        attn, mlp = blk.attn, blk.mlp
        heads = _active_index(attn.head_mask, model.heads_active)
        neurons = _active_index(mlp.neuron_mask, model.neurons_active)
        rows, cols = _head_rows(heads, attn.num_heads, attn.head_dim), _head_cols(heads, attn.head_dim)
        qkv_bias = attn.qkv.bias.index_select(0, rows) if attn.qkv.bias is not None else None
        attn.qkv = _linear_like(attn.qkv, attn.qkv.weight.index_select(0, rows), qkv_bias)
        attn.proj = _linear_like(attn.proj, attn.proj.weight.index_select(1, cols), attn.proj.bias)
        attn.num_heads = heads.numel()
        attn.attn_dim = heads.numel() * attn.head_dim
        extra = -neurons.numel() % align  # zero neurons up to the next multiple of ``align``
        fc1_bias = F.pad(mlp.fc1.bias.index_select(0, neurons), (0, extra)) if mlp.fc1.bias is not None else None
        mlp.fc1 = _linear_like(mlp.fc1, F.pad(mlp.fc1.weight.index_select(0, neurons), (0, 0, 0, extra)), fc1_bias)
        mlp.fc2 = _linear_like(mlp.fc2, F.pad(mlp.fc2.weight.index_select(1, neurons), (0, extra)), mlp.fc2.bias)
        del attn.head_mask, mlp.neuron_mask
    selector = copy.deepcopy(model.selector) if model.selector is not None else None
    return SViTEExport(vit, selector, model.token_number).train(model.training)


# -------------------------------------------------------------------------------------------- hooks


class SViTEHooks(StepHooks):
    """SViTE's per-step work: mask gradients, re-apply masks, advance the schedule, prune and grow.

    ``after_backward(step)``: on an update step, record the growth (and head Taylor) scores from the
    all-reduced gradients; then zero the gradients of masked weights / inactive units.
    ``after_optimizer_step(step)``: re-apply the masks, store ``dst_step = step + 1``, the death rate
    and the next temperature, and when ``update_due(step + 1)`` prune and grow every layer.
    """

    def __init__(self, model: SViTE, cfg: _SViTECommon, optimizer: torch.optim.Optimizer | None, total_steps: int) -> None:
        self.model = model
        self.cfg = cfg
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self._scores: dict | None = None

    @property
    def _dynamic(self) -> bool:
        m = self.model
        return bool(m.masked_layers) or m.structured or m.selector is not None

    def _check_total(self) -> None:
        if self.total_steps <= 0 and self._dynamic:
            raise ValueError(
                "SViTE's schedules need the run's total optimizer steps: call hooks(model, cfg, optimizer, "
                "total_steps=epochs * steps_per_epoch) or set the config's total_steps"
            )

    def _due(self, step: int) -> bool:
        return update_due(self.cfg, step + 1, self.total_steps) and self.cfg.death_rate > 0

    # -- after backward

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        self._check_total()
        m = self.model
        self._scores = None
        if self._due(step) and self.cfg.growth == "gradient":
            self._scores = self._unit_scores() if m.structured else self._weight_scores()
        elif self._due(step) and m.structured:
            self._scores = self._unit_scores()  # the head Taylor scores prune even with random growth
        for _, layer in m.weight_masks():
            if layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(~layer.weight_mask, 0.0)
        if m.structured:
            for blk in m.vit.blocks:
                _mask_unit_grads(blk)

    def _weight_scores(self) -> dict[str, torch.Tensor]:
        return {n: (l.weight.grad.abs() if l.weight.grad is not None else torch.zeros_like(l.weight)) for n, l in self.model.weight_masks()}

    def _unit_scores(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for blk in self.model.vit.blocks:
            attn, mlp = blk.attn, blk.mlp
            H, D = attn.num_heads, attn.head_dim
            w = attn.proj.weight.view(-1, H, D)
            g = _grad(attn.proj.weight).view(-1, H, D)
            g1, g2 = _grad(mlp.fc1.weight), _grad(mlp.fc2.weight)
            neuron_grow = g1.abs().sum(1) + g2.abs().sum(0)
            if mlp.fc1.bias is not None:
                neuron_grow = neuron_grow + _grad(mlp.fc1.bias).abs()
            out.append({
                "head_taylor": (w * g).sum(dim=(0, 2)).abs().float(),
                "head_grow": g.abs().sum(dim=(0, 2)).float(),
                "neuron_grow": neuron_grow.float(),
            })
        return out

    # -- after the optimizer step

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        self._check_total()
        m = self.model
        m.enforce_masks()
        done = step + 1
        dr = death_rate_at(self.cfg, done, self.total_steps)
        m.dst_step.fill_(done)
        m.death_rate.fill_(dr)
        if m.selector is not None:
            m.gumbel_tau.fill_(tau_at(self.cfg, done, self.total_steps))
        if self._due(step):
            if m.structured:
                self._update_units(done, dr)
            else:
                self._update_weights(done, dr)
        self._scores = None

    def _update_weights(self, done: int, dr: float) -> None:
        for slot, (name, layer) in enumerate(self.model.weight_masks()):
            mask = layer.weight_mask
            nnz = int(mask.sum())
            if nnz == mask.numel():
                continue  # a dense layer stays dense (the reference skips it too)
            n = min(nnz, math.ceil(dr * nnz))
            if self.cfg.growth == "gradient":
                grow = self._scores[name].flatten() if self._scores is not None else torch.zeros(mask.numel(), device=mask.device)
            else:
                grow = _random_scores((mask.numel(),), self.cfg.seed, done, slot, mask.device)
            old = mask.flatten()
            new = _prune_grow(old, layer.weight.detach().abs().flatten().float(), grow, n)
            changed = (old ^ new).view_as(mask)
            mask.copy_(new.view_as(mask))
            layer.weight.masked_fill_(~mask | changed, 0.0)  # pruned -> 0; grown start at exactly 0
            _zero_optimizer_state(self.optimizer, layer.weight, changed)

    def _update_units(self, done: int, dr: float) -> None:
        for i, blk in enumerate(self.model.vit.blocks):
            attn, mlp = blk.attn, blk.mlp
            scores = self._scores[i] if self._scores is not None else None
            # MLP neurons: prune the lowest L1(fc1 row) + L1(fc2 column), grow by gradient L1.
            old = mlp.neuron_mask.clone()
            n = math.ceil(dr * self.model.neurons_active)
            prune = mlp.fc1.weight.abs().sum(1) + mlp.fc2.weight.abs().sum(0)
            grow = self._grow_score(scores, "neuron_grow", old.numel(), done, 2 * i, old.device)
            new = _prune_grow(old, prune.float(), grow, min(n, self.model.neurons_active))
            mlp.neuron_mask.copy_(new)
            changed = old ^ new
            for p, sel in _neuron_params(mlp, changed):
                _zero_optimizer_state(self.optimizer, p, sel)
            # Heads: prune the lowest Taylor score, grow by the gradient L1 of their proj columns.
            old = attn.head_mask.clone()
            n = math.ceil(dr * self.model.heads_active)
            prune = scores["head_taylor"] if scores is not None else torch.zeros(old.numel(), device=old.device)
            grow = self._grow_score(scores, "head_grow", old.numel(), done, 2 * i + 1, old.device)
            new = _prune_grow(old, prune, grow, min(n, self.model.heads_active))
            attn.head_mask.copy_(new)
            changed = old ^ new
            for p, sel in _head_params(attn, changed):
                _zero_optimizer_state(self.optimizer, p, sel)
        self.model.enforce_masks()

    def _grow_score(self, scores, key: str, size: int, done: int, slot: int, device: torch.device) -> torch.Tensor:
        if self.cfg.growth == "random":
            return _random_scores((size,), self.cfg.seed, done, slot, device)
        return scores[key] if scores is not None else torch.zeros(size, device=device)


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _head_params(attn: nn.Module, heads: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, bool selection of its elements) for every parameter slice of heads ``heads``."""
    H, D = attn.num_heads, attn.head_dim
    rows = heads.view(1, H, 1).expand(3, H, D).reshape(-1)
    cols = heads.view(H, 1).expand(H, D).reshape(-1)
    out = [(attn.qkv.weight, rows[:, None].expand_as(attn.qkv.weight)), (attn.proj.weight, cols[None, :].expand_as(attn.proj.weight))]
    if attn.qkv.bias is not None:
        out.append((attn.qkv.bias, rows))
    return out


def _neuron_params(mlp: nn.Module, neurons: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, bool selection of its elements) for every parameter slice of neurons ``neurons``."""
    out = [(mlp.fc1.weight, neurons[:, None].expand_as(mlp.fc1.weight)), (mlp.fc2.weight, neurons[None, :].expand_as(mlp.fc2.weight))]
    if mlp.fc1.bias is not None:
        out.append((mlp.fc1.bias, neurons))
    return out


def _mask_unit_grads(blk: nn.Module) -> None:
    """Zero the gradients of every parameter slice of the inactive heads and neurons of ``blk``."""
    for p, sel in _head_params(blk.attn, ~blk.attn.head_mask) + _neuron_params(blk.mlp, ~blk.mlp.neuron_mask):
        if p.grad is not None:
            p.grad.masked_fill_(sel, 0.0)


def _zero_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero every per-element optimizer buffer of ``param`` (AdamW moments, SGD momentum) at ``where``."""
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(where, 0)


# -------------------------------------------------------------------------------------- measurement


def theoretical_gflops(model: SViTE, image_shape: tuple[int, int, int], gflops: float | None = None) -> float:
    """GMACs if every masked weight were skipped (sparse kernels): the measured dense-kernel graph's
    ``gflops`` minus ``sum_l rows_l * numel(W_l) * (1 - density_l)`` over the masked layers, ``rows_l``
    being the vectors layer ``l`` sees in one image's eval forward: the patches for the patch
    embedding, the tokens in the blocks (``token_number`` + prefix with token selection), 1 outside
    (the head reads the pooled token)."""
    from .measure import count_gflops

    if gflops is None:
        gflops = count_gflops(model, image_shape)
    vit = model.vit
    num_patches = int(vit.patch_embed.num_patches)
    tokens = vit.num_prefix_tokens + (model.token_number if model.selector is not None else num_patches)
    saved = 0.0
    for name, layer in model.weight_masks():
        rows = num_patches if name.startswith("patch_embed.") else tokens if name.startswith("blocks.") else 1
        saved += rows * layer.weight.numel() * (1.0 - float(layer.weight_mask.float().mean()))
    return gflops - saved / 1e9


# ------------------------------------------------------------------------------------ the reference


def read_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """An authors' SViTE checkpoint as one flat dict of tensors, for ``convert_reference_state``.

    ``model`` (DDP prefixes removed) as is; the sibling mask dicts under ``mask/<key>``,
    ``other_mask/<key>``, ``atten_mask/<key>`` (their keys as written, e.g.
    ``module.blocks.0.attn.qkv.weight_12`` or ``module.blocks.0.mlp.fc1.weight_mask``), and
    ``mask_step`` as a 0-d tensor. ``methods.checkpoint.read_state_dict`` keeps only ``model``, and
    cannot unpickle the ``args`` Namespace these files hold; this reader allows exactly that class.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a corrupt or foreign file
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable SViTE checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: no 'model' state dict in it")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj["model"].items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    for group in _REF_MASK_DICTS[:3]:
        for key, value in (obj.get(group) or {}).items():
            out[f"{group}/{key}"] = torch.as_tensor(value)
    if "mask_step" in obj:
        out["mask_step"] = torch.tensor(int(obj["mask_step"]))
    return out


def _strip_ref_mask_key(key: str) -> str:
    """``module.blocks.0.attn.qkv.weight_12`` -> ``blocks.0.attn.qkv.weight``; ``..._mask`` -> the parameter."""
    while key.startswith("module."):
        key = key[len("module."):]
    stem, _, tail = key.rpartition("_")
    if not stem or not (tail.isdigit() or tail == "mask"):
        raise CheckpointError(f"unrecognised SViTE mask key {key!r}")
    return stem


def _convert_reference(state: dict[str, torch.Tensor], cfg: _SViTECommon) -> dict[str, torch.Tensor]:
    masks: dict[str, dict[str, torch.Tensor]] = {g: {} for g in _REF_MASK_DICTS}
    out: dict[str, torch.Tensor] = {}
    step = 0
    for key, value in state.items():
        group, sep, rest = key.partition("/")
        if sep and group in masks:
            masks[group][_strip_ref_mask_key(rest)] = value
        elif key == "mask_step":
            step = int(value)
        elif key == "gumbel.weight":
            out["selector.score.weight"] = value  # the reference's token scorer (CLS scores are unused here)
        elif key == "gumbel.bias":
            continue  # a constant shift of every score: no effect under log_softmax
        else:
            out["vit." + key] = value
    if cfg.structured:
        _convert_units(out, masks, cfg)
    elif cfg.density < 1.0:
        for key in [k for k in out if k.endswith(".weight") and out[k].ndim in (2, 4) and not k.startswith("selector.")]:
            ref = masks["mask"].get(key[len("vit."):])
            out[key + "_mask"] = (ref if ref is not None else out[key]) != 0
    total = cfg.total_steps
    out["dst_step"] = torch.tensor(step, dtype=torch.long)
    out["death_rate"] = torch.tensor(death_rate_at(cfg, step, total) if total else float(cfg.death_rate))
    if cfg.token_number:
        out["gumbel_tau"] = torch.tensor(tau_at(cfg, step, total) if total else float(cfg.tau_end))
    return out


def _convert_units(out: dict[str, torch.Tensor], masks: dict[str, dict[str, torch.Tensor]], cfg: S2ViTEConfig) -> None:
    """Head and neuron masks from the reference's ``atten_mask``/``other_mask`` (or, without them, from
    the zero rows of the masked weights); the inactive heads' bias-only output is folded into ``proj.bias``."""
    blocks = sorted({int(k.split(".")[2]) for k in out if k.startswith("vit.blocks.")})
    for i in blocks:
        pre = f"vit.blocks.{i}."
        qkv_w, proj_w, proj_b = out[pre + "attn.qkv.weight"], out[pre + "attn.proj.weight"], out.get(pre + "attn.proj.bias")
        qkv_b = out.get(pre + "attn.qkv.bias")
        C = qkv_w.shape[1]
        if C % _REF_HEAD_DIM:
            raise CheckpointError(f"block {i}: width {C} is not a multiple of DeiT's head dim {_REF_HEAD_DIM}")
        H, D = C // _REF_HEAD_DIM, _REF_HEAD_DIM
        ref = masks["atten_mask"].get(f"blocks.{i}.attn.qkv.weight")
        rows = (ref if ref is not None else qkv_w).ne(0).view(3, H, D, -1)
        heads = rows.any(dim=(2, 3)).any(dim=0)
        if ref is not None and not bool((rows == heads.view(1, H, 1, 1)).all()):
            raise CheckpointError(f"block {i}: the reference's qkv mask does not toggle whole heads")
        ref = masks["other_mask"].get(f"blocks.{i}.mlp.fc1.weight")
        neurons = (ref if ref is not None else out[pre + "mlp.fc1.weight"]).ne(0).any(dim=1)
        want_h, want_n = int(H * cfg.atten_density), int(neurons.numel() * cfg.other_density)
        if int(heads.sum()) != want_h or int(neurons.sum()) != want_n:
            raise CheckpointError(
                f"block {i}: the checkpoint keeps {int(heads.sum())} heads and {int(neurons.sum())} neurons, "
                f"the config {want_h} (atten_density {cfg.atten_density}) and {want_n} (other_density {cfg.other_density})"
            )
        proj_w = proj_w.clone().view(-1, H, D)
        if qkv_b is not None and proj_b is not None:
            # A reference head with zero q/k/v rows still outputs its v bias at every token (uniform
            # attention over identical values): fold that constant into proj.bias, then drop the columns.
            b_v = qkv_b.view(3, H, D)[2]
            out[pre + "attn.proj.bias"] = proj_b + torch.einsum("ohd,hd->o", proj_w * (~heads).view(1, H, 1), b_v)
        proj_w[:, ~heads] = 0
        out[pre + "attn.proj.weight"] = proj_w.view(-1, H * D)
        fc2 = out[pre + "mlp.fc2.weight"].clone()
        fc2[:, ~neurons] = 0
        out[pre + "mlp.fc2.weight"] = fc2
        out[pre + "attn.head_mask"] = heads
        out[pre + "mlp.neuron_mask"] = neurons


# ------------------------------------------------------------------------------------------ methods


class _SViTEBase(SparsityMethod):
    needs_pretrained = False
    #: DDP need not broadcast this method's buffers every forward: every rank computes identical masks.
    broadcast_buffers = False

    def build_model(self, cfg: _SViTECommon, base: nn.Module) -> nn.Module:
        return SViTE(base, cfg)

    def hooks(
        self, model: nn.Module, cfg: _SViTECommon, optimizer: torch.optim.Optimizer | None = None, total_steps: int | None = None,
    ) -> StepHooks:
        """``total_steps``: the run's optimizer steps (``epochs * len(train_loader)``); defaults to ``cfg.total_steps``."""
        model = getattr(model, "module", model)
        return SViTEHooks(model, cfg, optimizer, total_steps or cfg.total_steps)

    def stats(self, model: nn.Module, out: MethodOutput | None = None) -> dict[str, float]:
        """Per step: ``death_rate`` and ``gumbel_tau``; at the end also ``density`` (or the unit densities)."""
        model = getattr(model, "module", model)
        stats = {"death_rate": float(model.death_rate)}
        if model.selector is not None:
            stats["gumbel_tau"] = float(model.gumbel_tau)
        if out is None:
            stats.update(_structure_stats(model))
        return stats

    def token_trace(self, model: nn.Module, images: torch.Tensor) -> list[TokenStage] | None:
        """SViTE+ (``token_number > 0``): the ``k`` patches the selector keeps, once, before block 0; None without it."""
        if getattr(model, "module", model).selector is None:
            return None
        with traced(model) as m:
            keep = m(images).aux["keep_index"]
        return [kept_stage(0, keep, m.vit.patch_embed.num_patches)]

    def read_reference_state(self, path: str | Path) -> dict[str, torch.Tensor]:
        """The authors' checkpoint file with its sibling mask dicts (``read_reference_checkpoint``), for a
        loader that asks the method to read its own reference layout."""
        return read_reference_checkpoint(path)

    def convert_reference_state(self, state: dict[str, torch.Tensor], cfg: _SViTECommon) -> dict[str, torch.Tensor]:
        """The authors' checkpoint -> this model's keys.

        ``state`` is either the ``model`` dict alone (what ``methods.checkpoint.read_state_dict``
        returns) or ``read_reference_checkpoint``'s flat dict with the sibling mask dicts. Key map:
        backbone ``<k>`` -> ``vit.<k>``; ``gumbel.weight`` -> ``selector.score.weight`` (``gumbel.bias``
        dropped, see the module docstring); unstructured ``mask/[module.]<param>_<idx>`` ->
        ``vit.<param>_mask``; structured ``atten_mask/[module.]blocks.{i}.attn.qkv.weight_mask`` ->
        ``vit.blocks.{i}.attn.head_mask`` (DeiT head dim 64) and
        ``other_mask/[module.]blocks.{i}.mlp.fc1.weight_mask`` -> ``vit.blocks.{i}.mlp.neuron_mask``;
        ``mask_step`` -> ``dst_step``. Without the mask dicts the masks are read off the zeros of the
        masked weights (the reference zeroes them after every step). Keys the map does not know come
        back unchanged, so the loader refuses them.
        """
        return _convert_reference(state, cfg)

    def measure(self, model, dense, cfg, loader, image_shape, device, measure_cfg) -> Measurement:
        from .measure import measure_pair

        model = getattr(model, "module", model)
        run = self.inference_model(model, cfg)
        metrics = measure_pair(run, dense, image_shape, device, measure_cfg)
        metrics.update(_structure_stats(model))
        metrics["params_m_inference"] = sum(p.numel() for p in run.parameters()) / 1e6
        if model.masked_layers:
            metrics["gflops_theoretical"] = theoretical_gflops(model, image_shape, metrics["gflops"])
            metrics["params_m_nonzero"] = _nonzero_params(model) / 1e6
        return Measurement(metrics)


def _structure_stats(model: SViTE) -> dict[str, float]:
    if model.structured:
        blk = model.vit.blocks[0]
        return {
            "head_density": model.heads_active / blk.attn.num_heads,
            "neuron_density": model.neurons_active / blk.mlp.fc1.out_features,
        }
    return {"density": model.density()}


def _nonzero_params(model: SViTE) -> int:
    """Parameters that are not masked away (masked weights count their kept entries only)."""
    masked = {id(m.weight): int(m.weight_mask.sum()) for _, m in model.weight_masks()}
    return sum(masked.get(id(p), p.numel()) for p in model.parameters())


@register_method("svite")
class SViTEMethod(_SViTEBase):
    """SViTE: unstructured DST (ERK masks, magnitude death, gradient growth); SViTE+ with ``token_number``."""

    config_cls = SViTEConfig

    def inference_model(self, model: nn.Module, cfg: SViTEConfig) -> nn.Module:
        """The masked model itself: zeros in dense tensors, run with dense kernels (no speed-up from them)."""
        return model


@register_method("s2vite")
class S2ViTEMethod(_SViTEBase):
    """S2ViTE: structured DST of attention heads and MLP neurons; SViTE+ token selection with ``token_number``."""

    config_cls = S2ViTEConfig

    def inference_model(self, model: nn.Module, cfg: S2ViTEConfig) -> nn.Module:
        """A physically smaller timm network (``export_structured``)."""
        return export_structured(getattr(model, "module", model))
