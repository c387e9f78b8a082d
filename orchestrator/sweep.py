"""A sweep: Ray Tune + Optuna (multi-objective) over Ray Train trials, recorded in MLflow.

``run_sweep`` checks everything the user gave before anything is recorded (data folder, tracking
store, pretrained weights), trains the dense backbone first when the method needs one and none is
given, opens the sweep's MLflow parent run, runs the Tuner, and finally tags the Pareto front.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from methods import CheckpointError, create_backbone, get_method, load_backbone_weights

from . import driver, storage
from .config import ExperimentConfig, SweepConfig, to_flat_dict
from .data import check_image_folder
from .errors import UserError
from .search_space import SearchSpace
from .tracking import OBJECTIVES_TAG, ROLE_TAG, SEARCHED_TAG, SWEEP_TAG, Tracker, check_reachable, redact, resolve_uri

__all__ = ["run_sweep", "SweepOutcome", "init_ray"]

_logger = logging.getLogger(__name__)
_PARAMS = "params"
_DRIVER_MEMORY = 512 * 1024**2

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


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster (``address``, ``RAY_ADDRESS`` or a ``ray job submit`` job), else start Ray locally."""
    os.environ.update(_DRIVER_ENV)
    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)


def _check_pretrained(exp: ExperimentConfig) -> None:
    """Load the given weights into the backbone once here, so a bad file fails before any trial."""
    try:
        load_backbone_weights(create_backbone(exp.model), storage.fetch(exp.model.pretrained))
    except CheckpointError as e:
        raise UserError(str(e)) from None


def _sampler(cfg: SweepConfig):
    import optuna

    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed)


def _searcher(exp: ExperimentConfig, space: SearchSpace) -> OptunaSearch:
    points = [{f"{_PARAMS}/{k}": v for k, v in p.items()} for p in exp.sweep.points_to_evaluate]
    return OptunaSearch(
        metric=[o.metric for o in exp.sweep.objectives],
        mode=[o.mode for o in exp.sweep.objectives],
        sampler=_sampler(exp.sweep),
        points_to_evaluate=points or None,
    )


class _RecordingASHA(ASHAScheduler):
    """ASHA that remembers which trials it stopped.

    Tune's stop can reach a trial's driver as an exception, and Tune then reports the trial as
    errored; the scheduler's own decision is the only reliable record that it was stopped early.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP:
            self.stopped.add(trial.trial_id)
        return action


def _scheduler(exp: ExperimentConfig) -> _RecordingASHA | None:
    asha = exp.sweep.asha
    if asha is None:
        return None
    first = exp.sweep.objectives[0]
    return _RecordingASHA(
        time_attr="epoch", metric=first.metric, mode=first.mode, max_t=exp.train.epochs,
        grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
    )


class _Progress(tune.Callback):
    """One log line per trial epoch and per finished trial, so long sweeps show where they are."""

    def __init__(self, total_epochs: int, stopped: set[str]) -> None:
        self.total_epochs = total_epochs
        self.stopped = stopped  # the scheduler's early stops (filled as the sweep runs)
        self.errored: set[str] = set()  # trial ids that failed

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "latency_ms" in result:
            _logger.info(
                "trial %s measured: val_top1 %.2f%%, latency %.3f ms (dense %.3f, speedup %.2fx), "
                "throughput %.0f img/s (%.2fx dense), %.4f GFLOPs",
                trial.trial_id, result["val_top1"], result["latency_ms"], result["dense_latency_ms"], result["speedup"],
                result["throughput_ips"], result.get("throughput_ratio", float("nan")), result["gflops"],
            )
        elif "val_top1" in result:
            _logger.info(
                "trial %s epoch %d/%d: val_top1 %.2f%%, train_loss %.4f",
                trial.trial_id, int(result.get("epoch", 0)) + 1, self.total_epochs, result["val_top1"], result.get("train_loss", float("nan")),
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.trial_id in self.stopped:
            _logger.info("trial %s stopped early by ASHA", trial.trial_id)
            return
        self.errored.add(trial.trial_id)
        _logger.error("trial %s failed; see %s", trial.trial_id, trial.path)


def run_sweep(exp: ExperimentConfig, space: SearchSpace, name: str | None = None, address: str | None = None) -> SweepOutcome:
    """Run the whole sweep described by ``exp`` over ``space``; returns the Pareto front read from MLflow."""
    uri = resolve_uri(exp.tracking.uri)
    check_reachable(uri)
    check_image_folder(exp.data.path)
    if exp.model.pretrained:
        _check_pretrained(exp)
    name = name or f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = Tracker(uri, exp.tracking.experiment)
    init_ray(address)

    if get_method(exp.method).needs_teacher and not exp.model.pretrained:
        exp = replace(exp, model=replace(exp.model, pretrained=driver.train_dense(exp, tracker)))

    objectives = [(o.metric, o.mode) for o in exp.sweep.objectives]
    sweep_storage = storage.join(exp.storage_path, name)  # Train runs go under trial_<id>/ here
    parent = tracker.start_run(
        name,
        params=to_flat_dict(exp),
        tags={
            ROLE_TAG: "sweep", SWEEP_TAG: name, "method": exp.method, "backbone": exp.model.name,
            SEARCHED_TAG: ",".join(space.names()), OBJECTIVES_TAG: json.dumps(objectives),
            "prunetune.search_space": space.source, "prunetune.storage_path": redact(sweep_storage),
        },
    )
    _logger.info("sweep %s: MLflow run %s in experiment %r at %s", name, parent, exp.tracking.experiment, redact(uri))
    param_space: dict[str, Any] = {
        "experiment": exp, _PARAMS: space.tune_space(), "fixed": space.fixed(), "parent_run_id": parent,
        "tracking_uri": uri, "sweep_name": name, "storage_path": sweep_storage,
    }
    scheduler = _scheduler(exp)
    stopped = scheduler.stopped if scheduler is not None else set()
    progress = _Progress(exp.train.epochs, stopped)
    tuner = tune.Tuner(
        # The trial driver only waits on its workers: no CPU, just the memory its process takes.
        tune.with_resources(driver.run_trial, {"cpu": 0, "memory": _DRIVER_MEMORY}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=_searcher(exp, space), scheduler=scheduler,
            num_samples=exp.sweep.num_samples, max_concurrent_trials=exp.sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=exp.storage_path,
            failure_config=tune.FailureConfig(max_failures=exp.sweep.max_failures),
            callbacks=[progress],
        ),
    )
    try:
        results = tuner.fit()
    except BaseException:
        tracker.finalize_sweep(parent, objectives, status="KILLED", errored=progress.errored - stopped, stopped=stopped)
        raise
    errored = progress.errored - stopped  # a trial ASHA stopped is not a failure, however its driver ended
    errors = len(errored)
    # Ctrl+C (SIGINT) makes Tune end the run gracefully and return: trials left unfinished or never started.
    interrupted = results.num_terminated + results.num_errors < len(results) or len(results) < exp.sweep.num_samples
    status = "KILLED" if interrupted else "FAILED" if errors == len(results) else "FINISHED"
    front = tracker.finalize_sweep(parent, objectives, status=status, errored=errored, stopped=stopped)
    if errors:
        tracker.set_tags(parent, {"trials_failed": errors})
    if interrupted:
        tracker.set_tags(parent, {"prunetune.interrupted": "true"})
        _logger.warning("sweep %s interrupted after %d of %d trials started", name, len(results), exp.sweep.num_samples)
    return SweepOutcome(name, parent, uri, exp.tracking.experiment, front, len(results), errors, len(stopped), interrupted)
