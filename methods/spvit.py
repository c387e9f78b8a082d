"""SPViT: latency-aware soft token pruning, with dropped tokens packaged instead of thrown away.

Kong et al., "SPViT: Enabling Faster Vision Transformers via Latency-aware Soft Token Pruning",
ECCV 2022, https://arxiv.org/abs/2112.13890. Reference code: PeiyanFlying/SPViT at a1f9423
(``vit_l2_3keep_senet.py``, ``losses_l2.py``, ``vit_l2_3keep_senet_inference.py``); not ziplab/SPViT,
which is another paper.

A DynamicViT fork. Before each block in ``pruning_loc`` a multi-head selector (``MultiheadPredictorLG``)
scores the patch tokens: the C channels are split into the H heads' chunks, one shared MLP
(LN -> Linear -> GELU, local half + policy-weighted global half, hd -> hd/2 -> hd/4 -> 2) gives each
head's keep/drop logits, and an SE block over the per-token head means (H -> H/2 -> GELU -> H ->
Sigmoid) weighs the heads: ``score = sum_h w_h log_softmax_h / sum_h w_h``. At stage k the tokens
dropped *there* are not discarded but folded into one package token, appended at the end of the
sequence and kept from then on (``1 + K_k + k`` tokens after stage k, ``K_k = int(N * keep_ratios[k])``
of all N patches); the final features exclude the package tokens.

Training keeps the full sequence (``1 + N + k`` tokens after stage k): straight-through Gumbel-softmax
decisions (hard, nested) hide dropped tokens from attention through the exact masked attention
``methods._common.policy_attention``. The loss is DynamicViT's with SPViT's batch-level ratio term:
``CE + w_r * mean_k (mean_{b,i} D_k - r_k)**2 + w_d * KL(teacher || student) + w_t * MSE(kept tokens)``
against the frozen dense backbone. Inference is deterministic and really removes tokens: the top
``K_k`` patches by keep margin are gathered (score order), the others become the package token.

Latency awareness (``latency_target_ms`` or ``latency_target_ratio``): ``SPViTMethod.resolve``
measures a latency lookup table of one transformer block (and of the selector) over token counts on
the trial's own device (``methods.latency.BlockLatencyTable``, cached per device/geometry/batch/
dtype/torch/threads in ``cache_dir``), then finds by bisection the schedule
``keep_ratios ** t`` (the configured ratios give its shape; ``t = 0`` keeps everything, ``t = 1`` is
the configured schedule) whose predicted latency (blocks at their token counts, package tokens
included, plus the selectors) meets the target as closely as possible from below. The patch
embedding, the head and the gathers are not modelled (a small constant beside the blocks). A target
below what the smallest schedule of that shape reaches raises ``ValueError``: at batch 1 on a GPU,
where a block's latency hardly depends on its token count, use a larger ``latency_batch_size``.

Differences from the reference:
    * Package token = keep-probability-weighted *mean* ``sum_j s_j x_j / max(sum_j s_j, 1e-6)`` over
      the tokens newly dropped at the stage (``s_j`` the SE-weighted mean of the heads' keep
      probabilities, as the reference's ``softmax_score``), the same in training and inference. The
      reference uses the unnormalised sum in training (its scale grows with the number of drops) and
      a plain mean in its gather path.
    * A stage that drops nothing appends no package token at inference (its keep count equals the
      tokens it gets, e.g. ``keep_ratios`` all 1, which then computes plain timm); in training a
      sample that drops nothing at a stage gives its (empty, zero) package token policy 0, so the
      two forwards still agree. The reference appends a zero token with policy 1, which attends.
    * Deterministic inference at any batch size: the same ``K_k`` for every image (top-K by the
      selector's keep margin ``score_keep - score_drop``, the quantity the Gumbel sampler compares),
      vectorised, no host syncs. The reference's eval samples Gumbel noise, writes score files and
      returns a tuple; its gather path works at batch 1 only.
    * Exact masking (``policy_attention``, no eps leak), so with hard decisions the training forward
      equals the inference forward at any attention-logit range; the reference's
      ``(e + eps/N) / (sum e + eps)`` leaks to dropped keys.
    * Latency lookup table + bisection over the schedule scale: the public code has neither (its keep
      ratios are hard-coded to 0.617/0.369/0.137, which are the defaults here without a target).
    * The per-head selector MLP is one shared module applied to all heads at once (the reference's
      ``ModuleList`` holds the same module H times, so the weights are shared there too); the
      policy-weighted global mean divides by ``max(sum(policy), 1e-6)``.
    * Separate weights for the KL and token-MSE terms (the reference uses ``distillw`` for both; the
      defaults 0.5/0.5 equal its setting). The backbone learning rate is ``backbone_lr_scale * lr``
      from the first step (the reference freezes it for 5 epochs and hard-resets the lr at epoch 30);
      cls_token/pos_embed stay frozen as in the reference.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from .backbone import CheckpointError
from ._common import block_forward, fit_backbone, gather_tokens, policy_attention, vit_head, vit_stem
from ._common.trace import kept_stage, traced
from .base import Geometry, LossOutput, MethodConfig, MethodOutput, SparsityMethod, TaskLoss, TokenStage, register_method
from .dynamicvit import distillation_loss, predictor_param_groups
from .latency import BlockLatencyTable, device_name, latency_cache_key, token_grid

__all__ = [
    "SPViTConfig", "MultiheadPredictorLG", "SPViT", "SPViTMethod",
    "package_token", "block_token_counts", "predict_latency_ms", "schedule_for_target",
]

_logger = logging.getLogger(__name__)

_EPS = 1e-6

#: Latency lookup tables: grid points over the token range, and the timing of each point.
LUT_POINTS = 25
LUT_WARMUP = 10
LUT_ITERS = 30


@dataclass(frozen=True)
class SPViTConfig(MethodConfig):
    """SPViT's knobs, with the reference's DeiT-S defaults.

    Attributes:
        keep_ratios: patch tokens kept after each stage, relative to *all* patches (not nested
            products): stage k keeps ``int(N * keep_ratios[k])``. Non-increasing, in (0, 1]. With a
            latency target this is the schedule's shape and ``resolve`` replaces it by ``keep_ratios ** t``.
        pruning_loc: 0-based indices of the blocks a selector runs before.
        latency_target_ms: predicted latency (ms, transformer blocks + selectors) the schedule must meet.
        latency_target_ratio: the same as a fraction of the dense blocks' predicted latency.
            At most one of the two targets is set; None for both uses ``keep_ratios`` as given.
        latency_batch_size: batch size of the latency lookup table (1 = latency, larger = throughput).
        latency_amp: measure the lookup table under autocast.
        ratio_weight: w_r, weight of the keep-ratio loss.
        distill_weight: weight of the KL divergence to the teacher's logits.
        token_distill_weight: weight of the MSE between kept student and teacher patch tokens.
        backbone_lr_scale: the backbone's learning rate relative to the selectors'.
        gumbel_tau: Gumbel-softmax temperature.
        predicted_latency_ms: set by ``resolve`` (the chosen schedule's predicted latency); leave unset.
        predicted_dense_latency_ms: set by ``resolve`` (the dense blocks' predicted latency); leave unset.
    """

    keep_ratios: tuple[float, ...] = (0.617, 0.369, 0.137)
    pruning_loc: tuple[int, ...] = (3, 6, 9)
    latency_target_ms: float | None = None
    latency_target_ratio: float | None = None
    latency_batch_size: int = 1
    latency_amp: bool = False
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    token_distill_weight: float = 0.5
    backbone_lr_scale: float = 0.01
    gumbel_tau: float = 1.0
    predicted_latency_ms: float | None = None
    predicted_dense_latency_ms: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pruning_loc", tuple(int(i) for i in self.pruning_loc))
        object.__setattr__(self, "keep_ratios", tuple(float(r) for r in self.keep_ratios))
        loc, ratios = self.pruning_loc, self.keep_ratios
        if not loc or loc[0] < 0 or any(b <= a for a, b in zip(loc, loc[1:])):
            raise ValueError(f"pruning_loc must be non-empty, strictly increasing and >= 0, got {list(loc)}")
        if len(ratios) != len(loc):
            raise ValueError(f"keep_ratios needs one ratio per pruning_loc entry ({len(loc)}), got {list(ratios)}")
        if any(not 0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"keep_ratios must be in (0, 1], got {list(ratios)}")
        if any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"keep_ratios must not increase from stage to stage, got {list(ratios)}")
        for name in ("ratio_weight", "distill_weight", "token_distill_weight", "backbone_lr_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        if self.latency_target_ms is not None and self.latency_target_ratio is not None:
            raise ValueError("set at most one of latency_target_ms and latency_target_ratio")
        if self.latency_target_ms is not None and not self.latency_target_ms > 0:
            raise ValueError(f"latency_target_ms must be > 0, got {self.latency_target_ms}")
        if self.latency_target_ratio is not None and not 0.0 < self.latency_target_ratio <= 1.0:
            raise ValueError(f"latency_target_ratio must be in (0, 1], got {self.latency_target_ratio}")
        if self.latency_batch_size < 1:
            raise ValueError(f"latency_batch_size must be >= 1, got {self.latency_batch_size}")
        for name in ("predicted_latency_ms", "predicted_dense_latency_ms"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 when set (resolve sets it), got {getattr(self, name)}")

    def validate_for(self, geometry: Geometry) -> None:
        if self.pruning_loc[-1] >= geometry.depth:
            raise ValueError(f"pruning_loc {list(self.pruning_loc)} needs more than {geometry.depth} blocks")
        for k, (r, c) in enumerate(zip(self.keep_ratios, self.keep_counts(geometry.num_patches))):
            if c < 1:
                raise ValueError(
                    f"keep_ratios[{k}] = {r} keeps no token of {geometry.num_patches} patches "
                    f"(int({geometry.num_patches} * {r}) = 0)"
                )
        if geometry.num_heads < 2:
            raise ValueError(f"num_heads {geometry.num_heads}: SPViT's selector weighs >= 2 heads (SE block H -> H/2)")
        if geometry.embed_dim // geometry.num_heads < 4:
            raise ValueError(f"head dim {geometry.embed_dim // geometry.num_heads} (embed_dim / num_heads) must be >= 4 for the selector MLP")

    @property
    def has_latency_target(self) -> bool:
        return self.latency_target_ms is not None or self.latency_target_ratio is not None

    def keep_counts(self, num_patches: int) -> list[int]:
        """Patch tokens kept after each stage: ``int(N * keep_ratios[k])`` (floor, as every reference)."""
        return [int(num_patches * r) for r in self.keep_ratios]


# ------------------------------------------------------------------------------------ the selector


class MultiheadPredictorLG(nn.Module):
    """SPViT's multi-head keep selector; one MLP shared by all heads, heads weighed by an SE block.

    ``forward(x [B, N, C], policy [B, N, 1])`` returns ``score [B, N, 2]`` (the SE-weighted mean of the
    heads' log-softmax, index 0 = keep; what the Gumbel sampler gets) and ``keep_prob [B, N]`` (the
    SE-weighted mean of the heads' keep probabilities, the package token's weights).
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        hd = embed_dim // num_heads
        self.num_heads, self.head_dim = num_heads, hd
        self.senet = nn.Sequential(nn.Linear(num_heads, num_heads // 2), nn.GELU(), nn.Linear(num_heads // 2, num_heads), nn.Sigmoid())
        self.in_conv = nn.Sequential(nn.LayerNorm(hd), nn.Linear(hd, hd), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(hd, hd // 2), nn.GELU(),
            nn.Linear(hd // 2, hd // 4), nn.GELU(),
            nn.Linear(hd // 4, 2),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        heads = x.reshape(B, N, self.num_heads, self.head_dim)  # channel chunk h is head h
        w = self.senet(heads.mean(-1))  # [B, N, H]: the reference's AdaptiveAvgPool2d((N, H))
        h = self.in_conv(heads)
        half = self.head_dim // 2
        local, glob = h[..., :half], h[..., half:]
        p = policy.reshape(B, N, 1, 1).to(h.dtype)
        glob = (glob * p).sum(1, keepdim=True) / p.sum(1, keepdim=True).clamp_min(_EPS)
        logits = self.out_conv(torch.cat([local, glob.expand(B, N, -1, -1)], dim=-1))  # [B, N, H, 2]
        w = w.unsqueeze(-1)
        w_sum = w.sum(2)
        score = (w * logits.log_softmax(-1)).sum(2) / w_sum
        keep_prob = (w * logits.softmax(-1)).sum(2) / w_sum
        return score, keep_prob[..., 0]


def package_token(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j x_j / max(sum_j w_j, 1e-6)``: tokens ``[B, M, C]``, weights ``[B, M]`` -> ``[B, 1, C]`` (0 if all w_j = 0)."""
    w = weights.unsqueeze(-1).to(tokens.dtype)
    return (w * tokens).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(_EPS)


# ------------------------------------------------------------------------------------ the model


class SPViT(nn.Module):
    """A timm ViT with SPViT selectors and package tokens; masks while training, drops in eval mode."""

    def __init__(self, vit: VisionTransformer, cfg: SPViTConfig) -> None:
        super().__init__()
        geometry = fit_backbone(vit, cfg)
        if getattr(vit, "global_pool", "token") != "token" or getattr(vit, "attn_pool", None) is not None:
            raise NotImplementedError(f"SPViT needs CLS-token pooling, got global_pool={vit.global_pool!r}")
        self.vit = vit
        self.cfg = cfg
        self.pruning_loc = cfg.pruning_loc
        self.num_patches = geometry.num_patches
        self.predictors = nn.ModuleList(MultiheadPredictorLG(geometry.embed_dim, geometry.num_heads) for _ in cfg.pruning_loc)
        self.keep_counts = cfg.keep_counts(geometry.num_patches)

    def forward(self, x: torch.Tensor) -> MethodOutput:
        x = vit_stem(self.vit, x)
        return self._forward_train(x) if self.training else self._forward_infer(x)

    def _forward_train(self, x: torch.Tensor) -> MethodOutput:
        B, npre, N = x.shape[0], self.vit.num_prefix_tokens, self.num_patches
        prev = x.new_ones(B, N)  # D_{k-1} over the patches
        prefix = x.new_ones(B, npre)
        package_policy = x.new_ones(B, 0)
        decisions, policy, stage = [], None, 0
        for i, blk in enumerate(self.vit.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                # The selector sees the patches and the package tokens so far (their policy in the global mean).
                score, keep_prob = self.predictors[stage](x[:, npre:], torch.cat([prev, package_policy], 1).unsqueeze(-1))
                keep = F.gumbel_softmax(score[:, :N], tau=self.cfg.gumbel_tau, hard=True)[..., 0] * prev  # nested
                dropped = prev - keep  # newly dropped here: 0/1, straight-through gradients
                x = torch.cat([x, package_token(x[:, npre:npre + N], keep_prob[:, :N] * dropped)], dim=1)
                # An empty package (nothing dropped here) stays hidden, as inference does not append it.
                package_policy = torch.cat([package_policy, (dropped.detach().sum(1, keepdim=True) > 0).to(x.dtype)], 1)
                decisions.append(keep)
                prev = keep
                policy = torch.cat([prefix, keep, package_policy], dim=1)
                stage += 1
            x = blk(x) if policy is None else block_forward(blk, x, lambda h: policy_attention(blk.attn, h, policy))
        logits, tokens = vit_head(self.vit, x[:, :npre + N])  # package tokens excluded
        return MethodOutput(logits, {"decisions": decisions, "tokens": tokens, "final_mask": prev.detach()})

    def _forward_infer(self, x: torch.Tensor) -> MethodOutput:
        npre = self.vit.num_prefix_tokens
        n, stage = self.num_patches, 0  # n: patch tokens now; package tokens follow them
        selections = []  # (block, kept, dropped): indices among the n patch tokens before the stage
        for i, blk in enumerate(self.vit.blocks):
            if stage < len(self.pruning_loc) and i == self.pruning_loc[stage]:
                k = self.keep_counts[stage]
                if k < n:  # a stage that keeps every token is the identity: no selector, no package
                    rest = x[:, npre:]
                    score, keep_prob = self.predictors[stage](rest, rest.new_ones(*rest.shape[:2], 1))
                    margin = score[:, :n, 0] - score[:, :n, 1]
                    order = margin.argsort(dim=1, descending=True)
                    keep, drop = order[:, :k], order[:, k:]
                    selections.append((i, keep, drop))
                    package = package_token(gather_tokens(x, drop, npre), torch.gather(keep_prob[:, :n], 1, drop))
                    x = torch.cat([x[:, :npre], gather_tokens(x, keep, npre), x[:, npre + n:], package], dim=1)
                    n = k
                stage += 1
            x = blk(x)
        logits, tokens = vit_head(self.vit, x[:, :npre + n])
        return MethodOutput(logits, {"tokens": tokens, "selections": selections})


# ------------------------------------------------------------------------------------ latency model


def block_token_counts(geometry: Geometry, pruning_loc: tuple[int, ...], keep_counts: list[int]) -> tuple[list[int], list[int]]:
    """Tokens entering each block at inference (package tokens included), and tokens each running selector scores."""
    n, packages, stage = geometry.num_patches, 0, 0
    blocks, selectors = [], []
    for i in range(geometry.depth):
        if stage < len(pruning_loc) and i == pruning_loc[stage]:
            if keep_counts[stage] < n:
                selectors.append(n + packages)
                n, packages = keep_counts[stage], packages + 1
            stage += 1
        blocks.append(geometry.num_prefix_tokens + n + packages)
    return blocks, selectors


def predict_latency_ms(
    geometry: Geometry, pruning_loc: tuple[int, ...], keep_counts: list[int],
    block_table: BlockLatencyTable, selector_table: BlockLatencyTable,
) -> float:
    """Lookup-table latency of the transformer body: every block at its token count, plus the selectors that run."""
    blocks, selectors = block_token_counts(geometry, pruning_loc, keep_counts)
    return sum(block_table.predict(n) for n in blocks) + sum(selector_table.predict(n) for n in selectors)


def schedule_for_target(
    cfg: SPViTConfig, geometry: Geometry, block_table: BlockLatencyTable, selector_table: BlockLatencyTable,
    where: str = "this device",
) -> SPViTConfig:
    """``cfg`` with ``keep_ratios = shape ** t`` for the smallest ``t`` whose predicted latency meets the target.

    ``shape`` is ``cfg.keep_ratios``; ``t`` is found by bisection (the counts fall as ``t`` grows).
    Raises ``ValueError`` naming the target and the best achievable latency when even the
    smallest schedule of that shape (one patch kept at the last stage) is too slow.
    """
    shape, N, loc = cfg.keep_ratios, geometry.num_patches, cfg.pruning_loc

    def ratios_at(t: float) -> tuple[float, ...]:
        return tuple(r ** t for r in shape)

    def counts_at(t: float) -> list[int]:
        return [int(N * r) for r in ratios_at(t)]

    def latency_at(t: float) -> float:
        return predict_latency_ms(geometry, loc, counts_at(t), block_table, selector_table)

    dense = predict_latency_ms(geometry, loc, [N] * len(loc), block_table, selector_table)
    if cfg.latency_target_ms is not None:
        target, what = float(cfg.latency_target_ms), f"latency_target_ms={cfg.latency_target_ms}"
    else:
        target = float(cfg.latency_target_ratio) * dense
        what = f"latency_target_ratio={cfg.latency_target_ratio} of the dense {dense:.4g} ms"

    if dense <= target:
        t = 0.0
    else:
        r_min = min(shape)
        if r_min >= 1.0:
            t_max = 0.0
        else:  # the largest t that still keeps a token at every stage
            lo, hi = 0.0, math.log(N) / -math.log(r_min) * 1.01 + 1e-6
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if min(counts_at(mid)) >= 1 else (lo, mid)
            t_max = lo
        best = latency_at(t_max)
        if best > target:
            raise ValueError(
                f"SPViT latency target {target:.4g} ms ({what}) cannot be met on {where}: the best achievable "
                f"with the keep_ratios shape {list(shape)} is {best:.4g} ms (keep counts {counts_at(t_max)} of {N})"
            )
        lo, hi = 0.0, t_max  # lo misses the target, hi meets it
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if latency_at(mid) <= target else (mid, hi)
        t = hi
    ratios = ratios_at(t)
    resolved = dataclasses.replace(
        cfg, keep_ratios=ratios, predicted_latency_ms=latency_at(t), predicted_dense_latency_ms=dense,
    )
    resolved.validate_for(geometry)
    return resolved


class _SelectorProbe(nn.Module):
    """The selector as inference runs it (all tokens present), with the one-tensor signature the table times."""

    def __init__(self, selector: MultiheadPredictorLG) -> None:
        super().__init__()
        self.selector = selector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score, keep_prob = self.selector(x, x.new_ones(*x.shape[:2], 1))
        return score


def latency_tables(
    cfg: SPViTConfig, base: VisionTransformer, device: torch.device, cache_dir: Path | None,
) -> tuple[BlockLatencyTable, BlockLatencyTable]:
    """The block and selector lookup tables of ``base`` on ``device`` (measured once, then read from ``cache_dir``)."""
    g = Geometry.of(base)
    block = base.blocks[0]
    selector = _SelectorProbe(MultiheadPredictorLG(g.embed_dim, g.num_heads))
    tables = []
    for name, module, grid in (
        ("vit_block", block, token_grid(g.num_prefix_tokens + 1, g.num_prefix_tokens + g.num_patches, LUT_POINTS)),
        ("spvit_selector", selector, token_grid(1, g.num_patches, LUT_POINTS)),
    ):
        key = latency_cache_key(name, module, g.embed_dim, grid, device, cfg.latency_batch_size, cfg.latency_amp)
        tables.append(BlockLatencyTable.load_or_build(
            cache_dir, key, module, g.embed_dim, grid, device, cfg.latency_batch_size, LUT_WARMUP, LUT_ITERS, cfg.latency_amp,
        ))
    return tables[0], tables[1]


# ------------------------------------------------------------------------------------ the method


#: Top-level names of a timm/DeiT ViT's parameters, as the reference checkpoints store them.
_BACKBONE_ROOTS = ("cls_token", "dist_token", "pos_embed", "patch_embed", "blocks", "norm", "fc_norm", "head", "head_dist", "norm_pre")
_PREDICTOR_KEY = re.compile(r"score_predictor\.(\d+)\.(?:(in_conv|out_conv)\.(\d+)\.(\d+)|(senet)\.(\d+))\.(weight|bias)")


@register_method("spvit")
class SPViTMethod(SparsityMethod[SPViTConfig]):
    config_cls = SPViTConfig
    needs_teacher = True

    def uses_teacher(self, cfg: SPViTConfig) -> bool:
        return cfg.distill_weight > 0 or cfg.token_distill_weight > 0

    def resolve(self, cfg: SPViTConfig, base: nn.Module, device: torch.device, cache_dir: Path | None = None) -> SPViTConfig:
        """With a latency target: the keep schedule meeting it on ``device`` (lookup tables cached in ``cache_dir``)."""
        if not cfg.has_latency_target:
            return cfg
        geometry = Geometry.of(base)
        cfg.validate_for(geometry)
        block_table, selector_table = latency_tables(cfg, base, torch.device(device), cache_dir)
        resolved = schedule_for_target(cfg, geometry, block_table, selector_table, where=device_name(device))
        _logger.info(
            "SPViT schedule for %s: keep_ratios %s, predicted %.4g ms (dense %.4g ms)",
            device_name(device), [round(r, 4) for r in resolved.keep_ratios],
            resolved.predicted_latency_ms, resolved.predicted_dense_latency_ms,
        )
        return resolved

    def build_model(self, cfg: SPViTConfig, base: nn.Module) -> nn.Module:
        if cfg.has_latency_target and cfg.predicted_latency_ms is None:
            raise ValueError("SPViT with a latency target needs method.resolve(cfg, base, device, cache_dir) before build_model")
        return SPViT(base, cfg)

    def convert_reference_state(self, state: dict[str, torch.Tensor], cfg: SPViTConfig) -> dict[str, torch.Tensor]:
        """PeiyanFlying/SPViT checkpoints (``VisionTransformerDiffPruning``) -> this model's keys.

        Backbone keys are timm DeiT's (``blocks.3.attn.qkv.weight`` -> ``vit.blocks.3.attn.qkv.weight``).
        Selector ``score_predictor.{k}.senet.{0,2}.*`` -> ``predictors.{k}.senet.{0,2}.*``;
        ``score_predictor.{k}.in_conv.{h}.{0,1}.*`` and ``score_predictor.{k}.out_conv.{h}.{0,2,4}.*``
        (one shared module, saved once per head h) -> ``predictors.{k}.in_conv.*`` / ``.out_conv.*``.
        Copies that differ raise ``CheckpointError`` (the model has one MLP per selector); keys the
        map does not know pass through unchanged, so the loader reports them as unexpected.
        """
        if isinstance(state.get("model"), dict):  # the release format wraps the state dict
            state = state["model"]
        out: dict[str, torch.Tensor] = {}
        source: dict[str, str] = {}
        for key, value in state.items():
            m = _PREDICTOR_KEY.fullmatch(key)
            if m is None:
                out[f"vit.{key}" if key.split(".", 1)[0] in _BACKBONE_ROOTS else key] = value
                continue
            stage, part, param = m.group(1), m.group(2) or m.group(5), m.group(7)
            layer = m.group(4) if m.group(2) else m.group(6)
            new = f"predictors.{stage}.{part}.{layer}.{param}"
            if new in out:
                if out[new].shape != value.shape or not torch.equal(out[new], value):
                    raise CheckpointError(f"{key!r} differs from {source[new]!r}: the reference's per-head selector MLP is one shared module")
                continue
            out[new], source[new] = value, key
        return out

    def loss(
        self,
        out: MethodOutput,
        target: torch.Tensor,
        cfg: SPViTConfig,
        task_loss: TaskLoss,
        teacher: MethodOutput | None = None,
    ) -> LossOutput:
        ce = task_loss(out.logits, target)
        decisions = out.aux["decisions"]
        # Batch-level mean kept fraction per stage (losses_l2.py): images may keep different counts.
        ratio = sum((d.mean() - r) ** 2 for d, r in zip(decisions, cfg.keep_ratios)) / len(decisions)
        terms = {"task_loss": ce.detach(), "ratio_loss": ratio.detach()}
        distill, distill_terms = distillation_loss(out, teacher, cfg.distill_weight, cfg.token_distill_weight, "SPViT")
        terms.update(distill_terms)
        return LossOutput(ce + cfg.ratio_weight * ratio + distill, terms)

    def param_groups(self, model: nn.Module, cfg: SPViTConfig, lr: float, weight_decay: float) -> list[dict]:
        """Selectors at ``lr``, the backbone at ``backbone_lr_scale * lr``, cls/pos embeddings frozen."""
        return predictor_param_groups(model, lr, weight_decay, cfg.backbone_lr_scale)

    def stats(self, model: nn.Module, out: MethodOutput | None = None) -> dict[str, float]:
        """``keep_ratio_stage{k}`` of a training output; without one, the schedule and its predicted latency."""
        if out is not None:
            if "decisions" not in out.aux:
                return {}
            return {f"keep_ratio_stage{k + 1}": float(d.detach().mean()) for k, d in enumerate(out.aux["decisions"])}
        cfg: SPViTConfig | None = getattr(model, "cfg", None)
        if not isinstance(cfg, SPViTConfig):
            return {}
        stats = {f"target_keep_ratio_stage{k + 1}": float(r) for k, r in enumerate(cfg.keep_ratios)}
        if cfg.predicted_latency_ms is not None:
            stats["predicted_latency_ms"] = float(cfg.predicted_latency_ms)
        if cfg.predicted_dense_latency_ms is not None:
            stats["predicted_dense_latency_ms"] = float(cfg.predicted_dense_latency_ms)
        return stats

    def token_trace(self, model: nn.Module, images: torch.Tensor) -> list[TokenStage]:
        """Per stage that drops tokens: the kept patches each their own token, and the patches dropped
        at stage j all in package token j (appended after the kept ones, kept from then on)."""
        with traced(model) as m:
            selections = m(images).aux["selections"]
        b, n = images.shape[0], m.num_patches
        positions = torch.arange(n, device=images.device).expand(b, n)
        package = torch.full((b, n), -1, dtype=torch.long, device=images.device)
        stages = []
        for j, (block, keep, drop) in enumerate(selections):
            package = package.scatter(1, positions.gather(1, drop), j)
            positions = positions.gather(1, keep)
            stage = kept_stage(block, positions, n)
            k = keep.shape[1]
            token = torch.where(package >= 0, k + package, stage.token)
            stages.append(TokenStage(block, token, f"block {block}: {k} of {n} patches kept, {j + 1} package token(s)"))
        return stages
