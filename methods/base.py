"""The one interface every sparsification method implements, and the registry that finds them.

A method turns a trained dense timm ``VisionTransformer`` into a sparse model, says how to train it
(loss, optimizer groups, per-step hooks) and what to report about it. The orchestrator drives every
method the same way:

    method = get_method("dynamicvit")
    cfg = method.config_cls(keep_ratio=0.7)
    model = method.build_model(cfg, base)          # base: a timm VisionTransformer
    out = model(images)                            # MethodOutput, in train and eval mode
    loss = method.loss(out, target, cfg, task_loss, teacher=teacher_out)
    hooks = method.hooks(model, cfg)               # StepHooks, no-ops unless the method needs them

This module depends on torch and timm only: never on Ray, MLflow or the orchestrator.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, TypeVar

import torch
from torch import nn

__all__ = [
    "Geometry",
    "MethodConfig",
    "MethodOutput",
    "LossOutput",
    "Measurement",
    "StepHooks",
    "TokenStage",
    "SparsityMethod",
    "register_method",
    "get_method",
    "list_methods",
    "UnknownMethodError",
]

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Geometry:
    """What a method's config is checked against: the backbone's shape, not its weights.

    Attributes:
        depth: transformer blocks.
        num_patches: patch tokens (prefix tokens excluded), e.g. 196 for DeiT at 224 px.
        grid: patch grid ``(rows, cols)``.
        embed_dim: channels C.
        num_heads: attention heads.
        num_prefix_tokens: CLS (and distillation) tokens before the patches.
    """

    depth: int
    num_patches: int
    grid: tuple[int, int]
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int = 1

    @classmethod
    def of(cls, vit: nn.Module) -> "Geometry":
        """The geometry of a timm ``VisionTransformer`` (works on the meta device)."""
        grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        return cls(
            depth=len(vit.blocks), num_patches=int(vit.patch_embed.num_patches), grid=grid,
            embed_dim=int(vit.embed_dim), num_heads=int(vit.blocks[0].attn.num_heads),
            num_prefix_tokens=int(vit.num_prefix_tokens),
        )


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config dataclass (paper defaults as field defaults)."""

    def validate_for(self, geometry: Geometry) -> None:
        """Check the config against a backbone's ``geometry``; raise ``ValueError`` naming the value that cannot apply."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass
class MethodOutput:
    """What every method model returns, in training and in eval mode.

    Attributes:
        logits: class scores ``[B, num_classes]``.
        aux: method-specific tensors, e.g. ``tokens`` (final normed patch tokens ``[B, N, C]``),
            ``decisions`` (DynamicViT's per-stage keep masks). Empty when there is nothing extra.
    """

    logits: torch.Tensor
    aux: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurement:
    """What a trial measures of its model: flat metrics (``latency_ms``, ``throughput_ips``,
    ``dense_*``, ``speedup``, ``throughput_ratio``, ``gflops``, ...) and optional tables, each a list
    of rows (dicts) recorded as CSV with a plot of its first column against its second."""

    metrics: dict[str, float]
    tables: dict[str, list[dict[str, float]]] = field(default_factory=dict)


@dataclass
class LossOutput:
    """The scalar to back-propagate and its named terms (detached, for logging)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class StepHooks:
    """Per-step callbacks a method may need (DST prune/grow, schedules); all default to no-ops.

    Under DDP every rank calls them at the same point, so anything that changes masks must come out
    identical on every rank (use the all-reduced gradients or broadcast from rank 0).
    """

    def after_backward(self, step: int) -> None:
        """After ``loss.backward()``, before the optimizer step (gradients are all-reduced)."""

    def after_optimizer_step(self, step: int) -> None:
        """After each optimizer step; ``step`` counts optimizer steps from 0."""

    def on_epoch_end(self, epoch: int) -> None:
        """After each training epoch, before evaluation."""


@dataclass
class TokenStage:
    """Where every input patch is at one token stage of a model's eval-mode forward (for visualisation).

    Attributes:
        block: the first block that runs on the stage's tokens (0-based).
        token: ``[B, num_patches]`` long, one entry per original patch (row-major over the grid): the
            index, among the stage's patch tokens, of the token that carries it, or -1 where the
            patch is not in the sequence (dropped, or waiting out the stage). Pruning gives every
            kept patch a token of its own; merging (ToMe, SPViT's package tokens) lets several
            patches share one.
        label: a short description, e.g. ``"block 2: 31 of 64 tokens"``.
    """

    block: int
    token: torch.Tensor
    label: str = ""


C = TypeVar("C", bound=MethodConfig)


class SparsityMethod(Generic[C]):
    """A sparsification method. Subclass, set the class attributes, register with ``@register_method``.

    Attributes:
        name: the registry key (the module's name, e.g. ``"dynamicvit"``).
        config_cls: the frozen ``MethodConfig`` dataclass holding the paper's defaults.
        needs_teacher: the loop passes the frozen dense backbone's output as ``teacher`` (see ``uses_teacher``).
        needs_pretrained: the method starts from trained dense weights (the sweep trains them first
            when none are given); False for methods trained from scratch.
        needs_calibration: the loop holds out part of the training images (``data.holdout``) and
            calls ``calibrate`` after training.
        cost_depends_on_training: latency/GFLOPs change with training (DVT's exits), so they are
            not measured before training for multi-objective early stopping.
        find_unused_parameters: some parameters get no gradient on some steps (e.g. early exits),
            so DDP must be told.
        broadcast_buffers: DDP re-broadcasts buffers from rank 0 every forward; False where every
            rank computes identical buffers itself (DST masks).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    needs_teacher: ClassVar[bool] = False
    needs_pretrained: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    cost_depends_on_training: ClassVar[bool] = False
    find_unused_parameters: ClassVar[bool] = False
    broadcast_buffers: ClassVar[bool] = True

    def uses_teacher(self, cfg: C) -> bool:
        """Whether training with ``cfg`` needs the frozen dense teacher's output (default: ``needs_teacher``)."""
        return self.needs_teacher

    def resolve(self, cfg: C, base: nn.Module, device: torch.device, cache_dir: Path | None = None) -> C:
        """Settle what depends on the device before ``build_model`` (e.g. a latency-targeted keep schedule).

        Runs once per run, on one rank (the orchestrator broadcasts the result to the others), with
        ``cache_dir`` a folder for measurements worth reusing across runs on the same device.
        Default: ``cfg`` unchanged.
        """
        return cfg

    def build_model(self, cfg: C, base: nn.Module) -> nn.Module:
        """Wrap or modify the trained dense ``base`` into the method's model (forward -> ``MethodOutput``)."""
        raise NotImplementedError

    def convert_reference_state(self, state: dict[str, torch.Tensor], cfg: C) -> dict[str, torch.Tensor]:
        """Map a state dict laid out as the method's reference code saves it (its model-zoo checkpoints)
        to this model's keys, through an explicit key map. ``load_reference_checkpoint`` then refuses
        any key that differs. Default: the method publishes no checkpoints of its own."""
        raise NotImplementedError(f"method {self.name!r} has no reference checkpoint layout to convert")

    def loss(
        self,
        out: MethodOutput,
        target: torch.Tensor,
        cfg: C,
        task_loss: TaskLoss,
        teacher: MethodOutput | None = None,
    ) -> LossOutput:
        """The training loss. ``task_loss(logits, target)`` is the loop's CE (smoothing/soft targets)."""
        ce = task_loss(out.logits, target)
        return LossOutput(total=ce, terms={"task_loss": ce.detach()})

    def param_groups(self, model: nn.Module, cfg: C, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups. Default: one group, no decay on 1-d params and tokens (DeiT)."""
        return split_decay(model.named_parameters(), lr, weight_decay)

    def hooks(
        self, model: nn.Module, cfg: C, optimizer: torch.optim.Optimizer | None = None, total_steps: int | None = None,
    ) -> StepHooks:
        """Per-step hooks for this model (see ``StepHooks``); ``optimizer`` is the run's, for methods
        that must edit its state (e.g. zero AdamW moments where DST pruned weights), and
        ``total_steps`` the optimizer steps the run will take (for schedules such as DST's)."""
        return StepHooks()

    def read_reference_state(self, path: Path) -> dict[str, torch.Tensor] | None:
        """Read a checkpoint file in the authors' own format when the generic reader cannot (e.g.
        SViTE's masks in sibling dicts beside a pickled ``args``). Default None: the generic reader."""
        return None

    def calibrate(self, model: nn.Module, cfg: C, loader: Any, device: torch.device) -> dict[str, float]:
        """After training, before measuring: fit what inference needs on held-out training images
        with eval transforms (``needs_calibration``; e.g. DVT's exit thresholds for its budget).
        Runs on one rank; what it fits must live in the model's state (buffers). Returns metrics."""
        return {}

    def inference_model(self, model: nn.Module, cfg: C) -> nn.Module:
        """The network inference really runs, e.g. S2ViTE's physically smaller export. Default: ``model``."""
        return model

    def measure(
        self, model: nn.Module, dense: nn.Module, cfg: C, loader: Any, image_shape: tuple[int, int, int],
        device: torch.device, measure_cfg: Any,
    ) -> "Measurement":
        """Latency, throughput and GFLOPs of the trained ``model`` beside ``dense`` on this device.

        Default: ``measure_pair`` of ``inference_model(model)``. A method whose cost depends on the
        input (DVT's early exits) measures over ``loader`` (the val set) itself and may add tables
        (e.g. accuracy against budget), which the orchestrator records as artifacts.
        """
        from .measure import measure_pair

        return Measurement(measure_pair(self.inference_model(model, cfg), dense, image_shape, device, measure_cfg))

    def stats(self, model: nn.Module, out: MethodOutput | None = None) -> dict[str, float]:
        """Method-specific metrics (flat snake_case floats), from the model and optionally a train output."""
        return {}

    def token_trace(self, model: nn.Module, images: torch.Tensor) -> list["TokenStage"] | None:
        """Which input patches each token stage of the eval-mode (really pruned) forward keeps or
        merges, for ``images [B, 3, H, W]``; None for methods that do not change the tokens
        (default). Runs under ``no_grad`` in eval mode and leaves ``model``'s mode as it was."""
        return None


_NO_DECAY_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token")


def split_decay(named_params, lr: float, weight_decay: float, lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Two AdamW groups as in DeiT: weight decay on matrices, none on biases, norms and tokens."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(t in name for t in _NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": lr * lr_scale, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr * lr_scale, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class UnknownMethodError(KeyError):
    """Raised by ``get_method`` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one readable line
        return str(self.args[0])


_REGISTRY: dict[str, SparsityMethod] = {}


def register_method(name: str):
    """Class decorator: instantiate the method and register it under ``name`` (duplicates raise)."""

    def wrap(cls: type[SparsityMethod]) -> type[SparsityMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name]!r} and {cls!r})")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return wrap


def get_method(name: str) -> SparsityMethod:
    """The registered method called ``name``; the error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}") from None


def list_methods() -> list[str]:
    return sorted(_REGISTRY)
