"""Evo-ViT: slow-fast token evolution, with global class attention picking the informative tokens.

Xu et al., "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer", AAAI 2022,
https://arxiv.org/abs/2108.01390. Reference code: YifanXu74/Evo-ViT at 4c5d9b3
(``deit/evo_deit.py``, ``engine_deit.py``; the full slow-fast update is in ``levit/evo_levit.py``).

Global class attention ``g`` (one score per patch token) is the CLS query's attention row over the
patch keys, summed over heads: block 0 sets it, blocks before ``prune_location`` replace it, and
from ``prune_location`` on the tokens that ran the block update it, ``g <- (1 - t) g + t row``
(``t = tradeoff``) while the other tokens keep theirs. Before each stage start the patches are
sorted by ``g`` (descending) and the top ``K = int(N * prune_ratio)`` run the stage's blocks (the
slow path) with the prefix token(s); the other ``N - K`` (placeholders) are concatenated back after
the stage. With ``fast_update`` (the paper's slow-fast update, as in the LeViT code) a representative
token ``sum_j (g_j / sum g) x_j`` over the placeholders is appended to the slow-path sequence and the
representative's residual increment of every attention and MLP branch is added to all placeholders;
without it the placeholders skip the stage unchanged, bit for bit (the DeiT code). Tokens are really
dropped in training and in eval mode. Eval logits are ``head(norm(mean of all patch tokens))``;
training adds ``head_cls(norm_cls(CLS))`` and the loss is ``0.5 L(mean head) + 0.5 L(CLS head)``.

Differences from the reference:
    * prunetune fine-tunes a trained dense timm ViT; the paper trains 300 epochs from scratch. So
      ``head_cls``/``norm_cls`` start as copies of the dense ``head``/``norm``, and the mean-pool
      head starts from the dense CLS head (``vit.head``, the reference's ``head``).
    * The attention is timm's own ``Block`` (fused SDPA, the dense baseline's kernel); the CLS row
      for ``g`` is a separate one-query softmax (no attention dropout on it; the reference takes
      it from the dropped-out matrix, attn_drop is 0 in its recipes). Rows are computed only for
      blocks whose ``g`` is still used by a later selection.
    * ``fast_update`` brings the LeViT code's representative token to the DeiT model (the DeiT code
      has none). The tradeoff is a fixed number as in the DeiT code (LeViT learns ``sigmoid(p)``),
      and ``g`` is a head sum as in the DeiT code (LeViT: head mean; the normalised representative
      weights and the sort are the same either way). The representative's normaliser is clamped at
      the dtype's smallest normal, so all-zero placeholder scores give a zero token, not NaN.
    * Stage starts are configurable (``stage_starts``; default: ``prune_location`` and the middle of
      the remaining blocks, i.e. 4 and 8 for 12 blocks, the reference's hard-coded schedule).
    * Sorting is stable (ties keep their order), the token order is tracked, and ``aux["tokens"]``
      comes back in the original spatial order; the mean-pool head averages that ordering.
      Evaluation concatenates instead of writing slices in place (one code path, autograd-safe).
    * The layer-wise mode (``layerwise_epochs``; the reference hard-codes epoch 200) is switched by
      ``StepHooks.on_epoch_end`` and applies to training forwards only: evaluation is always
      stage-wise (the reference's flag leaked into evaluation). Its epoch counter is saved in the
      state dict (``layerwise._extra_state``), so a resumed run continues in the right mode.
    * DeiT distillation-token backbones: the distillation token is a prefix token (never pruned, not
      in ``g``); its head reads ``norm_cls`` like the CLS head. DeiT's ``DistillationLoss`` is applied
      to both heads with the distillation head as the KD output, i.e.
      ``(1 - alpha) (0.5 CE(mean) + 0.5 CE(cls)) + alpha KD(dist)``; without a distillation token the
      KD output is the mean-pool head's logits (the reference's DeiT model cannot distill: its
      criterion would raise). With distillation off, a distilled backbone's CLS-head term uses
      ``(head_cls + head_dist) / 2`` (timm's non-distilled training of such a model), so every head
      is trained. Soft KD divides by ``numel`` (batch x classes) exactly as DeiT does.
    * ``eval_head="cls"`` (not in the reference) evaluates with the prefix-token head instead of
      the mean pool; with ``prune_ratio=1`` the model then computes plain timm.
    * Mixup/cutmix, EMA, repeated augmentation and the DeiT-B warm-up checkpoint belong to the loop.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import Block, VisionTransformer

from ._common import fit_backbone, gather_tokens, merge_heads, qkv_heads, sdpa, vit_stem
from ._common.trace import kept_stage, traced
from .base import Geometry, LossOutput, MethodConfig, MethodOutput, SparsityMethod, StepHooks, TaskLoss, TokenStage, register_method

__all__ = ["EvoViTConfig", "EvoViT", "EvoViTMethod"]


@dataclass(frozen=True)
class EvoViTConfig(MethodConfig):
    """Evo-ViT's knobs, with the paper's DeiT defaults.

    Attributes:
        prune_ratio: keep fraction; each stage's slow path keeps ``int(num_patches * prune_ratio)`` patches.
        prune_location: the first pruned block (0-based); earlier blocks replace ``g`` with their row
            and run on all tokens. >= 1 (block 0 computes the first ``g``).
        stage_starts: the blocks before which tokens are re-selected (stage-wise mode). Empty: derived,
            ``(prune_location, prune_location + (depth - prune_location) // 2)`` (one stage when that is
            not later), i.e. (4, 8) for 12 blocks. Given: strictly increasing, starting at ``prune_location``.
        tradeoff: t in ``g <- (1 - t) g + t row`` for the kept tokens from ``prune_location`` on.
        fast_update: the slow-fast update (representative token; its residual increments reach all
            placeholders). False: placeholders skip the stage unchanged (the authors' DeiT code).
        eval_head: "mean" (the reference: mean-pool head) or "cls" (the prefix-token head; timm's).
        layerwise_epochs: training epochs that re-select before every block from ``prune_location``
            (the reference's first 200 of 300); 0 trains stage-wise throughout.
        distill_type: DeiT distillation from the frozen dense teacher: "none", "soft" (KL at ``distill_tau``)
            or "hard" (CE against the teacher's argmax).
        distill_alpha: the distillation term's weight; the task terms get ``1 - alpha``.
        distill_tau: soft distillation temperature.
    """

    prune_ratio: float = 0.5
    prune_location: int = 4
    stage_starts: tuple[int, ...] = ()
    tradeoff: float = 0.5
    fast_update: bool = True
    eval_head: Literal["mean", "cls"] = "mean"
    layerwise_epochs: int = 0
    distill_type: Literal["none", "soft", "hard"] = "none"
    distill_alpha: float = 0.5
    distill_tau: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_starts", tuple(int(i) for i in self.stage_starts))
        if not 0.0 < self.prune_ratio <= 1.0:
            raise ValueError(f"prune_ratio must be in (0, 1], got {self.prune_ratio}")
        if self.prune_location < 1:
            raise ValueError(f"prune_location must be >= 1 (block 0 computes the first class attention), got {self.prune_location}")
        starts = self.stage_starts
        if starts and (starts[0] != self.prune_location or any(b <= a for a, b in zip(starts, starts[1:]))):
            raise ValueError(
                f"stage_starts must be strictly increasing and start at prune_location {self.prune_location}, got {list(starts)}"
            )
        if not 0.0 <= self.tradeoff <= 1.0:
            raise ValueError(f"tradeoff must be in [0, 1], got {self.tradeoff}")
        if self.eval_head not in ("mean", "cls"):
            raise ValueError(f"eval_head must be 'mean' or 'cls', got {self.eval_head!r}")
        if self.layerwise_epochs < 0:
            raise ValueError(f"layerwise_epochs must be >= 0, got {self.layerwise_epochs}")
        if self.distill_type not in ("none", "soft", "hard"):
            raise ValueError(f"distill_type must be 'none', 'soft' or 'hard', got {self.distill_type!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.distill_tau <= 0:
            raise ValueError(f"distill_tau must be > 0, got {self.distill_tau}")

    def validate_for(self, geometry: Geometry) -> None:
        if self.prune_location >= geometry.depth:
            raise ValueError(f"prune_location {self.prune_location} needs more than {geometry.depth} blocks")
        if self.stage_starts and self.stage_starts[-1] >= geometry.depth:
            raise ValueError(f"stage_starts {list(self.stage_starts)} needs more than {geometry.depth} blocks")
        if self.keep_count(geometry.num_patches) < 1:
            raise ValueError(
                f"prune_ratio {self.prune_ratio} keeps no token of {geometry.num_patches} patches "
                f"(int({geometry.num_patches} * {self.prune_ratio}) = 0)"
            )

    def keep_count(self, num_patches: int) -> int:
        """Patch tokens on the slow path: ``int(N * prune_ratio)``, floor as in the reference."""
        return int(num_patches * self.prune_ratio)

    def stages(self, depth: int) -> tuple[int, ...]:
        """The stage starts for a ``depth``-block backbone (``stage_starts``, or the derived default)."""
        if self.stage_starts:
            return self.stage_starts
        second = self.prune_location + (depth - self.prune_location) // 2
        return (self.prune_location, second) if second > self.prune_location else (self.prune_location,)

    def tradeoffs(self, depth: int) -> list[float]:
        """Per-block update weight of ``g``: 1 (replace) before ``prune_location``, ``tradeoff`` from it."""
        return [1.0 if i < self.prune_location else self.tradeoff for i in range(depth)]


class _EpochCounter(nn.Module):
    """Finished training epochs, kept in the state dict so a resumed run trains in the right mode."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs_done = 0

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.epochs_done, dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.epochs_done = int(state)


class EvoViT(nn.Module):
    """A timm ViT whose patches are sorted by global class attention; only the top ones run the blocks.

    ``forward`` returns ``MethodOutput(logits, aux)``: in eval mode the ``eval_head`` logits; in training
    the mean-pool head's, with ``aux["cls_logits"]`` (and ``aux["dist_logits"]`` on a distilled
    backbone). ``aux["tokens"]``: the final normed patch tokens in the original spatial order;
    ``aux["global_attn"]``: ``g`` as sorted at each selection; ``aux["kept_index"]``: original
    positions of the patches the last selection kept, in rank order; ``aux["kept_per_stage"]``:
    ``(block, those positions)`` for every selection.
    """

    def __init__(self, vit: VisionTransformer, cfg: EvoViTConfig) -> None:
        super().__init__()
        geometry = fit_backbone(vit, cfg)
        self.vit = vit
        self.cfg = cfg
        self.head_cls = copy.deepcopy(vit.head)
        self.norm_cls = copy.deepcopy(vit.norm)
        if cfg.layerwise_epochs > 0:
            self.layerwise = _EpochCounter()
        self.num_prefix = geometry.num_prefix_tokens
        self.num_patches = geometry.num_patches
        self.keep = cfg.keep_count(geometry.num_patches)
        self.tradeoffs = cfg.tradeoffs(geometry.depth)
        starts = cfg.stages(geometry.depth)
        ends = [s - 1 for s in starts[1:]] + [geometry.depth - 1]
        self.stage_segments = tuple(zip(starts, ends))
        self.layer_segments = tuple((i, i) for i in range(cfg.prune_location, geometry.depth))

    @property
    def layerwise_active(self) -> bool:
        """Training forwards re-select before every block (the early-epoch mode); never in eval mode."""
        return self.training and self.cfg.layerwise_epochs > 0 and self.layerwise.epochs_done < self.cfg.layerwise_epochs

    def forward(self, images: torch.Tensor) -> MethodOutput:
        x = vit_stem(self.vit, images)
        segments = self.layer_segments if self.layerwise_active else self.stage_segments
        ends = dict(segments)
        last_selection = segments[-1][0]
        npre, n, keep = self.num_prefix, self.num_patches, self.keep
        fast = self.cfg.fast_update and keep < n
        order = torch.arange(n, device=x.device).expand(x.shape[0], n)  # original position of each patch slot
        g = None
        end = -1  # last block of the running segment, -1 outside segments
        held = delta = None
        selections = []
        kept = []  # (block, original positions of the patches running the segment)
        for i, blk in enumerate(self.vit.blocks):
            if i in ends:  # token selection: sort by g, the top K run the segment
                end = ends[i]
                g, rank = g.sort(dim=1, descending=True, stable=True)
                selections.append(g)
                patches = gather_tokens(x, rank, npre)
                order = order.gather(1, rank)
                kept.append((i, order[:, :keep]))
                held = patches[:, keep:]
                parts = [x[:, :npre], patches[:, :keep]]
                if fast:
                    w = g[:, keep:]
                    w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
                    parts.append((w.unsqueeze(-1) * held).sum(1, keepdim=True).to(held.dtype))  # representative token
                    delta = 0
                x = torch.cat(parts, dim=1)
            keys = keep if end >= 0 else n  # patch keys in the sequence (the representative excluded)
            x, row, increments = _evo_block(blk, x, npre, keys, need_row=i < last_selection)
            if row is not None:
                t = self.tradeoffs[i]
                if g is None:
                    g = row
                elif end >= 0:  # kept tokens update, placeholders keep their score
                    g = torch.cat([(1 - t) * g[:, :keep] + t * row, g[:, keep:]], dim=1)
                else:
                    g = (1 - t) * g + t * row
            if end >= 0 and fast:
                delta = delta + increments[0][:, -1:] + increments[1][:, -1:]
            if i == end:  # the placeholders rejoin (fast-updated or unchanged)
                if fast:
                    x, held = x[:, :-1], held + delta
                x = torch.cat([x, held], dim=1)
                end = -1
        out = self._heads(x, order, selections)
        out.aux["kept_per_stage"] = kept
        return out

    def _heads(self, x: torch.Tensor, order: torch.Tensor, selections: list[torch.Tensor]) -> MethodOutput:
        vit, npre = self.vit, self.num_prefix
        patches = x[:, npre:]
        patches = torch.zeros_like(patches).scatter(1, order.unsqueeze(-1).expand_as(patches), patches)  # spatial order
        aux = {"tokens": vit.norm(patches), "global_attn": selections, "kept_index": order[:, : self.keep]}
        if not self.training and self.cfg.eval_head == "cls":
            cls_logits, dist_logits = self._prefix_heads(x)
            logits = cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2
            return MethodOutput(logits, aux)
        logits = vit.head(vit.head_drop(vit.norm(patches.mean(1))))
        if self.training:
            aux["cls_logits"], dist_logits = self._prefix_heads(x)
            if dist_logits is not None:
                aux["dist_logits"] = dist_logits
        return MethodOutput(logits, aux)

    def _prefix_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``head_cls(norm_cls(CLS))`` and, on a distilled backbone, ``head_dist(norm_cls(DIST))``."""
        vit = self.vit
        prefix = vit.head_drop(self.norm_cls(x[:, : self.num_prefix]))
        dist = vit.head_dist(prefix[:, 1]) if self.num_prefix == 2 else None
        return self.head_cls(prefix[:, 0]), dist


def _evo_block(
    blk: Block, x: torch.Tensor, npre: int, keys: int, need_row: bool
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """timm's block on ``x`` (SDPA), with its two residual increments and the CLS row over patch keys.

    Returns the block output, the CLS query's attention over keys ``npre : npre + keys`` summed over
    heads (``[B, keys]``; None unless ``need_row``), and the attention and MLP increments ``[B, n, C]``.
    """
    attn = blk.attn
    q, k, v = qkv_heads(attn, blk.norm1(x))
    row = None
    if need_row:
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, n]: the CLS query only
        row = logits.float().softmax(-1)[:, :, 0, npre : npre + keys].sum(1)
    inc_attn = blk.drop_path1(blk.ls1(merge_heads(attn, sdpa(attn, q, k, v))))
    x = x + inc_attn
    inc_mlp = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x + inc_mlp, row, (inc_attn, inc_mlp)


class _LayerwiseHooks(StepHooks):
    """Counts finished epochs; training forwards are layer-wise while fewer than ``layerwise_epochs``."""

    def __init__(self, model: EvoViT) -> None:
        self.model = model

    def on_epoch_end(self, epoch: int) -> None:
        self.model.layerwise.epochs_done = epoch + 1


#: The reference's (``deit/evo_deit.py``) parameter names -> this model's, per block ``{i}``.
_BLOCK_KEYS = {
    r"norms\.(\d+)\.(weight|bias)": "vit.blocks.{0}.norm1.{1}",
    r"projs\.(\d+)\.(weight|bias)": "vit.blocks.{0}.attn.proj.{1}",
    r"blocks\.(\d+)\.norm2\.(weight|bias)": "vit.blocks.{0}.norm2.{1}",
    r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)": "vit.blocks.{0}.mlp.{1}.{2}",
}
_FLAT_KEYS = {
    "cls_token": "vit.cls_token",
    "dist_token": "vit.dist_token",
    "pos_embed": "vit.pos_embed",
    "patch_embed.proj.weight": "vit.patch_embed.proj.weight",
    "patch_embed.proj.bias": "vit.patch_embed.proj.bias",
    "norm.weight": "vit.norm.weight",
    "norm.bias": "vit.norm.bias",
    "head.weight": "vit.head.weight",
    "head.bias": "vit.head.bias",
    "head_dist.weight": "vit.head_dist.weight",
    "head_dist.bias": "vit.head_dist.bias",
    "head_cls.weight": "head_cls.weight",
    "head_cls.bias": "head_cls.bias",
    "norm_cls.weight": "norm_cls.weight",
    "norm_cls.bias": "norm_cls.bias",
}
_QK = re.compile(r"qks\.(\d+)\.qk\.(weight|bias)")
_VK = re.compile(r"vs\.(\d+)\.v\.(weight|bias)")
_QKF, _V = "qks.{0}.qk.{1}", "vs.{0}.v.{1}"


@register_method("evovit")
class EvoViTMethod(SparsityMethod[EvoViTConfig]):
    config_cls = EvoViTConfig

    def uses_teacher(self, cfg: EvoViTConfig) -> bool:
        """The frozen dense teacher is needed only with DeiT distillation on."""
        return cfg.distill_type != "none"

    def build_model(self, cfg: EvoViTConfig, base: nn.Module) -> nn.Module:
        return EvoViT(base, cfg)

    def loss(
        self,
        out: MethodOutput,
        target: torch.Tensor,
        cfg: EvoViTConfig,
        task_loss: TaskLoss,
        teacher: MethodOutput | None = None,
    ) -> LossOutput:
        """``(1 - a) (0.5 L(mean head) + 0.5 L(CLS head)) + a KD``: DeiT's DistillationLoss on both heads."""
        if "cls_logits" not in out.aux:
            raise ValueError("Evo-ViT's loss needs a training-mode output (aux['cls_logits'])")
        cls_logits, dist_logits = out.aux["cls_logits"], out.aux.get("dist_logits")
        if dist_logits is not None and cfg.distill_type == "none":
            cls_logits = (cls_logits + dist_logits) / 2  # both prefix heads train on the labels, as timm
        mean_ce = task_loss(out.logits, target)
        cls_ce = task_loss(cls_logits, target)
        base = 0.5 * mean_ce + 0.5 * cls_ce
        terms = {"task_loss": base.detach(), "mean_head_loss": mean_ce.detach(), "cls_head_loss": cls_ce.detach()}
        if cfg.distill_type == "none":
            return LossOutput(base, terms)
        if teacher is None:
            raise ValueError("Evo-ViT's distillation (distill_type != 'none') needs the teacher's output")
        student = out.logits if dist_logits is None else dist_logits
        if cfg.distill_type == "soft":
            tau = cfg.distill_tau
            kd = F.kl_div(
                F.log_softmax(student.float() / tau, dim=1), F.log_softmax(teacher.logits.float() / tau, dim=1),
                reduction="sum", log_target=True,
            ) * (tau * tau) / student.numel()
        else:
            kd = F.cross_entropy(student, teacher.logits.argmax(dim=1))
        terms["distill_loss"] = kd.detach()
        return LossOutput((1 - cfg.distill_alpha) * base + cfg.distill_alpha * kd, terms)

    def hooks(self, model: nn.Module, cfg: EvoViTConfig, optimizer=None, total_steps=None) -> StepHooks:
        model = getattr(model, "module", model)
        return _LayerwiseHooks(model) if cfg.layerwise_epochs > 0 else StepHooks()

    def token_trace(self, model: nn.Module, images: torch.Tensor) -> list[TokenStage]:
        """Per stage: the top-K patches by global class attention, which run the stage's blocks (the
        others wait, or with ``fast_update`` follow one representative token)."""
        with traced(model) as m:
            kept = m(images).aux["kept_per_stage"]
        return [kept_stage(block, positions, m.num_patches) for block, positions in kept]

    def convert_reference_state(self, state: dict[str, torch.Tensor], cfg: EvoViTConfig) -> dict[str, torch.Tensor]:
        """The authors' ``EvoVisionTransformer`` layout -> this model's keys.

        ``qkv = cat(qks.{i}.qk, vs.{i}.v)`` for weights and biases; ``norms.{i}`` -> ``norm1``,
        ``projs.{i}`` -> ``attn.proj``; the rest by name. Keys the map does not know (and a ``qk``
        without its ``v``) come back unchanged, so a mismatch stays visible to the loader.
        """
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key in _FLAT_KEYS:
                out[_FLAT_KEYS[key]] = value
                continue
            m = _QK.fullmatch(key)
            if m and _V.format(*m.groups()) in state:
                out[f"vit.blocks.{m[1]}.attn.qkv.{m[2]}"] = torch.cat([value, state[_V.format(*m.groups())]], dim=0)
                continue
            m = _VK.fullmatch(key)
            if m and _QKF.format(*m.groups()) in state:
                continue  # joined with its qk above
            for pattern, target in _BLOCK_KEYS.items():
                m = re.fullmatch(pattern, key)
                if m:
                    out[target.format(*m.groups())] = value
                    break
            else:
                out[key] = value  # unknown: left visible
        if cfg.layerwise_epochs > 0:
            out["layerwise._extra_state"] = torch.tensor(0, dtype=torch.long)  # a new run's epoch counter
        return out
