"""The per-worker function of a Ray Train run: the only place that calls ``ray.train.*`` from a rank.

Each rank builds its run (``loop.build_run``), resumes from the run's latest checkpoint (or the
configured ``init_checkpoint`` when there is none yet), lets Ray Train wrap the model in DDP, and
trains. Every epoch, rank 0 writes a checkpoint directory and all ranks call ``ray.train.report``;
with ``train.checkpoint_every_steps`` rank 0 also writes mid-epoch ones beside them. A run resumes
from the newest checkpoint that verifies against its sha256 manifest (``orchestrator.checkpoints``).
"""
from __future__ import annotations

import json
import logging
import pickle
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from methods.latency import device_name

from . import checkpoints, loop, storage
from .config import ExperimentConfig
from .report_keys import RANK_KEY

__all__ = ["train_fn_per_worker", "configure_logging", "load_state", "STATE_FILE", "RANK_KEY", "EXPERIMENT_KEY"]

STATE_FILE = "state.pt"
#: The run's ExperimentConfig, pickled, in ``train_loop_config``: bytes that Train's controller, which
#: keeps the loop config, holds without importing the methods, timm and torchvision to unpickle them.
EXPERIMENT_KEY = "experiment_pickle"
_logger = logging.getLogger(__name__)


def configure_logging() -> None:
    """prunetune's own INFO lines in a Ray process (epochs, measurements), without Ray's per-report INFO."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("orchestrator", "methods"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def load_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint state written by ``_report`` (or an ``init_checkpoint``), on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _start_state(exp: ExperimentConfig, stage: str, run_dir: str | None) -> tuple[dict[str, Any] | None, str]:
    """The run's own newest good checkpoint (an epoch's or a mid-epoch one under ``run_dir``, each
    verified against its manifest, a broken one skipped for the one before), else the stage's
    ``init_checkpoint``, else None; and where it came from. Rank 0 chooses, every rank loads the same."""
    folder = None
    if run_dir:
        box = [None]
        if ray.train.get_context().get_world_rank() == 0:
            found = checkpoints.latest_good(run_dir)
            box = [found.folder if found else None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(box, src=0)
        folder = box[0]
    if folder is not None:
        return checkpoints.load(folder), f"checkpoint {folder}"
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            return checkpoints.load(d), f"checkpoint {checkpoint.path}"
    init = (exp.pretrain if stage == "pretrain" else exp.train).init_checkpoint
    if init:
        return checkpoints.load_uri(init), f"init_checkpoint {init}"
    return None, ""


def _report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoints.write(state, d)  # state.pt + its sha256 manifest
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"checkpoint_epoch_{int(metrics['epoch']):04d}",
        )


def _save_step(state: dict[str, Any] | None, run_dir: str, keep: int) -> None:
    """Rank 0: a mid-epoch checkpoint beside Ray's epoch ones, the older mid-epoch ones pruned."""
    if state is None:
        return
    folder = checkpoints.save_step(state, run_dir)
    checkpoints.prune_steps(run_dir, keep)
    _logger.info("checkpoint at step %d (epoch %d, batch %d): %s", state["step"], state["epoch"] + 1, state["batch"], folder)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``EXPERIMENT_KEY`` (the pickled ExperimentConfig), ``stage``
    (pretrain|trial), ``run_dir`` and ``started_at``."""
    configure_logging()
    exp: ExperimentConfig = pickle.loads(config[EXPERIMENT_KEY])
    stage: str = config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(exp.resources.cpus_per_worker)))
    pretrained = str(storage.fetch(exp.model.pretrained)) if stage == "trial" and exp.model.pretrained else None

    run = loop.build_run(exp, stage, device, rank, world, pretrained)
    run.started_at = config.get("started_at")  # when the trial's driver started: start-up counts from there
    where = {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(), "device": device_name(device)}
    run_dir = config.get("run_dir")
    state, source = _start_state(exp, stage, run_dir)
    if state is not None:
        loop.restore(run, state, where=source)
    train_cfg = exp.pretrain if stage == "pretrain" else exp.train
    if run_dir and train_cfg.checkpoint_every_steps:
        run.on_step_checkpoint = lambda state: _save_step(state, run_dir, train_cfg.checkpoints_to_keep)
    run.model = ray.train.torch.prepare_model(run.raw, parallel_strategy_kwargs=loop.ddp_options(run.method))
    loop.fit(run, lambda metrics, state: _report({**metrics, RANK_KEY: json.dumps({**where, "train_samples": metrics.get("train_samples")})}, state))
