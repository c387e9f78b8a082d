"""The per-worker function of a Ray Train run: the only place that calls ``ray.train.*`` from a rank.

Each rank builds its run (``loop.build_run``), resumes from the run's latest checkpoint (or the
configured ``init_checkpoint`` when there is none yet), lets Ray Train wrap the model in DDP, and
trains. Every epoch, rank 0 writes a checkpoint directory and all ranks call ``ray.train.report``.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from methods.latency import device_name

from . import loop, storage
from .config import ExperimentConfig

__all__ = ["train_fn_per_worker", "configure_logging", "load_state", "STATE_FILE", "RANK_KEY"]

STATE_FILE = "state.pt"
#: Each rank's report carries where it ran (rank, world size, node, device, images seen), as JSON under this key.
RANK_KEY = "rank_json"
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


def _start_state(exp: ExperimentConfig, stage: str) -> dict[str, Any] | None:
    """The run's own latest checkpoint, else the stage's ``init_checkpoint``, else None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            return load_state(Path(d) / STATE_FILE)
    init = (exp.pretrain if stage == "pretrain" else exp.train).init_checkpoint
    if init:
        return load_state(storage.fetch(init))
    return None


def _report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"checkpoint_epoch_{int(metrics['epoch']):04d}",
        )


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``experiment`` (ExperimentConfig), ``stage`` (pretrain|trial)."""
    configure_logging()
    exp: ExperimentConfig = config["experiment"]
    stage: str = config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(exp.resources.cpus_per_worker)))
    pretrained = str(storage.fetch(exp.model.pretrained)) if stage == "trial" and exp.model.pretrained else None

    run = loop.build_run(exp, stage, device, rank, world, pretrained)
    where = {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(), "device": device_name(device)}
    state = _start_state(exp, stage)
    if state is not None:
        loop.restore(run, state)
    run.model = ray.train.torch.prepare_model(
        run.raw, parallel_strategy_kwargs={
            "find_unused_parameters": run.method.find_unused_parameters, "broadcast_buffers": run.method.broadcast_buffers,
        },
    )
    loop.fit(run, lambda metrics, state: _report({**metrics, RANK_KEY: json.dumps({**where, "train_samples": metrics.get("train_samples")})}, state))
