"""The on-disk cache of ended runs behind ``prunetune pareto`` (``orchestrator.run_cache``), on a real
sqlite MLflow store: a cached read equals a fresh one; what changed in between (a run that ended, one
still running, one deleted, restored, resumed) shows on the next read, which asks MLflow only for
what changed; a re-created store or a damaged file is never taken for the cached one."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator import fronts
from orchestrator.cli import main
from orchestrator.tracking import OBJECTIVES_TAG, REFERENCE_ROLE, ROLE_TAG, SEARCHED_TAG, SWEEP_TAG, TRIAL_TAG, Tracker

ACC_LAT = [("val_top1", "max"), ("latency_ms", "min")]


def _sweep(tracker: Tracker, name: str, points: list[tuple[float, float]]) -> tuple[str, list[str]]:
    parent = tracker.start_run(
        name, params={"model.num_classes": 10, "keep_ratio": 0.7},
        tags={ROLE_TAG: "sweep", SWEEP_TAG: name, SEARCHED_TAG: "keep_ratio", OBJECTIVES_TAG: json.dumps(ACC_LAT), "method": "tome"},
    )
    ref = tracker.start_run("dense_reference", {}, {ROLE_TAG: REFERENCE_ROLE, "method": "dense", "backbone": "vit_tiny"}, parent_id=parent)
    tracker.log_metrics(ref, {"val_top1": 90.0, "latency_ms": 10.0})
    _end(tracker, ref, "FINISHED", HOUR)
    trials = [_trial(tracker, parent, name, i, acc, lat) for i, (acc, lat) in enumerate(points)]
    tracker.end_run(parent)
    return parent, trials


HOUR = 3_600_000


def _end(tracker: Tracker, run: str, status: str, ago_ms: int) -> None:
    """End ``run``, its end time ``ago_ms`` back (an hour: long before any read here)."""
    MlflowClient(tracker.uri).set_terminated(run, status, end_time=int(time.time() * 1000) - ago_ms)


def _trial(
    tracker: Tracker, parent: str, sweep: str, i: int, acc: float, lat: float | None, end: str | None = "FINISHED", ago_ms: int = HOUR,
) -> str:
    tags = {ROLE_TAG: "trial", TRIAL_TAG: f"{sweep}-{i}", SWEEP_TAG: sweep, "method": "tome", "backbone": "vit_tiny"}
    run = tracker.start_run(f"trial_{i}", {"keep_ratio": i / 10}, tags, parent_id=parent)
    tracker.log_metrics(run, {"val_top1": acc, **({"latency_ms": lat} if lat is not None else {})})
    if end:
        _end(tracker, run, end, ago_ms)
    return run


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("PRUNETUNE_CACHE_DIR", str(path))
    return path


def _read(uri, cache, **kw):
    return fronts.read_selection(uri, experiments=["exp"], cache=cache, **kw)


def _same(a: fronts.Selection, b: fronts.Selection) -> None:
    assert a.rows == b.rows  # every row, in the same order
    assert [s.__dict__ for s in a.sweeps] == [s.__dict__ for s in b.sweeps]


class _Spy:
    """How many runs each ``Tracker.search_runs`` returned (what MLflow built entities for)."""

    def __init__(self, monkeypatch):
        self.returned: list[int] = []
        original = Tracker.search_runs

        def spy(tracker, *args, **kwargs):
            runs = original(tracker, *args, **kwargs)
            self.returned.append(len(runs))
            return runs

        monkeypatch.setattr(Tracker, "search_runs", spy)


def test_a_cached_read_equals_a_fresh_one_and_reads_only_what_changed(mlflow_tmp, cache_dir, monkeypatch):
    tracker = Tracker(mlflow_tmp, "exp")
    s1, _ = _sweep(tracker, "s1", [(80.0, 5.0), (70.0, 3.0), (60.0, 4.0)])
    s2, _ = _sweep(tracker, "s2", [(85.0, 8.0), (50.0, 2.0)])
    first = _read(mlflow_tmp, cache_dir)
    _same(first, _read(mlflow_tmp, None))
    assert len(first.rows) == 7 and list(cache_dir.glob("*.json"))  # 5 trials, 2 references

    spy = _Spy(monkeypatch)
    second = _read(mlflow_tmp, cache_dir)
    returned = list(spy.returned)
    _same(second, _read(mlflow_tmp, None))
    # The same front, by hand: both sweeps' references (90, 10), (85, 8), (80, 5), (70, 3), (50, 2); not (60, 4).
    front = fronts.combined_front(second.rows, ACC_LAT)
    assert sorted((r["metrics"]["val_top1"], r["metrics"]["latency_ms"]) for r in front) == [(50.0, 2.0), (70.0, 3.0), (80.0, 5.0), (85.0, 8.0), (90.0, 10.0), (90.0, 10.0)]
    # The cached read: the sweeps (2 parent runs) afresh; then per role (trial, reference) the runs that
    # ended since the first read, those not ended, and the deleted ones: none.
    assert returned == [2, 0, 0, 0, 0, 0, 0]


def test_runs_that_ended_or_changed_after_the_first_read_appear_in_the_second(mlflow_tmp, cache_dir, monkeypatch):
    tracker = Tracker(mlflow_tmp, "exp")
    parent, trials = _sweep(tracker, "s1", [(80.0, 5.0), (70.0, 3.0), (60.0, 4.0)])
    tracker.reopen(parent)
    running = _trial(tracker, parent, "s1", 3, 40.0, None, end=None)  # still training at the first read
    first = _read(mlflow_tmp, cache_dir)
    assert {r["run_id"]: r["status"] for r in first.rows}[running] == "RUNNING"

    client = MlflowClient(mlflow_tmp)
    new = _trial(tracker, parent, "s1", 4, 95.0, 1.0, ago_ms=0)  # ended after the first read: dominates every other run
    tracker.log_metrics(running, {"val_top1": 75.0, "latency_ms": 2.5})  # the running trial finishes
    tracker.end_run(running)
    client.delete_run(trials[0])  # deleted: must leave the front's input
    tracker.reopen(trials[1])  # a resumed trial: RUNNING again, whatever its old end time
    spy = _Spy(monkeypatch)
    second = _read(mlflow_tmp, cache_dir)
    returned = list(spy.returned)
    _same(second, _read(mlflow_tmp, None))
    by_id = {r["run_id"]: r for r in second.rows}
    assert new in by_id and by_id[new]["metrics"]["latency_ms"] == 1.0
    assert by_id[running]["status"] == "FINISHED" and by_id[running]["metrics"]["val_top1"] == 75.0
    assert trials[0] not in by_id and by_id[trials[1]]["status"] == "RUNNING"
    assert [r["run_id"] for r in fronts.combined_front(second.rows, ACC_LAT)] == [new]
    # The sweep run; trials: ended since (new, running), not ended (trial 1, resumed), by id those not
    # ended at the first read (running), deleted (trial 0); references: nothing.
    assert returned == [1, 2, 1, 1, 1, 0, 0, 0]

    client.restore_run(trials[0])  # restored: back as it was
    tracker.end_run(trials[1])
    third = _read(mlflow_tmp, cache_dir)
    _same(third, _read(mlflow_tmp, None))
    assert trials[0] in {r["run_id"] for r in third.rows}


_IN_A_PROCESS = """
import json, sys
sys.path.insert(0, {tests!r})
from test_run_cache import _sweep
from orchestrator import fronts
from orchestrator.tracking import Tracker
_sweep(Tracker({uri!r}, "exp"), {name!r}, {points!r})
rows = fronts.read_selection({uri!r}, experiments=["exp"], cache={cache!r}).rows
print(json.dumps(sorted(r["metrics"]["val_top1"] for r in rows if r["role"] == "trial")))
"""


def test_a_recreated_store_or_a_damaged_file_is_not_taken_for_the_cache(tmp_path, cache_dir):
    # One process per store: MLflow keeps one database engine per URI in a process.
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"

    def sweep_and_read(name, points):
        code = _IN_A_PROCESS.format(tests=str(Path(__file__).parent), uri=uri, name=name, points=points, cache=str(cache_dir))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert sweep_and_read("s1", [(80.0, 5.0), (70.0, 3.0)]) == [70.0, 80.0]
    db.unlink()  # the same URI and experiment id, another store
    assert sweep_and_read("s9", [(10.0, 1.0)]) == [10.0]
    for f in cache_dir.glob("*.json"):
        f.write_text("{not json")
    _same(_read(uri, cache_dir), _read(uri, None))
    assert [r["metrics"]["val_top1"] for r in _read(uri, cache_dir).rows if r["role"] == "trial"] == [10.0]


def test_cli_uses_the_cache_and_prints_the_same_front(mlflow_tmp, cache_dir, capsys):
    _sweep(Tracker(mlflow_tmp, "exp"), "s1", [(80.0, 5.0), (70.0, 3.0), (60.0, 4.0)])
    outs = []
    for extra in ([], [], ["--refresh"], ["--no-cache"]):
        assert main(["pareto", "--experiment", "exp", "--tracking-uri", mlflow_tmp, "--format", "json", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert list(cache_dir.glob("*.json"))
    assert all(o == outs[0] for o in outs)
    assert sorted(r["metrics"]["val_top1"] for r in outs[0]["front"]) == [70.0, 80.0, 90.0]  # and the reference
