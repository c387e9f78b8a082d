"""The console filter drops Ray's routine per-report lines and nothing else."""
from __future__ import annotations

import re
from pathlib import Path

import ray

from orchestrator import console

RAY = Path(ray.__file__).parent


def _ray_source_templates() -> list[str]:
    """The f-string log templates in Ray's own source that the filter is meant to catch."""
    wanted = {
        "train/v2/_internal/execution/storage.py": "Checkpoint successfully created at",
        "train/v2/torch/train_loop_utils.py": "Moving model to device",
        "train/v2/_internal/execution/scaling_policy/scaling_policy.py": "Requesting resources",
    }
    out = []
    for rel, phrase in wanted.items():
        text = (RAY / rel).read_text()
        line = next(l for l in text.splitlines() if phrase in l and "logger." in l)
        # render the f-string template with placeholder values, as a worker would print it
        out.append(re.sub(r"\{[^}]*\}", "X", re.search(r'f?"([^"]*)"', line).group(1)))
    return out


def test_real_ray_messages_are_noise():
    templates = _ray_source_templates()
    assert len(templates) == 3
    for line in templates:
        assert console.is_noise(f"(RayTrainWorker pid=123) {line}"), line


def test_worker_group_and_preemption_watcher_lines_are_noise():
    """As a Train run's controller printed them in a quickstart (2026-11-21): routine, and an
    error-level line about Ray's own preemption watcher that is not an error."""
    for line in (
        "Attempting to start training worker group of size 1 with the following resources: [{'CPU': 2}] * 1",
        "Started training worker group of size 1: ",
        "- (ip=192.0.2.2, pid=6093) world_rank=0, local_rank=0, node_rank=0",
        "[2026-11-21 22:05:53,068 E 5993 6055] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
        "'8f079b1fd433326086845ad901000000' has constructor arguments in the object store and max_restarts > 0. If the "
        "arguments in the object store go out of scope or are lost, the actor restart will fail.",
    ):
        assert console.is_noise(line), line
    # a worker group that cannot start is news
    assert not console.is_noise("Failed to start training worker group of size 2: timed out after 60 s")


def test_progress_and_errors_are_not_noise():
    for line in (
        "(RayTrainWorker pid=1) 17:54:36 orchestrator.loop: pretrain epoch 14/30: train_loss 0.79, val_top1 87.78% (3.0s)",
        "Traceback (most recent call last):",
        "RuntimeError: Checkpoint directory missing",
        "(TrainController pid=2) Training failed due to worker group failure",
    ):
        assert not console.is_noise(line), line


def test_filtered_printer_passes_the_rest_in_order():
    printed = []
    handle = console._filtered(printed.append)
    handle({"pid": 1, "lines": ["a", "Checkpoint successfully created at: x", "b", "Moving model to device: cpu"], "is_err": True})
    handle({"pid": 2, "lines": ["Requesting resources: {'CPU': 2} * 1"], "is_err": False})  # all noise: nothing printed
    assert printed == [{"pid": 1, "lines": ["a", "b"], "is_err": True}]
