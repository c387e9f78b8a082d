"""A sweep: Ray Tune + Optuna (multi-objective) over Ray Train trials, recorded in MLflow.

``run_sweep`` checks everything the user gave before anything is recorded (data folder, tracking
store, pretrained weights), trains the dense backbone first when the method needs one and none is
given, opens the sweep's MLflow parent run, runs the Tuner, and finally tags the Pareto front.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from methods import CheckpointError, create_backbone, get_method, load_backbone_weights

from . import cluster, driver, report, storage, study
from .console import quiet_worker_logs
from .config import ExperimentConfig, SweepConfig, apply_overrides, to_flat_dict
from .data import check_image_folder
from .errors import UserError
from .errors import ConfigError
from .pareto import hypervolume
from .schedulers import MultiObjectiveASHA, RecordingASHA, ledger as _ledger, trial_epochs
from .search_space import SweepSpace
from .timing import PHASES, Stopwatch, format_breakdown, sweep_breakdown
from .tracking import (
    HYPERVOLUME_METRIC, INTERRUPTED_TAG, OBJECTIVES_TAG, ROLE_TAG, SEARCHED_TAG, STOPPED_EARLY_TAG, SWEEP_TAG, Tracker,
    check_reachable, param_value, redact, resolve_uri,
)

__all__ = ["run_sweep", "SweepOutcome", "init_ray"]

_logger = logging.getLogger(__name__)
_PARAMS = "params"
RECONCILED_TAG = "prunetune.reconciled"  # a run a killed driver left RUNNING, ended by the resumed sweep

#: Settings the sweep's driver process needs (the Tune controller runs there). They are set in this
#: process's environment, which a local Ray inherits; ray.init gets no runtime_env, so a
#: ``ray job submit`` job keeps its own (working dir, pip) and secrets never pass through one.
_DRIVER_ENV = {
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",  # per-epoch reports lack the final latency metrics
}
@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    front: list[dict]
    trials: int
    errors: int
    stopped_early: int = 0
    interrupted: bool = False
    study_storage: str | None = None  # where the Optuna study (named after the sweep) lives, if not in memory


def _verbose() -> bool:
    """``prunetune -v``: keep Ray's and Tune's own console output as it is."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster (``address``, ``RAY_ADDRESS`` or a ``ray job submit`` job), else start Ray locally."""
    os.environ.update(_DRIVER_ENV)
    if ray.is_initialized():
        return
    cluster.connect(address, logging_level=logging.WARNING)  # one line for a wrong address or token
    if not _verbose():
        quiet_worker_logs()  # Ray's per-report/per-checkpoint lines stay in its log files only


def _check_cluster(exp: ExperimentConfig, space: SweepSpace, uri: str) -> None:
    """Every arm's trial fits the cluster, and every other node reaches the tracking store and the storage."""
    base = [(a.method, apply_overrides(a.experiment, a.space.fixed())) for a in space.arms]  # with fixed values (train.epochs: 0)
    arms = [(method, e.resources, e.train.epochs == 0) for method, e in base]
    if not exp.model.pretrained and any(get_method(m).needs_pretrained for m in space.methods()):
        arms.append(("dense pre-training", exp.resources, False))
    cluster.check_fits(arms)
    cluster.check_from_nodes(uri, exp.storage_path)


def _check_pretrained(exp: ExperimentConfig) -> None:
    """Load the given weights into the backbone once here, so a bad file fails before any trial."""
    try:
        load_backbone_weights(create_backbone(exp.model), storage.fetch(exp.model.pretrained))
    except CheckpointError as e:
        raise UserError(str(e)) from None


def _sampler(cfg: SweepConfig):
    import optuna

    if not _verbose():
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "A new study created" lines: Tune's business
    startup = cfg.startup_trials
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, **({"population_size": startup} if startup else {}))
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, **({"n_startup_trials": startup} if startup else {}))


def _searcher(exp: ExperimentConfig, space: SweepSpace, name: str | None = None, storage: Any = None) -> OptunaSearch:
    """Optuna over ``space``; its study is ``name`` in ``storage`` (an Optuna storage) when given, else in memory."""
    try:
        points = [{f"{_PARAMS}/{k}": v for k, v in space.optuna_point(p).items()} for p in exp.sweep.points_to_evaluate]
    except ConfigError as e:
        raise UserError(f"sweep.points_to_evaluate: {e}") from None
    return OptunaSearch(
        space=space.define_by_run() if space.conditional else None,
        metric=[o.metric for o in exp.sweep.objectives],
        mode=[o.mode for o in exp.sweep.objectives],
        sampler=_sampler(exp.sweep),
        points_to_evaluate=points or None,
        **({"storage": storage, "study_name": name} if storage is not None else {}),
    )


_RecordingASHA = RecordingASHA  # its old name here (the ledger and the schedulers live in orchestrator.schedulers)


def _scheduler(exp: ExperimentConfig, sweep: str, max_epochs: int) -> RecordingASHA | MultiObjectiveASHA | None:
    """ASHA on the objective when there is one, MO-ASHA when there are several; None without ``sweep.asha``."""
    asha = exp.sweep.asha
    if asha is None:
        return None
    max_t = max(1, max_epochs, asha.grace_period)
    objectives = [(o.metric, o.mode) for o in exp.sweep.objectives]
    if len(objectives) > 1:
        return MultiObjectiveASHA(
            sweep, objectives, time_attr="epoch", max_t=max_t, grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
        )
    (metric, mode), = objectives
    return RecordingASHA(
        sweep, time_attr="epoch", metric=metric, mode=mode, max_t=max_t,
        grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_method(trial) -> str:
    space: SweepSpace = trial.config["space"]
    return space.arm(trial.config.get(_PARAMS, {})).method


class _Progress(tune.Callback):
    """One log line per trial epoch and per finished trial, so long sweeps show where they are;
    failed trials go to the sweep's ledger; after every finished trial, the hypervolume of the
    finished trials' front goes to the sweep's parent run (metric ``hypervolume``, step = the
    number of trials finished), so search efficiency is a curve in MLflow."""

    def __init__(
        self, total_epochs: dict[str, int], sweep: str, objectives: list[tuple[str, str]] | None = None,
        tracker: Tracker | None = None, parent: str | None = None, reference: dict[str, float] | None = None,
    ) -> None:
        self.total_epochs = total_epochs  # per method
        self.sweep = sweep
        self.objectives = objectives or []
        self.tracker = tracker
        self.parent = parent
        self.reference = dict(reference or {})  # completed from finished trials' dense_* when the sweep had no reference run
        self.epochs: dict[str, int | None] = {}  # per trial

    def on_trial_start(self, iteration, trials, trial, **info):
        params = trial.config.get(_PARAMS, {})
        shown = ", ".join(f"{k.split(':')[-1]}={_short(v)}" for k, v in sorted(params.items()) if k != "method")
        _logger.info("trial %s (%s) started: %s", trial.trial_id, _trial_method(trial), shown or "no searched parameters")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "latency_ms" in result and "train_loss" not in result:  # the final report (an epoch's may carry a latency too, for MO-ASHA)
            nan = float("nan")
            _logger.info(
                "trial %s (%s) measured: val_top1 %.2f%%, latency %.3f ms (dense %.3f, speedup %.2fx), "
                "throughput %.0f img/s (%.2fx dense), %.4f GFLOPs",
                trial.trial_id, _trial_method(trial), result.get("val_top1", nan), result["latency_ms"], result.get("dense_latency_ms", nan),
                result.get("speedup", nan), result.get("throughput_ips", nan), result.get("throughput_ratio", nan), result.get("gflops", nan),
            )
        elif "val_top1" in result:
            _logger.info(
                "trial %s epoch %d/%d: val_top1 %.2f%%, train_loss %.4f",
                trial.trial_id, int(result.get("epoch", 0)) + 1, self.total_epochs.get(_trial_method(trial), 0), result["val_top1"],
                result.get("train_loss", float("nan")),
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.tracker is None:
            return
        if trial.trial_id in _ledger(self.sweep).stopped:
            self._end_stopped(trial)
        if not getattr(self, "objectives", None):
            return
        try:
            self._log_hypervolume(trials, trial)
        except Exception as e:  # the curve is a record, never a reason to fail the sweep
            _logger.warning("sweep %s: hypervolume not logged after trial %s (%s: %s)", self.sweep, trial.trial_id, type(e).__name__, e)

    def _end_stopped(self, trial) -> None:
        """A trial the scheduler stopped is ended in MLflow now, not only when the sweep ends (its own
        driver leaves the run alone once Tune has stopped it: ``driver.stopped_by_tune``)."""
        try:
            run_id = self.tracker.find_trial_run(self.parent, trial.trial_id)
            if run_id:
                self.tracker.end_stopped_early(run_id)
        except Exception as e:  # finalize_sweep ends it at the latest; never a reason to fail the sweep
            _logger.warning("sweep %s: trial %s's run not ended yet (%s: %s)", self.sweep, trial.trial_id, type(e).__name__, e)

    def _finished(self, trials, current) -> dict[str, dict]:
        """The final results of the trials that finished, by trial id: trained to their last epoch and
        not stopped by the scheduler (Tune calls ``on_trial_complete`` for stopped trials too)."""
        stopped = _ledger(self.sweep).stopped
        out = {}
        for t in trials:
            if t.trial_id in stopped or (t is not current and t.status != "TERMINATED"):
                continue
            result = t.last_result or {}
            if t.trial_id not in self.epochs:
                self.epochs[t.trial_id] = trial_epochs(t)
            total, epoch = self.epochs[t.trial_id], result.get("epoch")
            if total is not None and isinstance(epoch, (int, float)) and epoch + 1 >= total:
                out[t.trial_id] = result
        return out

    def _log_hypervolume(self, trials, current) -> None:
        by_trial = self._finished(trials, current)
        if current.trial_id not in by_trial:
            return  # a stopped trial adds no point, and no step
        finished = list(by_trial.values())
        if len(self.reference) < len(self.objectives):
            self.reference = self.tracker.hv_reference(self.parent, self.objectives, trials=finished)
            if len(self.reference) < len(self.objectives):
                missing = [m for m, _ in self.objectives if m not in self.reference]
                _logger.info("sweep %s: no hypervolume yet: no reference value for %s", self.sweep, ", ".join(missing))
                return
        value = hypervolume(finished, self.objectives, self.reference)
        self.tracker.log_metrics(self.parent, {HYPERVOLUME_METRIC: value}, step=len(finished))
        _logger.info("sweep %s: hypervolume %.6g after %d finished trials", self.sweep, value, len(finished))

    def on_trial_error(self, iteration, trials, trial, **info):
        ledger = _ledger(self.sweep)
        if trial.trial_id in ledger.stopped:
            _logger.info("trial %s stopped early by ASHA", trial.trial_id)
            return
        ledger.errored.add(trial.trial_id)
        _logger.error("trial %s failed; see %s", trial.trial_id, trial.path)


def _resumable(tracker: Tracker, name: str, path: str):
    """The parent run of the interrupted sweep ``name``; a UserError when there is nothing to resume.

    A sweep whose driver died after opening its parent run but before Tune first saved its state has
    a parent and no Tune state: it is resumed too, with its trials started afresh under that parent
    (``run_sweep`` checks ``Tuner.can_restore``), rather than leaving a second parent behind.
    """
    previous = tracker.find_sweep_run(name)
    if previous is None:
        if not tune.Tuner.can_restore(path):
            raise UserError(f"--resume {name}: no sweep state at {redact(path)} (check the config's storage_path)")
        raise UserError(f"--resume {name}: experiment {tracker.experiment!r} at {redact(tracker.uri)} has no sweep run named {name!r}")
    if previous.info.status == "FINISHED":
        raise UserError(f"--resume {name}: that sweep already finished (MLflow run {previous.info.run_id})")
    return previous


def _reconcile(tracker: Tracker, parent: str) -> list[str]:
    """End the child runs a killed driver left RUNNING (KILLED, tagged ``prunetune.reconciled``).

    Trials that Tune then resumes reopen their own run (``driver.run_trial``); the others stay ended,
    and ``finalize_sweep`` records them as interrupted. Returns the run ids it ended.
    """
    ended = []
    for run in tracker.children(parent):
        if run.info.status == "RUNNING":
            tracker.end_run(run.info.run_id, "KILLED")
            tracker.set_tags(run.info.run_id, {RECONCILED_TAG: "true"})
            ended.append(run.info.run_id)
    if ended:
        _logger.info("sweep run %s: %d run(s) left RUNNING by the previous driver ended as KILLED", parent, len(ended))
    return ended


def _check_same_config(name: str, previous, exp: ExperimentConfig) -> None:
    """A resumed sweep must run the config it started with (its trials keep theirs). The dense
    backbone's weights, when the sweep trained them, follow from the rest of the config."""
    derived = {"tracking.uri"} | ({"model.pretrained"} if not exp.model.pretrained else set())
    for key, value in to_flat_dict(exp).items():
        recorded = previous.data.params.get(key)
        if key not in derived and recorded is not None and recorded != param_value(key, value):
            raise UserError(f"--resume {name}: {key} is {param_value(key, value)} but the sweep ran with {recorded}")


@contextlib.contextmanager
def _quiet_tune():
    """Tune without its console tables (``prunetune -v``: with them). Tune's new output engine prints
    its configuration and final status tables even at ``verbose=0``; its legacy engine, at
    ``verbose=0``, prints nothing, and ``_Progress`` prints one line per trial epoch instead."""
    if _verbose():
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _log_breakdown(tracker: Tracker, name: str, parent: str, exp: ExperimentConfig, started: float, phases: Stopwatch) -> None:
    """Where the sweep's wall time went (``orchestrator.timing``): one log line, and on the parent run
    as ``time_<phase>_s`` metrics and ``timing.json``. A record only: a failure warns."""
    try:
        runs = [dict(r.data.metrics) for r in tracker.children(parent) if r.data.tags.get(ROLE_TAG) == "trial"]
        pretrain = None
        if phases.totals.get("pretrain"):  # trained by this sweep: its own phases, from its run
            pretrain = next((
                dict(r.data.metrics)
                for r in tracker.search_runs(f"tags.`{ROLE_TAG}` = 'pretrain' AND tags.`mlflow.runName` = '{driver.pretrain_run_name(exp)}'")
                if r.info.start_time >= started * 1000 - 1000
            ), None)
        breakdown = sweep_breakdown(time.time() - started, phases.totals, runs, pretrain)
        breakdown.update({f"sweep_{k}": round(v, 2) for k, v in phases.totals.items()})
        tracker.log_metrics(parent, {f"time_{k}_s": breakdown[k] for k in (*PHASES, "total", "trial_seconds")} | {f"time_{k}": breakdown[k] for k in ("trial_scale", "pretrain_scale")})
        tracker.log_text(parent, json.dumps(breakdown, indent=1), "timing.json")
        _logger.info("sweep %s took %s", name, format_breakdown(breakdown))
    except Exception as e:
        _logger.warning("sweep %s: time breakdown not recorded (%s: %s)", name, type(e).__name__, e)


def run_sweep(
    exp: ExperimentConfig, space: SweepSpace, name: str | None = None, address: str | None = None, resume: bool = False,
) -> SweepOutcome:
    """Run the whole sweep described by ``exp`` over ``space``; returns the Pareto front read from MLflow.

    ``resume=True`` continues the interrupted sweep ``name`` (Tune's state, its MLflow runs, and each
    unfinished or failed trial from its latest checkpoint) under the same config.
    """
    if resume and not name:
        raise UserError("resuming a sweep needs its name")
    started, phases = time.time(), Stopwatch()
    uri = resolve_uri(exp.tracking.uri)
    check_reachable(uri)
    storage.check_bucket(exp.storage_path)  # missing bucket, no credentials: before anything is recorded
    check_image_folder(exp.data.path)
    if exp.model.pretrained:
        _check_pretrained(exp)
    name = name or f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = Tracker(uri, exp.tracking.experiment)
    sweep_storage = storage.join(exp.storage_path, name)  # Tune's state; Train runs go under trial_<id>/ here
    previous = _resumable(tracker, name, sweep_storage) if resume else None
    if previous is not None:
        _check_same_config(name, previous, exp)
    study_uri = exp.sweep.study_storage
    optuna_storage = study.open_storage(study_uri, uri) if study_uri else None
    if optuna_storage is not None and previous is None:
        study.check_new_study(optuna_storage, name)
    if previous is None and (same := tracker.find_sweep_run(name)) is not None:  # a second parent of one name
        raise UserError(f"sweep {name!r} exists already (MLflow run {same.info.run_id}, {same.info.status}); continue it with --resume {name}")
    restorable = previous is not None and tune.Tuner.can_restore(sweep_storage)
    init_ray(address)
    _check_cluster(exp, space, uri)
    cluster.stop_on_sigterm()  # ray job stop: as Ctrl+C

    if not exp.model.pretrained and any(get_method(m).needs_pretrained for m in space.methods()):
        with phases("pretrain"):
            exp = replace(exp, model=replace(exp.model, pretrained=driver.train_dense(exp, tracker)))
        space = space.with_pretrained(exp.model.pretrained)

    objectives = [(o.metric, o.mode) for o in exp.sweep.objectives]
    if previous is not None:
        parent = previous.info.run_id
        tracker.reopen(parent)
        _reconcile(tracker, parent)
        if not restorable:
            _logger.warning("sweep %s: its driver stopped before Tune saved any state: its trials start afresh under run %s", name, parent)
    else:
        parent = tracker.start_run(
            name,
            params=to_flat_dict(exp),
            tags={
                ROLE_TAG: "sweep", SWEEP_TAG: name, "method": ",".join(space.methods()), "backbone": exp.model.name,
                SEARCHED_TAG: ",".join(space.names()), OBJECTIVES_TAG: json.dumps(objectives),
                "prunetune.search_space": space.source, "prunetune.storage_path": redact(sweep_storage),
            },
        )
    _logger.info("sweep %s%s: MLflow run %s in experiment %r at %s", name, " (resumed)" if resume else "", parent, exp.tracking.experiment, redact(uri))
    if study_uri:
        tracker.set_tags(parent, study.study_tag(study_uri, name))
        _logger.info("sweep %s: Optuna study %r; browse it with: %s", name, name, study.dashboard_command(study_uri))
    if exp.model.pretrained:  # without trained weights a dense accuracy would mean nothing
        with phases("reference"):
            driver.measure_reference(exp, tracker, parent)
    reference = tracker.hv_reference(parent, objectives)  # chance accuracy, the dense model's cost; recorded on the parent
    param_space: dict[str, Any] = {
        "space": space, _PARAMS: space.tune_space(), "parent_run_id": parent,
        "tracking_uri": uri, "sweep_name": name, "storage_path": sweep_storage,
    }
    # A trial's actor only waits on its workers or its evaluation task (memory, no CPU).
    trainable = tune.with_resources(driver.run_trial, driver.TRIAL_RESOURCES)
    epochs = {a.method: a.experiment.train.epochs for a in space.arms}
    if restorable:
        # Tune restores its searcher, scheduler and callbacks; unfinished and failed trials go on from their checkpoints.
        tuner = tune.Tuner.restore(sweep_storage, trainable, resume_unfinished=True, resume_errored=True, param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(exp, space, name, optuna_storage), scheduler=_scheduler(exp, name, max(epochs.values())),
                num_samples=exp.sweep.num_samples, max_concurrent_trials=exp.sweep.max_concurrent_trials,
                # A finished trial's actor (a process with torch, timm and MLflow imported) runs the next
                # trial: seconds less start-up per trial. Not with early stopping: a trial the scheduler
                # stops is still inside its TorchTrainer, and Tune would wait for it to hand its actor on.
                reuse_actors=exp.sweep.asha is None,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=exp.storage_path,
                failure_config=tune.FailureConfig(max_failures=exp.sweep.max_failures),
                callbacks=[_Progress(epochs, name, objectives, tracker, parent, reference)],
                verbose=None if _verbose() else 0,  # our _Progress prints one line per trial epoch instead of Tune's tables
            ),
        )
    ledger = _ledger(name)  # _Progress keeps trials ASHA stopped out of ``errored``, however their driver ended
    phases.add("setup", time.time() - started - sum(phases.totals.values()))
    try:
        with _quiet_tune(), phases("tune"):
            results = tuner.fit()
    except BaseException:
        tracker.finalize_sweep(parent, objectives, status="KILLED", errored=ledger.errored, stopped=ledger.stopped)
        raise
    errors = len(ledger.errored)
    # Ctrl+C (SIGINT) makes Tune end the run gracefully and return: trials left unfinished or never started.
    interrupted = results.num_terminated + results.num_errors < len(results) or len(results) < exp.sweep.num_samples
    # A trial cut off by the interrupt may count as errored without Tune ever reporting it (not in
    # the ledger); SIGTERM (ray job stop) is an interrupt by itself.
    interrupted = interrupted or results.num_errors > len(ledger.errored | ledger.stopped) or cluster.stop_requested()
    status = "KILLED" if interrupted else "FAILED" if errors == len(results) else "FINISHED"
    if errors:
        tracker.set_tags(parent, {"trials_failed": errors})
    with phases("finalize"):
        front = tracker.finalize_sweep(parent, objectives, status=status, errored=ledger.errored, stopped=ledger.stopped)
        report.log_sweep_report(uri, parent)  # report.html on the parent run; a failure only warns
    _log_breakdown(tracker, name, parent, exp, started, phases)
    if interrupted:
        tracker.set_tags(parent, {INTERRUPTED_TAG: "true"})
        _logger.warning(
            "sweep %s interrupted after %d of %d trials started; continue it with: prunetune sweep CONFIG --resume %s",
            name, len(results), exp.sweep.num_samples, name,
        )
    if study_uri and not interrupted:
        study.close_study(study_uri, name)
    stopped = sum(r.data.tags.get(STOPPED_EARLY_TAG) == "true" for r in tracker.children(parent))
    return SweepOutcome(name, parent, uri, exp.tracking.experiment, front, len(results), errors, stopped, interrupted, study_uri)
