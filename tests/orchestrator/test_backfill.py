"""A resumed trial's MLflow history has no hole: epochs committed as checkpoints but never logged are filled in."""
from __future__ import annotations

import torch
from mlflow import MlflowClient

from orchestrator.driver import backfill_history
from orchestrator.tracking import Tracker
from orchestrator.worker import STATE_FILE


def _checkpoint(root, epoch: int, top1: float) -> None:
    d = root / f"checkpoint_epoch_{epoch:04d}"
    d.mkdir(parents=True)
    torch.save({"epoch": epoch, "metrics": {"epoch": epoch, "val_top1": top1, "train_loss": 1.0 / (epoch + 1)}}, d / STATE_FILE)


def test_missing_epochs_are_logged_from_their_checkpoints_once(mlflow_tmp, tmp_path):
    tracker = Tracker(mlflow_tmp, "backfill")
    run_id = tracker.start_run("trial", params={}, tags={})
    tracker.log_metrics(run_id, {"val_top1": 50.0}, step=0)  # epoch 0 reached MLflow; epochs 1, 2 did not
    train_dir = tmp_path / "trial_x"
    for epoch, top1 in ((0, 50.0), (1, 60.0), (2, 70.0)):
        _checkpoint(train_dir, epoch, top1)
    (train_dir / "not_a_checkpoint").mkdir()
    assert backfill_history(tracker, run_id, str(train_dir)) == [1, 2]
    history = sorted((m.step, m.value) for m in MlflowClient(mlflow_tmp).get_metric_history(run_id, "val_top1"))
    assert history == [(0, 50.0), (1, 60.0), (2, 70.0)]
    assert backfill_history(tracker, run_id, str(train_dir)) == []  # nothing logged twice
    assert len(MlflowClient(mlflow_tmp).get_metric_history(run_id, "val_top1")) == 3


def test_no_checkpoints_no_backfill(mlflow_tmp, tmp_path):
    tracker = Tracker(mlflow_tmp, "backfill")
    run_id = tracker.start_run("trial", params={}, tags={})
    assert backfill_history(tracker, run_id, str(tmp_path / "absent")) == []
