"""Ray Train drivers: one ``TorchTrainer`` per sweep trial, and the dense pre-training run.

``run_trial`` is the Tune trainable (Ray's Train-inside-Tune pattern: never a Trainer passed to a
Tuner). It rebuilds the trial's typed config, opens the trial's MLflow child run, and fits a
``TorchTrainer`` whose run name is fixed by the trial id, so a restarted trial resumes from its own
checkpoints. Metrics flow worker -> ``ray.train.report`` -> the callbacks here -> Tune and MLflow.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.train import CheckpointConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from methods.dense import DenseConfig
from methods.latency import device_name

from . import loop, storage, worker
from .config import ExperimentConfig, ResourcesConfig, to_flat_dict
from .outbox import Outbox, outbox_path, wait_for_tracking
from .train_reports import DEVICE_TAG, RANKS_TAG, MlflowReportCallback
from .search_space import SweepSpace
from .timing import Stopwatch
from .tracking import REFERENCE_ROLE, ROLE_TAG, SEARCHED_TAG, SWEEP_TAG, TRIAL_TAG, Tracker, redact

__all__ = ["run_trial", "train_dense", "make_trainer", "train_loop_config", "apply_train_env", "scaling_config", "MlflowReportCallback", "TRIAL_RESOURCES", "evaluate_remote", "measure_reference", "evaluate_here"]

_logger = logging.getLogger(__name__)
_DRIVER_MEMORY = 512 * 1024**2
FAILURE_TAG = "prunetune.failure"  # why a run failed, in one line (e.g. the NaN guard gave up)


def scaling_config(res: ResourcesConfig) -> tuple[ScalingConfig, TorchConfig]:
    """Ray Train workers for one run: NCCL when each rank has a GPU, gloo on CPUs."""
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    scaling = ScalingConfig(
        num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker,
        placement_strategy=res.placement_strategy,
    )
    return scaling, TorchConfig(backend="nccl" if use_gpu else "gloo")


def log_final(tracker: Tracker, run_id: str, reported: dict[str, Any]) -> None:
    """A report's metrics (step = epoch), and the measurement's tables as artifacts when it has them."""
    tracker.log_metrics(run_id, reported, step=int(reported.get("epoch", 0)))
    if loop.TABLES_KEY in reported:
        tracker.log_tables(run_id, json.loads(reported[loop.TABLES_KEY]))


#: Ray Train settings for the runs this process starts (Train hands them on to its controller). The
#: controller polls its workers every 2 s by default, so each run ended up to 2 s after its last
#: report; 0.5 s costs nothing measurable. A value the user set in the environment wins.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def apply_train_env() -> None:
    """``TRAIN_ENV`` into this process's environment, where the user has not set a value."""
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)


def make_trainer(
    exp: ExperimentConfig, stage: str, name: str, storage_path: str, callbacks: list, started_at: float | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for one run of ``exp`` (``stage``: pretrain|trial) named ``name`` under
    ``storage_path`` (its checkpoints and Ray's run state); ``started_at``: when the run's driver
    started it, for the time breakdown (default: now)."""
    apply_train_env()
    scaling, torch_config = scaling_config(exp.resources)
    keep = (exp.pretrain if stage == "pretrain" else exp.train).checkpoints_to_keep
    return TorchTrainer(
        worker.train_fn_per_worker,
        train_loop_config=train_loop_config(exp, stage, storage.join(storage_path, name), started_at),
        scaling_config=scaling,
        torch_config=torch_config,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            failure_config=ray.train.FailureConfig(
                max_failures=exp.resources.max_failures, controller_failure_limit=exp.resources.worker_start_retries,
            ),
            callbacks=callbacks,
        ),
    )


def train_loop_config(exp: ExperimentConfig, stage: str, run_dir: str, started_at: float | None = None) -> dict[str, Any]:
    """What each worker's ``train_fn_per_worker`` gets: the experiment, pickled (Train's controller
    keeps the loop config in its run context, and unpickling an ``ExperimentConfig`` there would
    import the methods, timm and torchvision: 2.5-3.5 s of one core per run, measured with py-spy on
    2 cores, while the workers start), the stage, the run's folder (its checkpoints) and when its driver started it."""
    return {
        worker.EXPERIMENT_KEY: pickle.dumps(exp), "stage": stage, "run_dir": run_dir,
        "started_at": time.time() if started_at is None else started_at,
    }


def trial_experiment(config: dict[str, Any]) -> ExperimentConfig:
    """A trial's typed config, from the sweep's space and the trial's sampled ``params``."""
    space: SweepSpace = config["space"]
    return space.trial_experiment(config["params"])


#: What Tune reserves for every trial's own actor: memory only. It drives a worker group (the workers
#: hold the CPUs/GPUs) or, with nothing to train (``train.epochs: 0``), an evaluation task on one
#: worker's resources (``evaluate_remote``). Every trial reserving the same makes every finished
#: trial's actor reusable by the next (``reuse_actors``).
TRIAL_RESOURCES = PlacementGroupFactory([{"memory": _DRIVER_MEMORY}])


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one sweep trial as a multi-worker ``TorchTrainer``, or, with nothing to
    train (``train.epochs: 0``), an evaluation and measurement as one task (seconds, no worker group).

    ``config`` holds ``space`` (the sweep's ``SweepSpace``), ``params`` (this trial's sampled
    values), ``parent_run_id``, ``tracking_uri``, ``sweep_name`` and ``storage_path`` (the sweep's
    folder for Train runs).
    """
    worker.configure_logging()
    started_at = time.time()
    timing = Stopwatch()  # the driver's own MLflow time; the workers report their phases
    exp = trial_experiment(config)
    trial_id = tune.get_context().get_trial_id()
    tracker = Tracker(config["tracking_uri"], exp.tracking.experiment)
    parent = config["parent_run_id"]
    # MLflow down for a while: the trial waits here for its run rather than failing (training never waits on it).
    run_id = wait_for_tracking(tracker, f"trial {trial_id}", lambda: tracker.find_trial_run(parent, trial_id))
    if run_id:  # a trial restarted by Ray, or resumed with its sweep: same run, same checkpoints
        previous = tracker.get_run(run_id)
        if previous.info.status == "FINISHED" and "latency_ms" in previous.data.metrics:
            # It finished before its sweep's driver died, after Tune last saved its state: not run again.
            _logger.info("trial %s finished earlier (MLflow run %s): its recorded result is reused", trial_id, run_id)
            tune.report(dict(previous.data.metrics))
            return
        tracker.reopen(run_id)
        Outbox(tracker, run_id, outbox_path(loop.cache_dir(exp), run_id)).flush()  # what an earlier attempt could not send
        backfill_history(tracker, run_id, storage.join(config["storage_path"], f"trial_{trial_id}"))
    else:
        with timing("logging"):
            run_id = tracker.start_run(
                name=f"trial_{trial_id}",
                params=to_flat_dict(exp),
                tags={
                    ROLE_TAG: "trial", TRIAL_TAG: trial_id, SWEEP_TAG: config["sweep_name"],
                    "method": exp.method, "backbone": exp.model.name,
                    SEARCHED_TAG: ",".join(config["space"].trial_searched(config["params"])),
                },
                parent_id=parent,
            )
    outbox = Outbox(tracker, run_id, outbox_path(loop.cache_dir(exp), run_id))
    with tracker.ending(run_id, left_to_others=stopped_by_tune):
        if exp.train.epochs == 0:
            final = evaluate_remote(exp, tracker, run_id, started_at)
            _log_driver_times(tracker, run_id, int(final.get("epoch", 0)), started_at, timing)
            tune.report(final)
            return
        trainer = make_trainer(
            exp, "trial", f"trial_{trial_id}", config["storage_path"],
            callbacks=[TuneReportCallback(), MlflowReportCallback(outbox)], started_at=started_at,
        )
        try:
            with outbox.delivering(on_flush=lambda s: timing.add("logging", s)):  # what the controller queues
                trainer.fit()
        except Exception as e:
            if stopped_by_tune():
                _logger.info("trial %s stopped by its sweep (%s); the sweep ends its run", trial_id, type(e).__name__)
            else:
                with contextlib.suppress(Exception):  # the reason, in one line, on the run (MLflow may be down too)
                    tracker.set_tags(run_id, {FAILURE_TAG: failure_reason(e)})
            raise
        finally:
            outbox.flush_waiting(timeout=600)  # metrics delayed by an MLflow outage, before the run ends
        with contextlib.suppress(Exception):  # a record of where the time went, never a reason to fail the trial
            _log_driver_times(tracker, run_id, exp.train.epochs - 1, started_at, timing)


def stopped_by_tune() -> bool:
    """Whether Tune has ended this trial's session: it stopped the trial (Ctrl+C, ``ray job stop``, the
    scheduler) and left its training thread to die with the actor. The sweep's driver then ends the
    trial's run (``Tracker.finalize_sweep``: KILLED, interrupted or stopped early); were the trial to
    end it FAILED too, the later of the two writes would win, and that may come after the sweep's.

    A trial that fails on its own raises while its session is still open: Tune ends the session only
    after the function has returned or raised. Ray has no public way to ask; ``get_session`` is the
    one Tune's own ``FunctionTrainable.cleanup`` shuts down.
    """
    from ray.train._internal.session import get_session

    return get_session() is None


def _log_driver_times(tracker: Tracker, run_id: str, step: int, started_at: float, timing: Stopwatch | None = None) -> None:
    """The run's wall time and its driver's own MLflow time (``timing``'s ``logging``), on the run
    at ``step`` (``orchestrator.timing``)."""
    logging_s = timing.totals.get("logging", 0.0) if timing else 0.0
    tracker.log_metrics(run_id, {"time_logging_s": logging_s, "time_trial_s": time.time() - started_at}, step=step)


def failure_reason(error: BaseException) -> str:
    """The line of a (Ray-wrapped) worker error that says why the run failed, e.g. the NaN guard's."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    guard = [ln for ln in lines if "NonFiniteLossError" in ln]
    return redact((guard or lines or [type(error).__name__])[-1])[:4000]


def backfill_history(tracker: Tracker, run_id: str, train_dir: str) -> list[int]:
    """Log the metrics of epochs whose checkpoint Ray Train committed but whose report never reached
    MLflow (the sweep was interrupted or killed between the two), from the checkpoints themselves,
    so a resumed trial's history has no hole. Returns the epochs it filled in."""
    logged = tracker.logged_steps(run_id, "val_top1")
    filled = []
    for name in storage.list_dirs(train_dir):
        if not name.startswith("checkpoint_epoch_") or int(name.rsplit("_", 1)[1]) in logged:
            continue
        state = worker.load_state(storage.fetch(storage.join(train_dir, name, worker.STATE_FILE)))
        epoch = int(state.get("epoch", name.rsplit("_", 1)[1]))
        tracker.log_metrics(run_id, state.get("metrics", {}), step=epoch)
        filled.append(epoch)
    if filled:
        _logger.info("run %s: epochs %s recorded from their checkpoints (their reports never reached MLflow)", run_id, filled)
    return filled


def _local_device() -> torch.device:
    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    return torch.device("cuda", 0) if gpus and torch.cuda.is_available() else torch.device("cpu")


def evaluate_here(exp: ExperimentConfig, tracker: Tracker, run_id: str, started_at: float | None = None) -> dict[str, float]:
    """Evaluate and measure ``exp``'s model as built, in this process, on one worker's resources; log to
    ``run_id``, with what the logging cost (``time_report_logging_s``, as Train's controller reports it)."""
    device = _local_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(exp.resources.cpus_per_worker)))
    pretrained = str(storage.fetch(exp.model.pretrained)) if exp.model.pretrained else None
    run = loop.build_run(exp, "trial", device, pretrained_path=pretrained)
    run.started_at = time.time() if started_at is None else started_at
    final = loop.fit(run, lambda metrics, state: None)
    logging_started = time.perf_counter()
    log_final(tracker, run_id, final)
    where = {"rank": 0, "world_size": 1, "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "", "device": device_name(device)}
    tracker.set_tags(run_id, {RANKS_TAG: json.dumps([where]), DEVICE_TAG: where["device"]})
    tracker.log_metrics(run_id, {"time_report_logging_s": time.perf_counter() - logging_started}, step=int(final.get("epoch", 0)))
    return {k: v for k, v in final.items() if k != loop.TABLES_KEY}


def evaluate_remote(exp: ExperimentConfig, tracker: Tracker, run_id: str, started_at: float | None = None) -> dict[str, float]:
    """``evaluate_here`` as a Ray task on one worker's CPUs/GPUs. Ray keeps a finished task's process
    (torch and the methods imported) for the next such task: the dense reference's and every
    evaluation-only trial's run in one warm process on a small cluster."""
    res = exp.resources
    task = ray.remote(evaluate_here).options(
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker or 0,
        scheduling_strategy="DEFAULT",  # from a trial's actor: outside its (memory-only) placement group
    )
    return ray.get(task.remote(exp, tracker, run_id, time.time() if started_at is None else started_at))


def measure_reference(exp: ExperimentConfig, tracker: Tracker, parent_id: str) -> str:
    """The dense backbone, evaluated and measured exactly as trials are (a ToMe-like trial with
    nothing pruned), on one worker's resources, recorded as the sweep's ``reference`` child run."""
    earlier = [r for r in tracker.children(parent_id) if r.data.tags.get(ROLE_TAG) == REFERENCE_ROLE]
    if any(r.info.status == "FINISHED" for r in earlier):
        return next(r.info.run_id for r in earlier if r.info.status == "FINISHED")  # a resumed sweep measured it already
    ref = replace(exp, method="dense", method_config=DenseConfig(), train=replace(exp.train, epochs=0), sweep=replace(exp.sweep, methods=()))
    if earlier:  # its measurement was cut short (the driver was killed): measured again, in the same run
        run_id = earlier[0].info.run_id
        tracker.reopen(run_id)
    else:
        run_id = tracker.start_run(
            "dense_reference", params=to_flat_dict(ref),
            tags={ROLE_TAG: REFERENCE_ROLE, "method": "dense", "backbone": exp.model.name}, parent_id=parent_id,
        )
    with tracker.ending(run_id):
        final = evaluate_remote(ref, tracker, run_id)
    _logger.info(
        "dense reference: val_top1 %.2f%%, latency %.3f ms, throughput %.0f img/s, %.4f GFLOPs",
        final["val_top1"], final["latency_ms"], final["throughput_ips"], final["gflops"],
    )
    return run_id


def pretrain_key(exp: ExperimentConfig) -> str:
    """Identity of a dense pre-training: backbone, data and schedule (so equal requests reuse one run)."""
    what = {"model": asdict(replace(exp.model, pretrained=None)), "data": asdict(exp.data), "pretrain": asdict(exp.pretrain)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


def pretrain_run_name(exp: ExperimentConfig) -> str:
    """The MLflow and Ray Train name of ``exp``'s dense pre-training."""
    return f"pretrain_{pretrain_key(exp)}"


def train_dense(exp: ExperimentConfig, tracker: Tracker) -> str:
    """Train the dense backbone on the experiment's data (or reuse an earlier one); returns its weights' URI.

    The run is named by ``pretrain_key``, so an interrupted pre-training resumes from its last epoch
    and a finished one is reused. The weights are exported as a timm state dict under ``"model"``.
    """
    name = pretrain_run_name(exp)
    export = storage.join(exp.storage_path, name, "dense_backbone.pt")
    if storage.exists(export):
        _logger.info("reusing the dense %s trained earlier: %s", exp.model.name, export)
        return export
    _logger.info("training the dense %s first (%d epochs): it is the starting point and teacher", exp.model.name, exp.pretrain.epochs)
    flat = {k: v for k, v in to_flat_dict(exp).items() if not k.startswith(("train.", "sweep."))}
    run_id = tracker.start_run(name, params={**flat, "method": "dense"}, tags={ROLE_TAG: "pretrain", "method": "dense", "backbone": exp.model.name})
    started_at = time.time()
    timing = Stopwatch()
    outbox = Outbox(tracker, run_id, outbox_path(loop.cache_dir(exp), run_id))
    trainer = make_trainer(exp, "pretrain", name, exp.storage_path, callbacks=[MlflowReportCallback(outbox)], started_at=started_at)
    with tracker.ending(run_id):
        with outbox.delivering(on_flush=lambda s: timing.add("logging", s)):  # what the controller queues
            result = trainer.fit()
        _log_driver_times(tracker, run_id, exp.pretrain.epochs - 1, started_at, timing)
        with result.checkpoint.as_directory() as d:
            state = worker.load_state(Path(d) / worker.STATE_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "dense_backbone.pt"
            torch.save({"model": {k.removeprefix("vit."): v for k, v in state["model"].items()}}, path)
            storage.upload(path, export)
        tracker.set_tags(run_id, {"weights_uri": export})
    return export
