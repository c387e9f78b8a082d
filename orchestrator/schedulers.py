"""Early stopping for sweeps: ASHA on one objective, MO-ASHA on several.

Both schedulers take ``epoch`` (0-based, as the training loop reports it) as time, record every trial
they stop in the sweep's ledger, and never stop a trial whose report is its last epoch
(``epoch + 1 >= train.epochs``): such a trial is fully trained and only its measurement is left
to report, so stopping it would waste all its training.

MO-ASHA (``MultiObjectiveASHA``) is asynchronous successive halving with Syne Tune's MOASHA rule
(Salinas et al., 2021; Schmucker et al., 2021): when a trial first reaches a rung, it continues if it
is in the top ``1 / reduction_factor`` of the trials recorded at that rung (itself included), ranked
by non-dominated sorting. Ties within the last admitted front are broken by NSGA-II crowding
distance (``orchestrator.pareto.survives_halving``): unlike a hypervolume contribution it needs no
reference point, which does not exist at a rung (the dense model's cost and chance accuracy are
known, but a rung's accuracies are partial-training values), and it is defined for any number of
objectives.

Per-epoch reports carry ``val_top1`` but, until the training loop measures cost at trial start,
not the cost metrics. MO-ASHA ranks on what the reports hold: each trial's latest value of each
objective (a cost metric reported once, e.g. with the first epoch, is carried to later rungs), and
at a rung only the objectives every trial there has. With accuracy alone it is successive halving
on accuracy.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from .pareto import survives_halving

__all__ = ["Ledger", "ledger", "trial_epochs", "RecordingASHA", "MultiObjectiveASHA"]

_logger = logging.getLogger(__name__)


@dataclass
class Ledger:
    """What the sweep's driver learns about its trials while Tune runs them.

    Kept per sweep name in this process rather than on the scheduler and callback: a resumed sweep
    runs Tune's own unpickled copies of those, and they must still report here.
    """

    stopped: set[str] = field(default_factory=set)  # trials the scheduler stopped early
    errored: set[str] = field(default_factory=set)  # trials Tune reports failed (and the scheduler did not stop)


_LEDGERS: dict[str, Ledger] = {}


def ledger(sweep: str) -> Ledger:
    return _LEDGERS.setdefault(sweep, Ledger())


def trial_epochs(trial) -> int | None:
    """The trial's own ``train.epochs`` (methods of one sweep may train for different numbers of
    epochs), from its Tune config (``space`` and sampled ``params``); None when it cannot be told."""
    config = getattr(trial, "config", None) or {}
    space, params = config.get("space"), config.get("params")
    if space is None or params is None:
        return None
    try:
        return int(space.trial_experiment(params).train.epochs)
    except Exception:  # a config the sweep could not build fails in the trial itself, not here
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


class _LastEpoch:
    """Whether a result is its trial's last epoch (each trial's epochs looked up once)."""

    def __init__(self) -> None:
        self.epochs: dict[str, int | None] = {}

    def __call__(self, trial, result: dict) -> bool:
        epoch = result.get("epoch")
        if not _is_number(epoch):
            return False
        if trial.trial_id not in self.epochs:
            self.epochs[trial.trial_id] = trial_epochs(trial)
        total = self.epochs[trial.trial_id]
        return total is not None and epoch + 1 >= total


class RecordingASHA(ASHAScheduler):
    """Ray's ASHA on one objective that records which trials it stopped in the sweep's ledger and
    never stops a trial at its last epoch.

    Tune's stop can reach a trial's driver as an exception, and Tune then reports the trial as
    errored; the scheduler's own decision is the only reliable record that it was stopped early.
    """

    def __init__(self, sweep: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sweep = sweep
        self.last_epoch = _LastEpoch()

    @property
    def stopped(self) -> set[str]:
        return ledger(self.sweep).stopped

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)  # records the result at its rung either way
        if action == self.STOP and self.last_epoch(trial, result):
            self._num_stopped -= 1
            action = self.CONTINUE
        if action == self.STOP:
            self.stopped.add(trial.trial_id)
        return action


class MultiObjectiveASHA(FIFOScheduler):
    """Asynchronous successive halving on several objectives (MOASHA), ``epoch`` as time.

    Rungs are at ``grace_period * reduction_factor**k`` up to ``max_t``, as Ray's ASHA. A trial is
    judged once per rung, on its first report at or past it (the highest rung reached): it is
    recorded there with its latest objective values, and stopped unless
    ``orchestrator.pareto.survives_halving`` keeps it among the rung's top ``ceil(n / rf)``, or the
    report is its last epoch. Trials are never stopped for reaching ``max_t``: they end on their own.
    """

    def __init__(
        self, sweep: str, objectives: Sequence[tuple[str, str]], time_attr: str = "epoch", max_t: int = 100,
        grace_period: int = 1, reduction_factor: float = 2,
    ) -> None:
        if not objectives:
            raise ValueError("MO-ASHA needs at least one objective")
        if grace_period <= 0 or reduction_factor <= 1 or max_t < grace_period:
            raise ValueError(f"MO-ASHA needs 0 < grace_period <= max_t and reduction_factor > 1 "
                             f"(got {grace_period}, {max_t}, {reduction_factor})")
        super().__init__()
        self.sweep = sweep
        self.objectives = [(str(m), str(mode)) for m, mode in objectives]
        self._metric = self.objectives[0][0]
        self.time_attr = time_attr
        self.reduction_factor = reduction_factor
        self.rungs: list[float] = []
        milestone = grace_period
        while milestone <= max_t:
            self.rungs.append(milestone)
            milestone *= reduction_factor
        self.recorded: dict[float, dict[str, dict[str, float]]] = {m: {} for m in self.rungs}
        self.known: dict[str, dict[str, float]] = {}  # each trial's latest value of each objective
        self.last_epoch = _LastEpoch()
        self.num_stopped = 0

    @property
    def stopped(self) -> set[str]:
        return ledger(self.sweep).stopped

    def _remember(self, trial, result: dict) -> dict[str, float]:
        known = self.known.setdefault(trial.trial_id, {})
        known.update({m: float(result[m]) for m, _ in self.objectives if _is_number(result.get(m))})
        return known

    def _record(self, trial, result: dict) -> float | None:
        """Record the trial at the highest rung its report reached, if not yet; returns that rung."""
        known = self._remember(trial, result)
        t = result.get(self.time_attr)
        if not known or not _is_number(t):
            return None
        reached = [m for m in self.rungs if m <= t]
        if not reached or trial.trial_id in self.recorded[reached[-1]]:
            return None
        self.recorded[reached[-1]][trial.trial_id] = dict(known)
        return reached[-1]

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        rung = self._record(trial, result)
        if rung is None:
            return self.CONTINUE
        if survives_halving(self.recorded[rung], self.objectives, self.reduction_factor, trial.trial_id):
            return self.CONTINUE
        if self.last_epoch(trial, result):
            return self.CONTINUE
        self.num_stopped += 1
        self.stopped.add(trial.trial_id)
        _logger.debug("MO-ASHA stops trial %s at rung %s (%d trials there)", trial.trial_id, rung, len(self.recorded[rung]))
        return self.STOP

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if result:
            self._record(trial, result)  # a finished trial's values still inform later cutoffs

    def debug_string(self) -> str:
        rungs = ", ".join(f"{m}: {len(r)}" for m, r in self.recorded.items())
        return f"Using MO-ASHA on {', '.join(m for m, _ in self.objectives)}: num_stopped={self.num_stopped}; trials per rung {{{rungs}}}"

