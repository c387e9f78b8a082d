"""The run cache against a real ``mlflow server`` (REST): its refresh queries (end time, status,
run ids, deleted runs) are understood there, and a cached read equals a fresh one before and after
runs end, are deleted or reopened."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from orchestrator import fronts
from orchestrator.tracking import OBJECTIVES_TAG, REFERENCE_ROLE, ROLE_TAG, SEARCHED_TAG, SWEEP_TAG, TRIAL_TAG, Tracker

pytestmark = pytest.mark.integration

EXPERIMENT = "it-run-cache"


def _trial(tracker, parent, i, acc, lat, end=True):
    tags = {ROLE_TAG: "trial", TRIAL_TAG: f"t{i}", SWEEP_TAG: "s", "method": "tome", "backbone": "vit_tiny"}
    run = tracker.start_run(f"trial_{i}", {"keep_ratio": i / 10}, tags, parent_id=parent)
    tracker.log_metrics(run, {"val_top1": acc, "latency_ms": lat})
    if end:
        tracker.end_run(run)
    return run


def test_cached_reads_equal_fresh_reads_on_a_server(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server, EXPERIMENT)
    objectives = [["val_top1", "max"], ["latency_ms", "min"]]
    parent = tracker.start_run(
        "s", {"model.num_classes": 10}, {ROLE_TAG: "sweep", SWEEP_TAG: "s", SEARCHED_TAG: "keep_ratio", OBJECTIVES_TAG: json.dumps(objectives)},
    )
    ref = tracker.start_run("dense_reference", {}, {ROLE_TAG: REFERENCE_ROLE, "method": "dense"}, parent_id=parent)
    tracker.log_metrics(ref, {"val_top1": 90.0, "latency_ms": 10.0})
    tracker.end_run(ref)
    done = [_trial(tracker, parent, i, 60.0 + i, 2.0 + i) for i in range(3)]
    running = _trial(tracker, parent, 3, 50.0, 1.0, end=False)
    cache = tmp_path / "cache"

    def check():
        cached = fronts.read_selection(mlflow_server, experiments=[EXPERIMENT], cache=cache)
        fresh = fronts.read_selection(mlflow_server, experiments=[EXPERIMENT])
        assert cached.rows == fresh.rows
        return {r["run_id"]: r for r in cached.rows}

    assert len(check()) == 5 and list(cache.glob("*.json"))
    tracker.end_run(running)
    MlflowClient(mlflow_server).delete_run(done[0])
    tracker.reopen(done[1])
    new = _trial(tracker, parent, 4, 99.0, 0.5)
    rows = check()
    assert rows[running]["status"] == "FINISHED" and rows[done[1]]["status"] == "RUNNING" and new in rows and done[0] not in rows
    assert [r["run_id"] for r in fronts.combined_front(list(rows.values()), [tuple(o) for o in objectives])] == [new]
