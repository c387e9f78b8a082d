"""Fronts across sweeps on a real sqlite MLflow store: the combined front against a brute-force
definition (several objective sets, modes reversed), latency budgets, filters, each sweep's
hypervolume on one reference point, failed runs ignored with a warning, and ``prunetune pareto``."""
from __future__ import annotations

import csv
import io
import json
import logging
import random

import pytest
from mlflow import MlflowClient

from orchestrator import fronts
from orchestrator.cli import main
from orchestrator.errors import UserError
from orchestrator.pareto import hypervolume
from orchestrator.tracking import OBJECTIVES_TAG, PARENT_TAG, REFERENCE_ROLE, ROLE_TAG, SEARCHED_TAG, SWEEP_TAG, TRIAL_TAG, Tracker

ACC_LAT = [("val_top1", "max"), ("latency_ms", "min")]
ACC_GFLOPS = [("val_top1", "max"), ("gflops", "min")]


def _record_sweep(tracker, name, method, objectives, n, rnd, dense_latency, failed=1, killed=1, device=None, num_classes=10):
    parent = tracker.start_run(
        name, params={"model.num_classes": num_classes, "keep_ratio": 0.7},
        tags={ROLE_TAG: "sweep", SWEEP_TAG: name, SEARCHED_TAG: "keep_ratio", OBJECTIVES_TAG: json.dumps(objectives), "method": method},
    )
    ref = tracker.start_run("dense_reference", {}, {ROLE_TAG: REFERENCE_ROLE, "method": "dense", "backbone": "vit_tiny"}, parent_id=parent)
    tracker.log_metrics(ref, {"val_top1": 92.0, "latency_ms": dense_latency, "gflops": 2.0, "throughput_ips": 100.0})
    tracker.end_run(ref)
    for i in range(n + failed + killed):
        tags = {ROLE_TAG: "trial", TRIAL_TAG: f"{name}-{i}", SWEEP_TAG: name, "method": method, "backbone": "vit_tiny"}
        if device and i % 2 == 0:
            tags["device"] = device
        run = tracker.start_run(f"trial_{i}", {"keep_ratio": round(rnd.uniform(0.3, 0.9), 3)}, tags, parent_id=parent)
        # a coarse grid: ties in one objective and duplicated points
        acc, lat, gflops = float(rnd.randint(60, 95)), float(rnd.randint(2, 2 * int(dense_latency))) / 2, rnd.randint(5, 20) / 10
        tracker.log_metrics(run, {"epoch": 0, "val_top1": acc / 2, "train_loss": 2.0}, step=0)
        if i < n:
            tracker.log_metrics(run, {"epoch": 1, "val_top1": acc, "latency_ms": lat, "gflops": gflops, "dense_latency_ms": dense_latency}, step=1)
            tracker.end_run(run)
        elif i < n + failed:  # failed after measuring: would be unbeatable, but did not finish
            tracker.log_metrics(run, {"val_top1": 99.9, "latency_ms": 0.1, "gflops": 0.1}, step=1)
            tracker.end_run(run, "FAILED")
        else:  # stopped early: no final measurement
            tracker.log_metrics(run, {"val_top1": 99.0}, step=1)
            tracker.end_run(run, "KILLED")
    tracker.end_run(parent)
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('fronts')}/mlflow.db"
    rnd = random.Random(7)
    a, b = Tracker(uri, "exp-a"), Tracker(uri, "exp-b")
    sweeps = {
        "s1": _record_sweep(a, "s1", "dynamicvit", ACC_LAT, 14, rnd, dense_latency=12.0),
        "s2": _record_sweep(a, "s2", "tome", ACC_LAT, 10, rnd, dense_latency=11.0),
        "s3": _record_sweep(b, "s3", "evovit", ACC_GFLOPS, 9, rnd, dense_latency=15.0, device="cuda"),
    }
    Tracker(uri, "exp-empty").experiment_id()
    single = Tracker(uri, "exp-single")
    sweeps["one"] = _record_sweep(single, "one", "tome", ACC_LAT, 1, rnd, dense_latency=8.0, failed=0, killed=0)
    pretrain = a.start_run("pretrain_x", {}, {ROLE_TAG: "pretrain", "method": "dense"})  # never on a front
    a.log_metrics(pretrain, {"val_top1": 100.0, "latency_ms": 0.01})
    a.end_run(pretrain)
    return {"uri": uri, "sweeps": sweeps}


def _all_runs(uri):
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=10000)


def _brute_front(uri, sweep_ids, objectives, method=None):
    """Independent: every finished trial/reference run of those sweeps with all objectives; keep the undominated."""
    runs = [
        r for r in _all_runs(uri)
        if r.data.tags.get(PARENT_TAG) in sweep_ids and r.data.tags.get(ROLE_TAG) in ("trial", REFERENCE_ROLE)
        and r.info.status == "FINISHED" and all(m in r.data.metrics for m, _ in objectives)
        and (method is None or r.data.tags.get("method") == method)
    ]

    def better_eq(p, q):
        return all((p[m] >= q[m]) if d == "max" else (p[m] <= q[m]) for m, d in objectives)

    def strictly(p, q):
        return any((p[m] > q[m]) if d == "max" else (p[m] < q[m]) for m, d in objectives)

    pts = {r.info.run_id: r.data.metrics for r in runs}
    return {i for i, p in pts.items() if not any(better_eq(q, p) and strictly(q, p) for j, q in pts.items() if j != i)}, pts


SELECTIONS = {
    "exp-a": ({"experiments": ["exp-a"]}, ["s1", "s2"]),
    "exp-a+b": ({"experiments": ["exp-a", "exp-b"]}, ["s1", "s2", "s3"]),
    "sweeps s1,s3": ({"sweeps": "s1,s3"}, ["s1", "s3"]),
}
OBJECTIVE_SETS = {
    "acc-lat": ACC_LAT,
    "reversed": [("val_top1", "min"), ("latency_ms", "max")],
    "three": [("val_top1", "max"), ("latency_ms", "min"), ("gflops", "min")],
    "acc-gflops": ACC_GFLOPS,
}


def _select(store, spec, **filters):
    spec = dict(spec)
    if "sweeps" in spec:
        spec["sweeps"] = [store["sweeps"][s] for s in spec["sweeps"].split(",")]
    return fronts.read_selection(store["uri"], **spec, **filters)


@pytest.mark.parametrize("objectives", list(OBJECTIVE_SETS))
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_combined_front_matches_brute_force(store, selection, objectives):
    spec, names = SELECTIONS[selection]
    objs = OBJECTIVE_SETS[objectives]
    report = fronts.compare(_select(store, spec), objs)
    expected, points = _brute_front(store["uri"], {store["sweeps"][n] for n in names}, objs)
    assert {r["run_id"] for r in report.front} == expected
    assert report.front, "every selection here has finished runs"
    last = objs[-1][0]
    assert [r["metrics"][last] for r in report.front] == sorted(points[i][last] for i in expected)
    assert report.objectives == objs


def test_the_selection_holds_trials_and_references_of_those_sweeps_only(store):
    selection = _select(store, {"experiments": ["exp-a"]})
    assert {s.name for s in selection.sweeps} == {"s1", "s2"}
    assert {r["role"] for r in selection.rows} == {"trial", REFERENCE_ROLE}
    assert len(selection.rows) == (14 + 2 + 1) + (10 + 2 + 1)  # trials (failed and killed included) and the two references
    row = next(r for r in selection.rows if r["role"] == "trial")
    assert row["experiment"] == "exp-a" and row["sweep"] in ("s1", "s2") and row["backbone"] == "vit_tiny"
    assert set(row["params"]) == {"keep_ratio"}  # the searched params


def test_default_objectives_are_the_recorded_ones_or_the_usual_pair(store, caplog):
    assert fronts.compare(_select(store, {"experiments": ["exp-b"]})).objectives == ACC_GFLOPS  # as s3 recorded
    with caplog.at_level(logging.WARNING, logger="orchestrator.fronts"):
        report = fronts.compare(_select(store, {"experiments": ["exp-a", "exp-b"]}))
    assert report.objectives == ACC_LAT
    assert "recorded different objectives" in caplog.text


def test_failed_and_stopped_runs_are_ignored_with_a_warning(store, caplog):
    with caplog.at_level(logging.WARNING, logger="orchestrator.fronts"):
        report = fronts.compare(_select(store, {"experiments": ["exp-a"]}), ACC_LAT)
    assert len(report.ignored) == 4 and {r["status"] for r in report.ignored} == {"FAILED", "KILLED"}
    assert "4 of 30 runs ignored" in caplog.text and "2 FAILED" in caplog.text and "2 KILLED" in caplog.text
    assert all(r["metrics"]["val_top1"] < 99 for r in report.front)  # the failed trials' unbeatable points are not on it


def test_a_run_missing_an_objective_is_ignored(store):
    report = fronts.compare(_select(store, {"experiments": ["exp-a"]}), [("val_top1", "max"), ("throughput_ips", "max")])
    assert {r["role"] for r in report.front} == {REFERENCE_ROLE}  # only the references measured throughput
    assert len(report.ignored) == 4 + 24


@pytest.mark.parametrize("kind", ["at a point", "between points", "below all", "above all"])
def test_budget_answers_the_most_accurate_run_within_the_latency(store, kind):
    selection = _select(store, {"experiments": ["exp-a"]})
    _, points = _brute_front(store["uri"], {store["sweeps"]["s1"], store["sweeps"]["s2"]}, ACC_LAT)
    latencies = sorted({p["latency_ms"] for p in points.values()})
    budget = {
        "at a point": latencies[len(latencies) // 2], "between points": (latencies[1] + latencies[2]) / 2,
        "below all": latencies[0] - 0.25, "above all": latencies[-1] + 100,
    }[kind]
    report = fronts.compare(selection, ACC_LAT, budget_ms=budget)
    fits = {i: p for i, p in points.items() if p["latency_ms"] <= budget}
    if not fits:
        assert report.within_budget is None
        return
    best = max(p["val_top1"] for p in fits.values())
    answer = report.within_budget
    assert answer["metrics"]["val_top1"] == best and answer["metrics"]["latency_ms"] <= budget
    assert answer["metrics"]["latency_ms"] == min(p["latency_ms"] for p in fits.values() if p["val_top1"] == best)
    if kind == "at a point":  # the budget is inclusive
        assert any(p["latency_ms"] == budget for p in fits.values())


def test_method_filter(store):
    report = fronts.compare(_select(store, {"experiments": ["exp-a"]}, method=["tome"]), ACC_LAT)
    expected, _ = _brute_front(store["uri"], {store["sweeps"]["s1"], store["sweeps"]["s2"]}, ACC_LAT, method="tome")
    assert {r["run_id"] for r in report.front} == expected and {r["method"] for r in report.front} == {"tome"}
    both = fronts.compare(_select(store, {"experiments": ["exp-a"]}, method=["tome", "dense"]), ACC_LAT)
    assert {r["method"] for r in both.front} <= {"tome", "dense"}
    assert _select(store, {"experiments": ["exp-a"]}, backbone=["other"]).rows == []


def test_device_filter_keeps_tagged_runs_and_warns_about_untagged(store, caplog):
    with caplog.at_level(logging.WARNING, logger="orchestrator.fronts"):
        selection = _select(store, {"experiments": ["exp-b"]}, device=["cuda"])
    assert selection.rows and all(r["device"] == "cuda" for r in selection.rows)
    assert selection.left_out["no device tag"] == 6  # the reference and the odd trials record no device
    assert "record no device" in caplog.text
    assert _select(store, {"experiments": ["exp-b"]}, device=["cpu"]).rows == []


def test_each_sweep_hypervolume_on_one_reference_point(store):
    selection = _select(store, {"experiments": ["exp-a", "exp-b"]})
    report = fronts.compare(selection, ACC_LAT)
    # chance accuracy (10 classes); the least favourable dense latency of the three sweeps (exp-b's 15 ms)
    assert report.reference == {"val_top1": 10.0, "latency_ms": 15.0}
    assert report.reference_from == {"val_top1": "sweeps", "latency_ms": "sweeps"}
    valid, _ = fronts.usable(selection.rows, ACC_LAT)
    by_name = {s["name"]: s for s in report.sweeps}
    for name, run_id in list(store["sweeps"].items())[:3]:
        mine = [r["metrics"] for r in valid if r["sweep_run_id"] == run_id]
        assert by_name[name]["hypervolume"] == pytest.approx(hypervolume(mine, ACC_LAT, report.reference))
        assert by_name[name]["finished"] == len(mine)
    assert report.hypervolume == pytest.approx(hypervolume([r["metrics"] for r in valid], ACC_LAT, report.reference))
    assert report.hypervolume >= max(s["hypervolume"] for s in report.sweeps)
    assert sum(s["on_front"] for s in report.sweeps) == len(report.front)
    given = fronts.compare(selection, ACC_LAT, reference={"latency_ms": 20.0})
    assert given.reference == {"val_top1": 10.0, "latency_ms": 20.0} and given.reference_from["latency_ms"] == "given"


def test_reversed_modes_fall_back_to_the_nadir(store):
    selection = _select(store, {"experiments": ["exp-a"]})
    objs = OBJECTIVE_SETS["reversed"]
    report = fronts.compare(selection, objs)
    valid, _ = fronts.usable(selection.rows, objs)
    assert report.reference_from == {"val_top1": "nadir", "latency_ms": "nadir"}
    assert report.reference == {"val_top1": max(r["metrics"]["val_top1"] for r in valid), "latency_ms": min(r["metrics"]["latency_ms"] for r in valid)}


def test_empty_experiment_is_a_user_error(store):
    with pytest.raises(UserError, match="'exp-empty' has no prunetune sweep"):
        _select(store, {"experiments": ["exp-empty"]})
    assert fronts.compare(fronts.Selection([], []), ACC_LAT).front == []


def test_a_sweep_without_finished_runs_has_an_empty_front(mlflow_tmp):
    tracker = Tracker(mlflow_tmp, "lonely")
    parent = tracker.start_run("s", {}, {ROLE_TAG: "sweep", OBJECTIVES_TAG: json.dumps(ACC_LAT)})
    report = fronts.compare(fronts.read_selection(mlflow_tmp, experiments=["lonely"]))
    assert report.front == [] and report.sweeps[0]["run_id"] == parent and report.sweeps[0]["hypervolume"] is None
    assert "Pareto front (0 runs" in fronts.format_table(report)


def test_single_run_experiment(store):
    report = fronts.compare(_select(store, {"experiments": ["exp-single"]}), budget_ms=1000.0)
    expected, points = _brute_front(store["uri"], {store["sweeps"]["one"]}, ACC_LAT)
    assert len(points) == 2 and len(report.sweeps) == 1 and report.sweeps[0]["finished"] == 2  # the trial and the dense reference
    assert {r["run_id"] for r in report.front} == expected
    assert report.within_budget["run_id"] in expected  # the most accurate of all is on the front
    out = fronts.to_json(report)
    assert out["experiment"] == "exp-single" and out["sweep"] == "one" and out["budget"]["run"]["run_id"] == report.within_budget["run_id"]


def test_sweep_ids_must_be_sweeps_of_the_named_experiments(store):
    with pytest.raises(UserError, match="not in experiment 'exp-b'"):
        fronts.read_selection(store["uri"], experiments=["exp-b"], sweeps=[store["sweeps"]["s1"]])
    trial_run = next(r.info.run_id for r in _all_runs(store["uri"]) if r.data.tags.get(ROLE_TAG) == "trial")
    with pytest.raises(UserError, match="is not a prunetune sweep"):
        fronts.read_selection(store["uri"], sweeps=[trial_run])
    with pytest.raises(UserError, match="not found"):
        fronts.read_selection(store["uri"], sweeps=["0" * 32])


def test_mlflow_is_read_in_pages_not_per_run(store, monkeypatch):
    calls = []
    original = MlflowClient.search_runs

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("max_results"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", spy)
    _select(store, {"experiments": ["exp-a", "exp-b"]})
    assert calls == [1000, 1000, 1000]  # the sweeps, the trials, the references: all experiments at once
    calls.clear()
    _select(store, {"sweeps": "s1,s2,s3"})
    assert calls == [1000, 1000, 1000]  # one query per sweep


def test_parse_arguments():
    assert fronts.parse_objective("val_top1:max") == ("val_top1", "max")
    assert fronts.parse_objective("latency_ms") == ("latency_ms", "min")
    assert fronts.parse_objective("custom:MIN") == ("custom", "min")
    for bad in ("custom", "val_top1:up", ":max"):
        with pytest.raises(UserError, match="METRIC:max"):
            fronts.parse_objective(bad)
    assert fronts.parse_reference(["val_top1=10", "latency_ms=4.5"]) == {"val_top1": 10.0, "latency_ms": 4.5}
    for bad in ("latency_ms", "=3", "x=abc", "x=nan"):
        with pytest.raises(UserError, match="METRIC=NUMBER"):
            fronts.parse_reference([bad])


# ---- prunetune pareto ----------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["pareto", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_csv_parses(store, capsys):
    code, out, _ = _cli(capsys, "--experiment", "exp-a", "--experiment", "exp-b", "--tracking-uri", store["uri"], "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    expected, _ = _brute_front(store["uri"], {store["sweeps"][n] for n in ("s1", "s2", "s3")}, ACC_LAT)
    assert {r["run_id"] for r in rows} == expected
    assert {"experiment", "sweep", "method", "val_top1", "latency_ms", "keep_ratio"} <= set(rows[0])
    assert all(float(r["latency_ms"]) > 0 for r in rows)


def test_cli_csv_with_a_budget_is_the_answer(store, capsys):
    code, out, _ = _cli(capsys, "--sweep", store["sweeps"]["s2"], "--tracking-uri", store["uri"], "--format", "csv", "--budget-ms", "1000")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and row["sweep"] == "s2"


def test_cli_json_alias_and_options(store, capsys):
    args = ["--experiment", "exp-a", "--tracking-uri", store["uri"], "--objective", "val_top1:max", "--objective", "gflops:min", "--method", "tome,dense"]
    _, as_json, _ = _cli(capsys, *args, "--json")
    _, as_format, _ = _cli(capsys, *args, "--format", "json")
    a, b = json.loads(as_json), json.loads(as_format)
    assert a == b
    assert a["objectives"] == [["val_top1", "max"], ["gflops", "min"]] and a["experiment"] == "exp-a"
    assert {r["method"] for r in a["front"]} <= {"tome", "dense"}
    assert {s["name"] for s in a["sweeps"]} == {"s1", "s2"} and all("hypervolume" in s for s in a["sweeps"])
    assert "gflops" in a["front"][0]["metrics"] and "train_loss" not in a["front"][0]["metrics"]


def test_cli_table_shows_each_sweep_hypervolume(store, capsys):
    code, out, err = _cli(capsys, "--experiment", "exp-a", "--experiment", "exp-b", "--tracking-uri", store["uri"], "--budget-ms", "3")
    assert code == 0
    report = fronts.compare(_select(store, {"experiments": ["exp-a", "exp-b"]}), ACC_LAT, budget_ms=3.0)
    lines = out.splitlines()
    assert "hypervolume reference: val_top1 10 (sweeps), latency_ms 15 (sweeps)" in lines[0]
    for s in report.sweeps:
        (line,) = [ln for ln in lines if ln.strip().startswith(s["name"] + " ")]
        assert f"{s['hypervolume']:.6g}" in line
    assert any(ln.startswith("Pareto front (") for ln in lines)
    assert lines[-1].startswith("within 3 ms:")


def test_cli_errors_are_one_line(store, capsys):
    code, out, err = _cli(capsys, "--tracking-uri", store["uri"])
    assert code == 2 and "needs --experiment" in err and out == ""
    code, _, err = _cli(capsys, "--experiment", "exp-a", "--tracking-uri", store["uri"], "--objective", "val_top1:up")
    assert code == 2 and err.count("\n") == 1
    code, _, err = _cli(capsys, "--experiment", "nope", "--tracking-uri", store["uri"])
    assert code == 2 and "'nope' not found" in err


def test_runs_of_two_kinds_of_device_are_refused_unless_asked_for(mlflow_tmp):
    rnd = random.Random(3)
    tracker = Tracker(mlflow_tmp, "devices")
    _record_sweep(tracker, "on-cpu", "tome", ACC_LAT, 3, rnd, dense_latency=12.0, device="cpu:Xeon")
    _record_sweep(tracker, "on-gpu", "tome", ACC_LAT, 3, rnd, dense_latency=2.0, device="cuda:H100")
    selection = fronts.read_selection(mlflow_tmp, experiments=["devices"])
    with pytest.raises(UserError, match=r"2 kinds of device \(cpu:Xeon; cuda:H100\).*--mixed-devices"):
        fronts.compare(selection, ACC_LAT)
    report = fronts.compare(selection, ACC_LAT, mixed_devices=True)
    assert report.devices == ["cpu:Xeon", "cuda:H100"] and report.front
    assert "MIXED DEVICES" in fronts.format_table(report)
    one = fronts.compare(fronts.read_selection(mlflow_tmp, experiments=["devices"], device=["cuda:H100"]), ACC_LAT)
    assert one.devices == ["cuda:H100"]
