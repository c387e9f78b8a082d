"""DynamicViT: learned token pruning with prediction modules before chosen blocks.

Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification",
NeurIPS 2021, https://arxiv.org/abs/2106.02034. Reference code: raoyongming/DynamicViT
(``models/dyvit.py``, ``losses.py`` at 1322e62; the NeurIPS ``vit.py`` at c6ccb9e has the same model).

Training keeps all tokens: before each block in ``pruning_loc`` a predictor scores the patch tokens,
a straight-through Gumbel-softmax (tau=1, hard) samples keep decisions ``D_k = D_{k-1} * sample``,
and later blocks hide dropped tokens from attention (keys only; every token still sees itself).
Inference really drops them: the top ``int(N * rho**k)`` patch tokens by keep score are gathered
(score order, not spatial order) and the sequence shrinks to ``1 + K_k``. The loss is
``CE + w_r * mean_k (mean_i D_k - rho**k)**2 + w_d * KL(teacher || student) + w_t * MSE(kept tokens)``
against the frozen dense backbone as teacher.

Differences from the reference:
    * The masked softmax (``methods._common.policy_attention``, on timm's own attention weights)
      has no eps: a dropped key gets exactly zero weight, where the reference's
      ``(e + eps/N) / (sum e + eps)`` leaks ``eps * exp(gap)`` to a dropped key whose logit exceeds
      the kept ones by ``gap`` (0.5 in the logits at gaps of ~75, which trained ViTs reach). With
      hard decisions the training forward therefore equals the forward that really drops the
      tokens, at any logit range; the policy's gradient is that of the paper's multiplicative form.
    * The predictor's policy-weighted mean divides by ``max(sum(policy), 1e-6)``, so a sample whose
      tokens were all dropped gives zeros instead of NaN.
    * The backbone learning rate is ``backbone_lr_scale * lr`` from the first step; the reference's
      five frozen-backbone epochs (``fix_step``) are not reproduced. ``cls_token`` and ``pos_embed``
      stay frozen, as in the reference.
    * Mixup/cutmix, EMA and repeated augmentation belong to the training loop, not this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ._common import block_forward, fit_backbone, gather_tokens, policy_attention, prefixed, vit_head, vit_stem
from ._common.trace import kept_stage, traced
from .base import Geometry, LossOutput, MethodConfig, MethodOutput, SparsityMethod, TaskLoss, TokenStage, register_method, split_decay

__all__ = ["DynamicViTConfig", "DynamicViTPredictor", "DynamicViT", "DynamicViTMethod"]

_FROZEN = ("cls_token", "pos_embed")
#: Top-level names of a timm/DeiT ViT's parameters, as the reference checkpoints store them.
_BACKBONE_ROOTS = ("cls_token", "dist_token", "pos_embed", "patch_embed", "blocks", "norm", "fc_norm", "head", "head_dist", "norm_pre")


@dataclass(frozen=True)
class DynamicViTConfig(MethodConfig):
    """DynamicViT's knobs, with the paper's DeiT-S defaults.

    Attributes:
        keep_ratio: rho; stage k keeps ``int(num_patches * rho**k)`` patch tokens (k = 1, 2, ...).
        pruning_loc: 0-based indices of the blocks a predictor runs before.
        ratio_weight: w_r, weight of the keep-ratio loss (2 for DeiT-S, 5 for DeiT-B).
        distill_weight: weight of the KL divergence to the teacher's logits.
        token_distill_weight: weight of the MSE between kept student and teacher tokens.
        backbone_lr_scale: the backbone's learning rate relative to the predictors'.
        gumbel_tau: Gumbel-softmax temperature (the paper uses 1).
    """

    keep_ratio: float = 0.7
    pruning_loc: tuple[int, ...] = (3, 6, 9)
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    token_distill_weight: float = 0.5
    backbone_lr_scale: float = 0.01
    gumbel_tau: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pruning_loc", tuple(int(i) for i in self.pruning_loc))
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        for name in ("ratio_weight", "distill_weight", "token_distill_weight", "backbone_lr_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        loc = self.pruning_loc
        if not loc or any(b <= a for a, b in zip(loc, loc[1:])) or loc[0] < 0:
            raise ValueError(f"pruning_loc must be non-empty, strictly increasing and >= 0, got {list(loc)}")

    def validate_for(self, geometry: Geometry) -> None:
        if self.pruning_loc[-1] >= geometry.depth:
            raise ValueError(f"pruning_loc {list(self.pruning_loc)} needs more than {geometry.depth} blocks")
        if min(self.keep_counts(geometry.num_patches)) < 1:
            raise ValueError(
                f"keep_ratio {self.keep_ratio} keeps no token of {geometry.num_patches} patches "
                f"by stage {len(self.pruning_loc)} (int({geometry.num_patches} * {self.keep_ratio}**{len(self.pruning_loc)}) = 0)"
            )

    def keep_counts(self, num_patches: int) -> list[int]:
        """Patch tokens kept at each stage: ``int(N * rho**k)``, floor as in the reference."""
        return [int(num_patches * r) for r in self.stage_ratios()]

    def stage_ratios(self) -> list[float]:
        """Keep ratio of each stage relative to all patches: rho, rho**2, ... (the reference's expression)."""
        return [self.keep_ratio ** (k + 1) for k in range(len(self.pruning_loc))]


class DynamicViTPredictor(nn.Module):
    """PredictorLG: per-token keep/drop log-probabilities from local and policy-weighted global features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, N, C]`` patch tokens, policy ``[B, N, 1]``. Returns log-probs ``[B, N, 2]`` (0 = keep)."""
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local_x, global_x = x[..., :half], x[..., half:]
        global_x = (global_x * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local_x, global_x.expand_as(local_x)], dim=-1))


class DynamicViT(nn.Module):
    """A timm ViT with DynamicViT predictors; masks tokens while training, drops them in eval mode."""

    def __init__(self, vit: VisionTransformer, cfg: DynamicViTConfig) -> None:
        super().__init__()
        fit_backbone(vit, cfg)
        self.vit = vit
        self.cfg = cfg
        self.pruning_loc = cfg.pruning_loc
        self.predictors = nn.ModuleList(DynamicViTPredictor(vit.embed_dim) for _ in cfg.pruning_loc)
        self.keep_counts = cfg.keep_counts(vit.patch_embed.num_patches)

    def forward(self, x: torch.Tensor) -> MethodOutput:
        x = vit_stem(self.vit, x)
        return self._forward_train(x) if self.training else self._forward_infer(x)

    def _forward_train(self, x: torch.Tensor) -> MethodOutput:
        npre = self.vit.num_prefix_tokens
        prev = x.new_ones(x.shape[0], x.shape[1] - npre, 1)
        prefix = x.new_ones(x.shape[0], npre)
        decisions, policy, stage = [], None, 0
        for i, blk in enumerate(self.vit.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                logp = self.predictors[stage](x[:, npre:], prev)
                # Eq. 5: straight-through Gumbel-softmax; multiplying by D_{k-1} keeps decisions nested.
                keep = F.gumbel_softmax(logp, tau=self.cfg.gumbel_tau, hard=True)[..., :1] * prev
                decisions.append(keep.squeeze(-1))
                prev = keep
                policy = torch.cat([prefix, keep.squeeze(-1)], dim=1)
                stage += 1
            x = blk(x) if policy is None else block_forward(blk, x, lambda h: policy_attention(blk.attn, h, policy))
        logits, tokens = vit_head(self.vit, x)
        return MethodOutput(logits, {"decisions": decisions, "tokens": tokens, "final_mask": prev.squeeze(-1).detach()})

    def _forward_infer(self, x: torch.Tensor) -> MethodOutput:
        npre = self.vit.num_prefix_tokens
        stage = 0
        kept = []
        for i, blk in enumerate(self.vit.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                patches = x[:, npre:]
                logp = self.predictors[stage](patches, patches.new_ones(*patches.shape[:2], 1))
                keep = logp[..., 0].topk(self.keep_counts[stage], dim=1).indices  # score order
                kept.append(keep)
                x = gather_tokens(x, prefixed(keep, npre))
                stage += 1
            x = blk(x)
        logits, tokens = vit_head(self.vit, x)
        return MethodOutput(logits, {"tokens": tokens, "keep_index": kept})


@register_method("dynamicvit")
class DynamicViTMethod(SparsityMethod[DynamicViTConfig]):
    config_cls = DynamicViTConfig
    needs_teacher = True

    def build_model(self, cfg: DynamicViTConfig, base: nn.Module) -> nn.Module:
        return DynamicViT(base, cfg)

    def loss(
        self,
        out: MethodOutput,
        target: torch.Tensor,
        cfg: DynamicViTConfig,
        task_loss: TaskLoss,
        teacher: MethodOutput | None = None,
    ) -> LossOutput:
        ce = task_loss(out.logits, target)
        decisions = out.aux["decisions"]
        ratio = sum(((d.mean(1) - r) ** 2).mean() for d, r in zip(decisions, cfg.stage_ratios())) / len(decisions)
        terms = {"task_loss": ce.detach(), "ratio_loss": ratio.detach()}
        distill, distill_terms = distillation_loss(out, teacher, cfg.distill_weight, cfg.token_distill_weight, "DynamicViT")
        terms.update(distill_terms)
        return LossOutput(ce + cfg.ratio_weight * ratio + distill, terms)

    def param_groups(self, model: nn.Module, cfg: DynamicViTConfig, lr: float, weight_decay: float) -> list[dict]:
        """Predictors at ``lr``, the backbone at ``backbone_lr_scale * lr``, cls/pos embeddings frozen."""
        return predictor_param_groups(model, lr, weight_decay, cfg.backbone_lr_scale)

    def convert_reference_state(self, state: dict[str, torch.Tensor], cfg: DynamicViTConfig) -> dict[str, torch.Tensor]:
        """The authors' layout (``VisionTransformerDiffPruning``: timm/DeiT backbone keys at the top
        level, ``score_predictor.{k}.in_conv.{0,1}`` / ``.out_conv.{0,2,4}``) -> this model's keys.
        Keys the map does not know are passed through unchanged, so they show up as unexpected."""
        out = {}
        for key, value in state.items():
            if key.startswith("score_predictor."):
                out["predictors." + key[len("score_predictor."):]] = value
            elif key.split(".", 1)[0] in _BACKBONE_ROOTS:
                out["vit." + key] = value
            else:
                out[key] = value
        return out

    def stats(self, model: nn.Module, out: MethodOutput | None = None) -> dict[str, float]:
        """Mean kept fraction per stage of a training output (``keep_ratio_stage{k}``)."""
        if out is None or "decisions" not in out.aux:
            return {}
        return {f"keep_ratio_stage{k + 1}": float(d.detach().mean()) for k, d in enumerate(out.aux["decisions"])}

    def token_trace(self, model: nn.Module, images: torch.Tensor) -> list[TokenStage]:
        """The patches each stage keeps (``aux["keep_index"]`` of the eval forward, traced back to the input grid)."""
        with traced(model) as m:
            kept = m(images).aux["keep_index"]
        n = m.vit.patch_embed.num_patches
        positions = torch.arange(n, device=images.device).expand(images.shape[0], n)
        stages = []
        for block, keep in zip(m.pruning_loc, kept):
            positions = positions.gather(1, keep)
            stages.append(kept_stage(block, positions, n))
        return stages


def distillation_loss(
    out: MethodOutput, teacher: MethodOutput | None, distill_weight: float, token_distill_weight: float, who: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DynamicViT's (and SPViT's) distillation: ``w_d * KL(teacher || student)`` on the logits (batchmean,
    T=1) plus ``w_t * MSE`` on the patch tokens the final decision keeps; (0, {}) when both weights are 0."""
    if distill_weight <= 0 and token_distill_weight <= 0:
        return out.logits.new_zeros(()), {}
    if teacher is None:
        raise ValueError(f"{who}'s distillation terms need the teacher's output")
    kl = F.kl_div(
        F.log_softmax(out.logits.float(), dim=-1), F.log_softmax(teacher.logits.float(), dim=-1),
        reduction="batchmean", log_target=True,
    )
    token_mse = _kept_token_mse(out.aux["tokens"], teacher.aux["tokens"], out.aux["final_mask"])
    return distill_weight * kl + token_distill_weight * token_mse, {"distill_kl": kl.detach(), "token_mse": token_mse.detach()}


def predictor_param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float) -> list[dict]:
    """Parameters under ``predictors.`` at ``lr``, the backbone at ``backbone_lr_scale * lr``, cls/pos embeddings frozen."""
    named = [(n, p) for n, p in model.named_parameters() if not n.endswith(_FROZEN)]
    predictor = [(n, p) for n, p in named if n.startswith("predictors.")]
    backbone = [(n, p) for n, p in named if not n.startswith("predictors.")]
    return split_decay(predictor, lr, weight_decay) + split_decay(backbone, lr, weight_decay, backbone_lr_scale)


def _kept_token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher patch tokens where the final decision keeps them (0 if none kept)."""
    keep = mask > 0.5
    if keep.sum() < 0.1:
        return student.new_zeros(())
    return F.mse_loss(student[keep].float(), teacher[keep].float())
