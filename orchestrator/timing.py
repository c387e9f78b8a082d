"""Where a sweep's wall-clock time goes: start-up, training, evaluation, measurement, logging.

Each run's loop keeps a ``Stopwatch`` and reports its cumulative phase times with every epoch
(``time_train_s``, ``time_eval_s``, ...), so a run's MLflow history shows them and its last value is
the total. A trial's driver adds what it spends on MLflow (``time_logging_s``) and its own wall time
(``time_trial_s``); the process that logs its results (Ray Train's controller, or an evaluation
task), what that logging cost (``time_report_logging_s``).
At the end of a sweep ``sweep_breakdown`` adds these up over the sweep's runs beside the sweep's own
phases (checks and Ray's start, the dense pre-training, the reference measurement, the front and
report), and the sweep logs it in one line and on its parent run (``time_*`` metrics and
``timing.json``). The categories always add up to the sweep's wall time: trials that ran at once
(and logging that overlapped training) count as shares of the wall time they shared.

Phase times of a run resumed after an interruption count from its latest start only.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

__all__ = ["Stopwatch", "PHASES", "sweep_breakdown", "format_breakdown"]

#: The breakdown's categories, in the order they are printed.
PHASES = ("startup", "training", "evaluation", "measurement", "logging", "other")


class Stopwatch:
    """Sums of named wall-clock durations (seconds), plus marks in wall-clock time."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.marks: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def mark(self, name: str, once: bool = True) -> None:
        """Remember when ``name`` happened (``time.time()``: comparable across processes of a node)."""
        if not (once and name in self.marks):
            self.marks[name] = time.time()

    def metrics(self, started_at: float | None = None) -> dict[str, float]:
        """``time_<name>_s`` for every sum; with ``started_at`` (the run's start, ``time.time()``),
        ``time_<mark>_s`` for each mark: seconds from the start to it."""
        out = {f"time_{k}_s": v for k, v in self.totals.items()}
        if started_at is not None:
            out.update({f"time_{k}_s": max(0.0, t - started_at) for k, t in self.marks.items()})
        return out


def _get(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else 0.0


_RUN_PHASES = {
    "startup": ("time_startup_s",),
    "training": ("time_train_s",),
    "evaluation": ("time_eval_s",),
    "measurement": ("time_measure_s",),
    "logging": ("time_checkpoint_s", "time_logging_s", "time_report_logging_s"),
}


def _run_phases(runs: Iterable[dict[str, Any]]) -> tuple[dict[str, float], int]:
    sums, n = dict.fromkeys(_RUN_PHASES, 0.0), 0
    for m in runs:
        n += 1
        for phase, keys in _RUN_PHASES.items():
            sums[phase] += sum(_get(m, k) for k in keys)
    return sums, n


def _fit(sums: dict[str, float], window: float | None) -> float:
    """The factor that brings ``sums`` within ``window`` seconds (1 when they fit, or no window)."""
    total = sum(sums.values())
    return window / total if window is not None and total > window > 0 else 1.0


def sweep_breakdown(
    wall_s: float, sweep_phases: dict[str, float], runs: Iterable[dict[str, Any]], pretrain: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The sweep's wall time by category, in seconds, with ``total``; the categories add up to it.

    ``sweep_phases``: the driver's own ``setup`` (checks, Ray, MLflow parent), ``pretrain`` (the dense
    pre-training's wall time), ``reference`` (the dense reference measurement), ``tune`` (the Tuner's
    wall time) and ``finalize`` (front, report). ``runs``: the latest metrics of the sweep's trial
    runs, ``pretrain``: those of the pre-training run it trained (``time_*`` keys as the loop and the
    trial driver report them).

    Phases can overlap: trials run at once, and Ray Train's controller logs one epoch's results to
    MLflow while the workers train the next. When the trials' phases add up to more than the Tuner's
    wall time (or the pre-training's to more than its own), they are scaled down to shares of it
    (``trial_scale``, ``pretrain_scale`` < 1; ``trial_seconds``: the trials' unscaled sum), so that
    no category claims seconds the sweep did not spend.
    """
    out = dict.fromkeys(PHASES, 0.0)
    out["startup"] += sweep_phases.get("setup", 0.0)
    out["measurement"] += sweep_phases.get("reference", 0.0)
    out["logging"] += sweep_phases.get("finalize", 0.0)
    own, _ = _run_phases([pretrain] if pretrain else [])
    trials, n = _run_phases(runs)
    own_scale, trial_scale = _fit(own, sweep_phases.get("pretrain")), _fit(trials, sweep_phases.get("tune"))
    for phase in _RUN_PHASES:
        out[phase] += own_scale * own[phase] + trial_scale * trials[phase]
    out = {k: round(v, 2) for k, v in out.items()}
    out["other"] = round(max(0.0, wall_s - sum(out.values())), 2)
    out["total"] = round(wall_s, 2)
    out["trial_count"] = n
    out["trial_seconds"] = round(sum(trials.values()), 2)
    out["trial_scale"] = round(trial_scale, 4)
    out["pretrain_scale"] = round(own_scale, 4)
    return out


def format_breakdown(b: dict[str, float]) -> str:
    """``281 s: start-up 40 s (14%), training 150 s (53%), ...`` (and how much trials overlapped)."""
    total = b.get("total", 0.0) or 1.0
    parts = [f"{p.replace('startup', 'start-up')} {b.get(p, 0.0):.0f} s ({100 * b.get(p, 0.0) / total:.0f}%)" for p in PHASES]
    line = f"{b.get('total', 0.0):.0f} s: " + ", ".join(parts)
    if b.get("trial_scale", 1.0) < 1.0:
        line += f"; trial phases overlapped ({b['trial_seconds']:.0f} s of them, counted as shares of the Tuner's wall time)"
    return line
