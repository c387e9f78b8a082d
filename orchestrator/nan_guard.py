"""The NaN guard: a non-finite loss or gradient on any rank, seen by every rank in the same step.

Each step every rank folds ``isfinite(loss)`` and ``isfinite(total grad norm)`` into one flag and
all-reduces it with MIN (one one-element collective, one host sync), so all ranks take the same
branch and DDP's collectives stay matched. On a bad step the configured policy
(``train.nan_guard``, ``orchestrator.config.NanGuardConfig``) is applied on every rank:

* ``skip_batch``: the step's update is dropped (no optimizer, scaler, hook or schedule step);
* ``lower_lr`` / ``amp_off`` / ``fp32_attention``: the model, optimizer, scaler and schedule go back
  to the last good checkpoint (a host-memory copy of what the checkpoint holds, taken whenever a
  checkpoint is made; identical on every rank), the setting changes for the rest of the run, and
  the epoch starts again from that point.

The n-th event since the last good checkpoint applies ``policies[n]``; one more than
``max_retries`` raises ``NonFiniteLossError`` naming the step, the events and the last good
checkpoint (which Ray Train keeps). The events and settings travel in the checkpoint
(``state_dict``), so a restarted worker keeps its lowered learning rate and its history; each
epoch's report carries them (``nan_events`` and ``NAN_EVENTS_KEY``) to MLflow.

With fp16 AMP the ``GradScaler`` owns gradient overflow (it skips such steps and lowers its scale);
the guard then checks the loss only.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import NanGuardConfig
from .report_keys import NAN_EVENTS_KEY

if TYPE_CHECKING:
    from .loop import Run

__all__ = ["NanGuard", "NonFiniteLossError", "RolledBack", "NAN_EVENTS_KEY", "TEST_INJECT_NAN_ENV"]

_logger = logging.getLogger(__name__)

#: An epoch's report carries the run's NaN-guard events so far, as JSON under this key.
#: Test hook (integration tests only): ``{"rank": R, "steps": [S, ...]}`` makes rank R's loss NaN at
#: those optimizer steps, once each (``"from_step": S``: at every step from S on).
TEST_INJECT_NAN_ENV = "PRUNETUNE_TEST_INJECT_NAN"
_ROLLBACK_POLICIES = ("lower_lr", "amp_off", "fp32_attention")
_SCHEDULE_FIELDS = ("base_values", "lr_min", "warmup_lr_init", "warmup_steps")


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient the NaN guard could not recover from (out of retries, or the guard
    is off): the run fails with this reason; its checkpoints are kept."""


class RolledBack(Exception):
    """Raised out of an epoch after a rollback: the caller trains that epoch again (``NanGuard.train_epoch``)."""


class NanGuard:
    """One run's NaN guard (every rank holds one, in the same state)."""

    def __init__(self, cfg: NanGuardConfig) -> None:
        self.cfg = cfg
        self.events: list[dict[str, Any]] = []  # the whole run's, oldest first
        self.window = 0  # events since the last good checkpoint
        self.lr_scale = 1.0
        self.amp_off = False
        self.fp32_attention = False
        self._good: dict[str, Any] | None = None
        self._good_desc = "the run's start"
        self._schedule: dict[str, Any] = {}
        self._inject = _test_injection()
        self._injected: set[int] = set()

    # ---- setup and persistence ----------------------------------------------------------------

    def attach(self, run: Run) -> None:
        """Remember the schedule as built (``lower_lr`` scales it from these values, idempotently)."""
        self._schedule = {k: _copy(getattr(run.scheduler, k)) for k in _SCHEDULE_FIELDS if hasattr(run.scheduler, k)}

    def state_dict(self) -> dict[str, Any]:
        return {"events": [dict(e) for e in self.events], "lr_scale": self.lr_scale, "amp_off": self.amp_off, "fp32_attention": self.fp32_attention}

    def load_state_dict(self, state: dict[str, Any] | None, run: Run) -> None:
        """Settings and events from a checkpoint, applied to ``run``."""
        if not state:
            return
        self.events = [dict(e) for e in state.get("events", [])]
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.amp_off = bool(state.get("amp_off", False))
        self.fp32_attention = bool(state.get("fp32_attention", False))
        self._apply_settings(run)

    def report_metrics(self) -> dict[str, Any]:
        """What an epoch's report carries: the event count, and the events as JSON once there are any."""
        out: dict[str, Any] = {"nan_events": len(self.events)}
        if self.events:
            out[NAN_EVENTS_KEY] = json.dumps(self.events)
        return out

    # ---- checkpoints ---------------------------------------------------------------------------

    def mark_good(self, run: Run, what: str) -> None:
        """``run``'s state is a good checkpoint (``what``, e.g. "epoch 3"): the rollback target from now on."""
        self.window = 0
        self._good_desc = what
        if not self.cfg.enabled or not any(p in _ROLLBACK_POLICIES for p in self.cfg.policies):
            return
        self._good = {
            "model": _to_cpu(run.raw.state_dict()), "optimizer": _to_cpu(run.optimizer.state_dict()),
            "scaler": _to_cpu(run.scaler.state_dict()), "epoch": run.epoch, "step": run.step,
            "batch": getattr(run, "batch", 0), "epoch_sums": dict(getattr(run, "epoch_sums", {})),
        }

    def _rollback(self, run: Run) -> None:
        good = self._good
        if good is None:
            raise RuntimeError("NaN guard: no good state to roll back to (mark_good was never called)")
        run.raw.load_state_dict(good["model"])
        run.optimizer.load_state_dict(good["optimizer"])
        run.scaler.load_state_dict(good["scaler"])
        run.optimizer.zero_grad(set_to_none=True)
        run.epoch, run.step = good["epoch"], good["step"]
        run.batch, run.epoch_sums = good["batch"], dict(good["epoch_sums"])  # a mid-epoch checkpoint: go on from its batch
        run.scheduler.step_update(run.step)

    # ---- each step -----------------------------------------------------------------------------

    def loss_for_test(self, run: Run, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, or NaN where ``TEST_INJECT_NAN_ENV`` asks for it on this rank at this step (tests only)."""
        inject = self._inject
        if inject is None or inject.get("rank", 0) != run.rank:
            return loss
        start = inject.get("from_step")
        once = run.step in inject.get("steps", ()) and run.step not in self._injected
        if once or (start is not None and run.step >= start):
            self._injected.add(run.step)
            return loss * float("nan")
        return loss

    def step_is_finite(self, run: Run, loss: torch.Tensor) -> bool:
        """Whether this step's loss and gradients are finite on every rank (after ``backward``)."""
        flag = torch.isfinite(loss.detach().float()).all()
        if not run.scaler.is_enabled():  # under fp16 AMP the scaler deals with overflowing gradients
            grads = [p.grad for p in run.raw.parameters() if p.grad is not None]
            if grads:
                flag = flag & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        flag = flag.to(torch.float32).reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def on_nonfinite(self, run: Run, loss: torch.Tensor, batch: int) -> None:
        """Handle a bad step (every rank calls this in the same step): skip it (return), or roll back
        and raise ``RolledBack``; past the retry bound, raise ``NonFiniteLossError``."""
        local = float(loss.detach().float())
        event = {"epoch": run.epoch, "step": run.step, "batch": batch, "time": round(time.time(), 3)}
        if not self.cfg.enabled:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at epoch {run.epoch}, step {run.step} ({run.stage}; this rank's loss {local}); "
                f"the NaN guard is off (train.nan_guard.enabled: false); the last good checkpoint ({self._good_desc}) is kept"
            )
        policies = self.cfg.policies
        policy = policies[min(self.window, len(policies) - 1)]
        self.window += 1
        if self.window > self.cfg.max_retries:
            self.events.append({**event, "policy": "gave_up"})
            recent = ", ".join(f"{e['policy']}@step{e['step']}" for e in self.events[-self.window:])
            raise NonFiniteLossError(
                f"non-finite loss or gradient at epoch {run.epoch}, step {run.step} ({run.stage}; this rank's loss {local}): "
                f"the NaN guard gave up after {self.window - 1} retries since the last good checkpoint ({recent}; "
                f"train.nan_guard.max_retries={self.cfg.max_retries}); the last good checkpoint ({self._good_desc}) is kept"
            )
        self.events.append({**event, "policy": policy})
        if run.rank == 0:
            _logger.warning(
                "%s: non-finite loss or gradient at epoch %d, step %d: %s (event %d of at most %d since %s)",
                run.stage, run.epoch, run.step, policy, self.window, self.cfg.max_retries, self._good_desc,
            )
        run.optimizer.zero_grad(set_to_none=True)
        if policy == "skip_batch":
            return
        self._rollback(run)
        if policy == "lower_lr":
            self.lr_scale *= self.cfg.lr_factor
        elif policy == "amp_off":
            self.amp_off = True
        elif policy == "fp32_attention":
            self.fp32_attention = True
        self._apply_settings(run)
        raise RolledBack(policy)

    def train_epoch(self, run: Run, train_one_epoch: Callable[[Run], dict[str, float]]) -> dict[str, float]:
        """``train_one_epoch(run)``, started again from the rollback point after each rollback."""
        while True:
            try:
                return train_one_epoch(run)
            except RolledBack:
                continue

    # ---- settings ------------------------------------------------------------------------------

    def _apply_settings(self, run: Run) -> None:
        if self._schedule and self.lr_scale != 1.0:
            for k, v in self._schedule.items():
                setattr(run.scheduler, k, [x * self.lr_scale for x in v] if isinstance(v, list) else v * self.lr_scale)
            run.scheduler.step_update(run.step)
        if self.amp_off and run.train_cfg.amp:
            run.train_cfg = replace(run.train_cfg, amp=False)
            run.scaler = torch.amp.GradScaler(run.device.type, enabled=False)

    def autocast_context(self, run: Run):
        """Where the forward runs: attention in fp32 once ``fp32_attention`` is on, else as configured."""
        return _Fp32Attention(run.device.type) if self.fp32_attention else nullcontext()


class _Fp32Attention(TorchFunctionMode):
    """Runs ``F.scaled_dot_product_attention`` (timm's attention, the methods' ``sdpa``) in fp32, outside autocast."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            dtype = args[0].dtype
            with torch.autocast(self.device_type, enabled=False):
                out = func(*[_fp32(a) for a in args], **{k: _fp32(v) for k, v in kwargs.items()})
            return out.to(dtype)
        return func(*args, **kwargs)


def _fp32(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _test_injection() -> dict[str, Any] | None:
    raw = os.environ.get(TEST_INJECT_NAN_ENV)
    return json.loads(raw) if raw else None
