"""The training loop of one run (a sweep trial, or the dense pre-training), with no Ray in it.

``build_run`` makes the models, data loaders, optimizer and schedule for this rank; ``fit`` trains,
evaluates top-1/top-5 every epoch, hands each epoch's metrics and checkpoint state to ``report``,
and ends a trial by measuring the sparse model beside the dense one on this device. Under DDP the
caller wraps ``run.model`` (``worker.py`` does, through Ray Train); this module only all-reduces
evaluation counts through ``torch.distributed`` when a process group exists.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from methods import MethodConfig, SparsityMethod, StepHooks, create_backbone, get_method, load_backbone_weights
from methods.dense import DenseConfig, DenseViT
from timm.scheduler import CosineLRScheduler  # after ``methods``: its CPU torchvision guard comes first

from .config import ExperimentConfig, TrainConfig
from .data import build_calibration_datasets, build_datasets
from .nan_guard import NanGuard, NonFiniteLossError
from .resume import ResumableSampler, check_identity, gather_rng_states, loader_seed, seed_everything, set_rng_state
from .timing import Stopwatch
from .report_keys import TABLES_KEY

__all__ = ["Run", "build_run", "ddp_options", "fit", "restore", "NonFiniteLossError", "Report"]

_logger = logging.getLogger(__name__)

Stage = Literal["pretrain", "trial"]
#: ``report(metrics, checkpoint_state)``: state is the dict to checkpoint (rank 0), or None.
Report = Callable[[dict[str, float], "dict[str, Any] | None"], None]


@dataclass
class Run:
    """Everything one rank needs to train one run."""

    exp: ExperimentConfig
    stage: Stage
    method: SparsityMethod
    method_cfg: MethodConfig
    train_cfg: TrainConfig
    raw: nn.Module  # the method model, unwrapped
    teacher: nn.Module | None
    dense: nn.Module  # the dense reference for measurement
    train_loader: DataLoader
    val_loader: DataLoader
    device: torch.device
    image_shape: tuple[int, int, int]
    rank: int = 0
    world_size: int = 1
    model: nn.Module | None = None  # what is trained: ``raw``, or DDP around it
    optimizer: torch.optim.Optimizer | None = None
    scheduler: CosineLRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    hooks: StepHooks = field(default_factory=StepHooks)
    epoch: int = 0  # next epoch to train
    step: int = 0  # optimizer steps so far
    batch: int = 0  # batches of epoch ``epoch`` already trained (a run resumed mid-epoch)
    epoch_sums: dict[str, float] = field(default_factory=dict)  # that partial epoch's metric sums (and ``_n``, ``_seen``)
    rng_states: list | None = None  # every rank's generators at the checkpoint, restored when training starts
    #: ``on_step_checkpoint(state)`` every ``train.checkpoint_every_steps`` steps inside an epoch (all
    #: ranks call it; ``state`` is None except on rank 0).
    on_step_checkpoint: Callable[["dict[str, Any] | None"], None] | None = None
    val_set: Any = None  # the whole val split (rank 0 measures over it when the method's cost depends on the input)
    calibration_loader: DataLoader | None = None  # held-out train images, eval transforms (``needs_calibration``)
    nan_guard: NanGuard | None = None  # ``train.nan_guard`` (``orchestrator.nan_guard``)
    #: Phase times (``orchestrator.timing``), reported cumulatively with every epoch as ``time_*_s``.
    timing: Stopwatch = field(default_factory=Stopwatch)
    started_at: float | None = None  # when the run's driver started it (``time.time()``): start-up and first step count from it


def build_run(
    exp: ExperimentConfig,
    stage: Stage,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    pretrained_path: str | None = None,
) -> Run:
    """Models, loaders, optimizer and schedule for ``stage`` on this rank.

    ``pretrain`` trains the dense backbone from scratch (``exp.pretrain``); ``trial`` builds
    ``exp.method`` on the dense backbone loaded from ``pretrained_path`` (a local file), which is
    also the frozen teacher when the method needs one.
    """
    seed_everything(exp.train.seed + rank)
    base = create_backbone(exp.model)
    if pretrained_path:
        load_backbone_weights(base, pretrained_path)
    if stage == "pretrain":
        method, method_cfg, train_cfg = get_method("dense"), DenseConfig(), exp.pretrain
    else:
        method, method_cfg, train_cfg = get_method(exp.method), exp.method_config, exp.train
        method_cfg = _resolve(method, method_cfg, base, device, rank, cache_dir(exp))
    dense = DenseViT(copy.deepcopy(base)).to(device).eval()
    teacher = None
    if stage == "trial" and method.uses_teacher(method_cfg):
        teacher = dense
        teacher.requires_grad_(False)
    raw = method.build_model(method_cfg, base).to(device)

    img_size = base.patch_embed.img_size
    calibration_ds = None
    if stage == "trial" and method.needs_calibration:
        train_ds, calibration_ds, val_ds = build_calibration_datasets(exp.data, img_size[0], exp.train.seed)
    else:
        train_ds, val_ds = build_datasets(exp.data, img_size[0])
    sampler = ResumableSampler(train_ds, world_size, rank, shuffle=True, seed=train_cfg.seed)  # also for one rank: resumable mid-epoch
    pin = device.type == "cuda"
    workers = exp.data.loader_workers
    train_loader = DataLoader(
        train_ds, batch_size=train_cfg.batch_size, sampler=sampler, drop_last=len(train_ds) >= train_cfg.batch_size * world_size,
        # Its own generator, reseeded each epoch (``loader_seed``), and no persistent workers: each epoch's
        # loader workers are seeded from (seed, rank, epoch) alone, so a resumed run draws as the original.
        num_workers=workers, pin_memory=pin, generator=torch.Generator(),
    )
    val_shard = Subset(val_ds, range(rank, len(val_ds), world_size))  # disjoint shards, exact counts
    val_loader = DataLoader(val_shard, batch_size=train_cfg.batch_size, num_workers=workers, pin_memory=pin)

    run = Run(exp, stage, method, method_cfg, train_cfg, raw, teacher, dense, train_loader, val_loader, device, (3, *img_size), rank, world_size)
    run.val_set = val_ds
    if calibration_ds is not None:  # every rank calibrates on all of it: same weights, same thresholds
        run.calibration_loader = DataLoader(calibration_ds, batch_size=train_cfg.batch_size, num_workers=workers)
    run.model = raw
    run.optimizer = torch.optim.AdamW(method.param_groups(raw, method_cfg, train_cfg.lr, train_cfg.weight_decay), lr=train_cfg.lr)
    steps = len(train_loader)
    total_steps = (train_cfg.schedule_epochs or train_cfg.epochs) * steps
    timm_scheduler_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_scheduler_log.level
    if total_steps == 0:  # nothing to train (evaluation only): timm would warn that its one-step schedule does nothing
        timm_scheduler_log.setLevel(logging.ERROR)
    try:
        run.scheduler = CosineLRScheduler(
            run.optimizer, t_initial=max(1, total_steps), lr_min=train_cfg.min_lr,
            warmup_t=int(train_cfg.warmup_epochs * steps), warmup_lr_init=train_cfg.min_lr, t_in_epochs=False,
        )
    finally:
        timm_scheduler_log.setLevel(level)
    run.scaler = torch.amp.GradScaler(device.type, enabled=_amp_dtype(run) == torch.float16)
    run.hooks = method.hooks(raw, method_cfg, run.optimizer, total_steps=total_steps)
    run.nan_guard = NanGuard(train_cfg.nan_guard)
    run.nan_guard.attach(run)
    return run


def ddp_options(method: SparsityMethod) -> dict[str, bool]:
    """``DistributedDataParallel`` keyword arguments for ``method``'s model.

    torch 2.13 renamed DDP's per-forward buffer broadcast ``forward_sync_buffers``; the old
    ``broadcast_buffers`` still works there but warns (a ``FutureWarning`` on every rank of every
    trial). Older torch (the GPU image's 2.11) has only the old name. With the new one, buffers are
    still synced once when DDP wraps the model, which a method whose ranks compute identical
    buffers themselves (DST masks) does not mind.
    """
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {"find_unused_parameters": method.find_unused_parameters, sync: method.broadcast_buffers}


def cache_dir(exp: ExperimentConfig) -> Path:
    """Where measurements worth reusing across runs on one machine live (e.g. SPViT's latency tables):
    beside a local storage path, else in the user's cache folder."""
    if "://" not in exp.storage_path:
        return Path(exp.storage_path) / "_cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prunetune"


def _resolve(method: SparsityMethod, cfg: MethodConfig, base: nn.Module, device: torch.device, rank: int, cache: Path) -> MethodConfig:
    """``method.resolve`` on rank 0, broadcast to the other ranks: every rank must build the same model."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    box = [method.resolve(cfg, base, device, cache) if rank == 0 or not distributed else None]
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if box[0] != cfg:
        _logger.info("%s resolved for %s: %s", method.name, device, box[0])
    return box[0]


def _amp_dtype(run: Run) -> torch.dtype | None:
    if not run.train_cfg.amp or run.device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def checkpoint_state(run: Run, metrics: dict[str, float], mid_epoch: bool = False) -> dict[str, Any] | None:
    """What a checkpoint holds: enough to resume this run exactly where it stopped (model with the
    method's buffers such as DST masks, optimizer, LR-schedule position, AMP scaler, epoch and
    batch inside it, sampler epoch, every rank's generators). A collective under DDP (the ranks'
    generator states are gathered): every rank calls it; ranks other than 0 get None."""
    rngs = gather_rng_states(run.device)
    if run.rank != 0:
        return None
    return {
        "model": run.raw.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": run.epoch - 1,  # the last finished epoch
        "batch": run.batch if mid_epoch else 0,  # batches done of epoch ``epoch + 1``
        "epoch_sums": dict(run.epoch_sums) if mid_epoch else {},
        "step": run.step,
        "sampler_epoch": run.epoch if mid_epoch else run.epoch - 1,
        "world_size": run.world_size,
        "rng": rngs,
        "stage": run.stage,
        "method": run.method.name,
        "backbone": run.exp.model.name,
        "metrics": metrics,
        "nan_guard": run.nan_guard.state_dict(),
    }


def restore(run: Run, state: dict[str, Any], where: str = "checkpoint") -> None:
    """Continue from a checkpoint state (the run's own, or an ``init_checkpoint`` warm-up).

    Raises:
        CheckpointMismatchError: the checkpoint is of another method or backbone.
    """
    check_identity(state, run.method.name, run.exp.model.name, where)
    run.raw.load_state_dict(state["model"])
    if "optimizer" in state:
        run.optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.epoch = int(state.get("epoch", -1)) + 1
    run.step = int(state.get("step", 0))
    run.batch = int(state.get("batch", 0))
    run.epoch_sums = dict(state.get("epoch_sums", {}))
    run.scheduler.step_update(run.step)
    rngs = state.get("rng")
    if rngs and len(rngs) == run.world_size:
        run.rng_states = rngs  # applied when training starts (building the run drew random numbers since)
    elif rngs:
        _logger.warning("checkpoint of %d ranks resumed on %d: generators reseeded, not restored", len(rngs), run.world_size)
    run.nan_guard.load_state_dict(state.get("nan_guard"), run)  # a lowered LR, AMP off, ...: kept
    _logger.info("resuming %s at epoch %d, batch %d (step %d)", run.stage, run.epoch, run.batch, run.step)


def train_one_epoch(run: Run) -> dict[str, float]:
    run.model.train()
    sampler = run.train_loader.sampler
    if isinstance(sampler, ResumableSampler):
        sampler.set_position(run.epoch, run.batch * run.train_cfg.batch_size)
    elif isinstance(sampler, DistributedSampler):
        sampler.set_epoch(run.epoch)
    if run.train_loader.generator is not None:
        run.train_loader.generator.manual_seed(loader_seed(run.train_cfg.seed, run.rank, run.epoch))
    if run.rng_states is not None:  # resumed: continue every generator where the checkpoint left it
        set_rng_state(run.rng_states[run.rank], run.device)
        run.rng_states = None
    task_loss = nn.CrossEntropyLoss(label_smoothing=run.train_cfg.label_smoothing)
    amp = _amp_dtype(run)
    sums: dict[str, float] = {k: v for k, v in run.epoch_sums.items() if not k.startswith("_")}
    n, seen = int(run.epoch_sums.get("_n", 0)), int(run.epoch_sums.get("_seen", 0))
    every = run.train_cfg.checkpoint_every_steps
    steps = len(run.train_loader)
    start = time.perf_counter()
    for images, target in run.train_loader:
        images, target = images.to(run.device, non_blocking=True), target.to(run.device, non_blocking=True)
        with torch.autocast(run.device.type, dtype=amp) if amp else nullcontext(), run.nan_guard.autocast_context(run):
            teacher_out = None
            if run.teacher is not None:
                with torch.no_grad():
                    teacher_out = run.teacher(images)
            out = run.model(images)
            loss = run.method.loss(out, target, run.method_cfg, task_loss, teacher=teacher_out)
        total = run.nan_guard.loss_for_test(run, loss.total)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(total).backward()
        if not run.nan_guard.step_is_finite(run, total):  # all ranks agree, in this step
            run.nan_guard.on_nonfinite(run, total, run.batch)  # skips this batch, or rolls back and raises
            run.batch += 1
            continue
        run.hooks.after_backward(run.step)
        if run.train_cfg.grad_clip:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.raw.parameters(), run.train_cfg.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.hooks.after_optimizer_step(run.step)
        run.step += 1
        run.timing.mark("to_first_step")
        run.scheduler.step_update(run.step)
        terms = {"train_loss": loss.total.detach(), **{f"train_{k}": v for k, v in loss.terms.items()}}
        terms.update(run.method.stats(run.raw, out))
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
        seen += len(target)
        run.batch += 1
        if every and run.on_step_checkpoint is not None and run.step % every == 0 and run.batch < steps:
            run.epoch_sums = {**sums, "_n": n, "_seen": seen}
            run.on_step_checkpoint(checkpoint_state(run, {"epoch": run.epoch, "step": run.step}, mid_epoch=True))
            run.nan_guard.mark_good(run, f"epoch {run.epoch}, step {run.step}")
    run.batch, run.epoch_sums = 0, {}
    metrics = {k: v / max(n, 1) for k, v in sums.items()}
    metrics["train_samples"] = seen  # this rank's images this epoch (its DistributedSampler shard)
    metrics["epoch_time_s"] = time.perf_counter() - start
    metrics["lr"] = max(g["lr"] for g in run.optimizer.param_groups)
    return metrics


def evaluate(run: Run) -> dict[str, float]:
    """Top-1/top-5 (percent) and loss on the whole val set, in eval mode (the real sparse path)."""
    run.model.eval()
    return evaluate_model(run.raw, run.val_loader, run.device)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """``val_top1``/``val_top5`` (percent) and ``val_loss`` of ``model`` (eval mode) over ``loader``,
    summed over the ranks' shards when a process group exists."""
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, n
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        logits = model(images).logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk.eq(target[:, None])
        counts += torch.tensor(
            [hit[:, 0].sum().item(), hit.any(-1).sum().item(), nn.functional.cross_entropy(logits, target, reduction="sum").item(), len(target)],
            dtype=torch.float64, device=device,
        )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    top1, top5, loss_sum, n = counts.tolist()
    return {"val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n, "val_loss": loss_sum / n}


def fit(run: Run, report: Report) -> dict[str, float]:
    """Train the remaining epochs, reporting each; a trial then measures latency/throughput/GFLOPs.

    Every rank calls ``report`` the same number of times (Ray Train requires it); each report
    carries the run's cumulative phase times (``time_*_s``, ``orchestrator.timing``). Returns the
    last metrics reported.
    """
    metrics: dict[str, float] = {}
    total = run.train_cfg.epochs
    timing = run.timing
    if run.started_at is not None:
        timing.mark("startup")
    with timing("measure"):
        cost = early_cost(run) if run.epoch < total else {}
    run.nan_guard.mark_good(run, "the run's start" if run.step == 0 else f"epoch {run.epoch - 1}, step {run.step}")
    while run.epoch < total:
        with timing("train"):
            train = run.nan_guard.train_epoch(run, train_one_epoch)  # an epoch rolled back by the NaN guard starts again
            run.hooks.on_epoch_end(run.epoch)
        with timing("eval"):
            val = evaluate(run)
        metrics = {"epoch": run.epoch, **train, **val, **cost, **run.nan_guard.report_metrics(), **timing.metrics(run.started_at)}
        run.epoch += 1
        if run.rank == 0:
            _logger.info(
                "%s epoch %d/%d: train_loss %.4f, val_top1 %.2f%% (%.1fs)",
                run.stage, run.epoch, total, metrics["train_loss"], metrics["val_top1"], metrics["epoch_time_s"],
            )
        with timing("checkpoint"):
            report(metrics, checkpoint_state(run, metrics))
        run.nan_guard.mark_good(run, f"epoch {run.epoch - 1}")
    calibrated: dict[str, float] = {}
    if run.stage == "trial" and run.calibration_loader is not None:
        run.raw.eval()
        with timing("measure"):
            calibrated = run.method.calibrate(run.raw, run.method_cfg, run.calibration_loader, run.device)
        with timing("eval"):
            metrics = {"epoch": max(total - 1, 0), **evaluate(run)}  # accuracy as calibrated
    if not metrics:  # nothing to train (epochs 0), or resumed after the last epoch: evaluate for the final report
        with timing("eval"):
            metrics = {"epoch": max(total - 1, 0), **evaluate(run)}
    final = {k: v for k, v in metrics.items() if k.startswith("val_") or k == "epoch"}
    if run.stage == "trial":
        if run.rank == 0:
            final.update(calibrated)
            with timing("measure"):
                final.update(measure(run))
            final["params_m"] = sum(p.numel() for p in run.raw.parameters()) / 1e6
            final.update(run.method.stats(run.raw))
            final.update(timing.metrics(run.started_at))
        report(final, None)
    return final


def early_cost(run: Run) -> dict[str, float]:
    """The cost objectives measured once before training, for multi-objective early stopping (MO-ASHA
    ranks trials at each rung on accuracy *and* cost, so every epoch's report carries the cost).

    A model's latency, throughput and GFLOPs do not depend on its weights, except where the method's
    cost does depend on training (``cost_depends_on_training``: DVT's exit distribution), which then
    has no early figure. Only rank 0 measures (only its reports reach Tune); the final measurement
    after training is taken as always.
    """
    sweep = run.exp.sweep
    if run.stage != "trial" or run.rank != 0 or sweep.asha is None or len(sweep.objectives) < 2 or run.method.cost_depends_on_training:
        return {}
    # Timing draws random inputs: on a forked generator, so training sees the same random stream
    # with or without this early measurement (a sweep with MO-ASHA trains as one without it).
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        measured = run.method.measure(run.raw, run.dense, run.method_cfg, None, run.image_shape, run.device, run.exp.measure).metrics
    return {o.metric: measured[o.metric] for o in sweep.objectives if o.metric in measured and not o.metric.startswith("val_")}




def measure(run: Run) -> dict[str, Any]:
    """The method's measurement of the trained model beside the dense one (``SparsityMethod.measure``);
    its tables, if any, ride along as JSON under ``TABLES_KEY``."""
    loader = DataLoader(run.val_set, batch_size=run.train_cfg.batch_size, num_workers=run.exp.data.loader_workers) if run.val_set is not None else None
    result = run.method.measure(run.raw, run.dense, run.method_cfg, loader, run.image_shape, run.device, run.exp.measure)
    out: dict[str, Any] = dict(result.metrics)
    if result.tables:
        out[TABLES_KEY] = json.dumps(result.tables)
    return out
