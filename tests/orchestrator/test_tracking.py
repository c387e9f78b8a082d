"""MLflow tracking on a real sqlite store: URIs, redaction, sweep parent and trial runs, the Pareto front."""
from __future__ import annotations

import csv
import http.server
import json
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.errors import TrackingError, UserError
from orchestrator.tracking import (
    OBJECTIVES_TAG,
    PARETO_TAG,
    ROLE_TAG,
    SEARCHED_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    Tracker,
    check_reachable,
    redact,
    resolve_uri,
)
from ports import free_port

OBJECTIVES = [("val_top1", "max"), ("latency_ms", "min")]


# ---- URIs ---------------------------------------------------------------------------------------


def test_resolve_uri_makes_relative_sqlite_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_uri("sqlite:///sub/../m.db") == f"sqlite:///{tmp_path.resolve()}/m.db"
    absolute = f"sqlite:///{tmp_path}/x.db"
    assert resolve_uri(absolute) == absolute
    assert resolve_uri("http://host:5000") == "http://host:5000"


def test_resolve_uri_default_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_uri(None) == f"sqlite:///{tmp_path.resolve()}/env.db"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://user:pw@host", "http://user:***@host"),
        ("https://user:s3cr3t@host:5000/api", "https://user:***@host:5000/api"),
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("redis://:pw@h:6379", "redis://:***@h:6379"),
        ("a http://x:y@h and s3://k:s@b/key", "a http://x:***@h and s3://k:***@b/key"),
        ("http://host:5000/path", "http://host:5000/path"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("user@example.com", "user@example.com"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_unreachable_http_server_fails_fast_in_one_line():
    uri = f"http://admin:hunter2@127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(TrackingError) as e:
        check_reachable(uri, timeout=5)
    assert time.perf_counter() - start < 3
    msg = str(e.value)
    assert "unreachable" in msg and "admin:***@127.0.0.1" in msg and "hunter2" not in msg and "\n" not in msg
    assert isinstance(e.value, UserError)


@pytest.fixture
def health_server():
    """A real HTTP server on loopback: ``/health`` answers 200, anything else 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_healthy_and_unhealthy_http_server(health_server):
    check_reachable(health_server)
    check_reachable(health_server + "/")
    with pytest.raises(TrackingError, match="HTTP 404"):
        check_reachable(health_server + "/sub")  # /sub/health is not found


def test_sqlite_in_a_missing_folder(tmp_path):
    uri = f"sqlite:///{tmp_path}/missing/mlflow.db"
    with pytest.raises(TrackingError, match="missing"):
        check_reachable(uri)
    assert not (tmp_path / "missing").exists()


def test_sqlite_in_an_existing_folder_is_fine_and_creates_nothing(tmp_path, mlflow_tmp):
    check_reachable(mlflow_tmp)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri", ["/tmp/mlruns", "mlruns", "file:///tmp/mlruns"])
def test_plain_paths_are_rejected(uri):
    with pytest.raises(TrackingError, match="database or server URI"):
        check_reachable(uri)


# ---- a recorded sweep ---------------------------------------------------------------------------

TRIALS = {
    # trial id: (params, final metrics, status)
    "t_a": ({"keep_ratio": 0.9, "train.lr": 1e-3}, {"val_top1": 90.0, "latency_ms": 10.0}, "FINISHED"),
    "t_b": ({"keep_ratio": 0.7, "train.lr": 2e-3}, {"val_top1": 85.0, "latency_ms": 6.0}, "FINISHED"),
    "t_c": ({"keep_ratio": 0.6, "train.lr": 5e-4}, {"val_top1": 80.0, "latency_ms": 8.0}, "FINISHED"),  # dominated by t_b
    "t_d": ({"keep_ratio": 0.5, "train.lr": 1e-4}, {"val_top1": 99.0, "latency_ms": 1.0}, "FAILED"),  # best, but failed
    "t_e": ({"keep_ratio": 0.55, "train.lr": 1e-4}, {"val_top1": 98.0}, "RUNNING"),  # stopped early: no latency
    "t_f": ({"keep_ratio": 0.5, "train.lr": 3e-3}, {"val_top1": 70.0, "latency_ms": 4.0}, "FINISHED"),
    "t_g": ({"keep_ratio": 0.4, "train.lr": 1e-3}, {"val_top1": 97.0}, "RUNNING"),  # cut short by the sweep's end
    "t_h": ({"keep_ratio": 0.45, "train.lr": 1e-3}, {"val_top1": 96.0}, "RUNNING"),  # errored; its driver died silently
}
STOPPED = {"t_e"}  # what the scheduler stopped
ERRORED = {"t_d", "t_h"}  # what Tune reports as failed
FRONT = ["t_f", "t_b", "t_a"]  # by latency


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep parent with the tags run_sweep sets, six trial children (and one other child), finalized."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    tracker = Tracker(uri, "exp-sweep")
    parent = tracker.start_run(
        "sweep-1",
        params={"keep_ratio": 0.7, "train.lr": 1e-3, "tracking.uri": uri},
        tags={
            ROLE_TAG: "sweep", SWEEP_TAG: "sweep-1", SEARCHED_TAG: "keep_ratio,train.lr",
            OBJECTIVES_TAG: json.dumps(OBJECTIVES), "method": "dynamicvit",
        },
    )
    runs = {}
    for trial_id, (params, final, status) in TRIALS.items():
        run_id = tracker.start_run(
            f"trial_{trial_id}", params={**params, "distill_weight": 0.5},
            tags={ROLE_TAG: "trial", TRIAL_TAG: trial_id, SWEEP_TAG: "sweep-1"}, parent_id=parent,
        )
        tracker.log_metrics(run_id, {"epoch": 0, "val_top1": final["val_top1"] / 2, "train_loss": 2.0}, step=0)
        tracker.log_metrics(run_id, {"epoch": 1, **final, "note": "text is skipped", "flag": True}, step=1)
        if status != "RUNNING":
            tracker.end_run(run_id, status)
        runs[trial_id] = run_id
    other = tracker.start_run("not-a-trial", {}, {ROLE_TAG: "pretrain"}, parent_id=parent)
    tracker.log_metrics(other, {"val_top1": 100.0, "latency_ms": 0.1})
    tracker.end_run(other)
    rows = tracker.finalize_sweep(parent, OBJECTIVES, errored=ERRORED, stopped=STOPPED)
    return {"uri": uri, "tracker": tracker, "parent": parent, "runs": runs, "rows": rows, "other": other, "folder": folder}


def test_finalize_tags_each_trial(sweep):
    client = MlflowClient(sweep["uri"])
    for trial_id, run_id in sweep["runs"].items():
        tags = client.get_run(run_id).data.tags
        assert tags[PARETO_TAG] == ("true" if trial_id in FRONT else "false"), trial_id
    assert PARETO_TAG not in client.get_run(sweep["other"]).data.tags  # only trials are judged


def test_finalize_ends_unfinished_trials_by_what_the_sweep_knows(sweep):
    client = MlflowClient(sweep["uri"])
    statuses = {t: client.get_run(r).info.status for t, r in sweep["runs"].items()}
    assert statuses == {
        "t_a": "FINISHED", "t_b": "FINISHED", "t_c": "FINISHED", "t_d": "FAILED", "t_e": "KILLED", "t_f": "FINISHED",
        "t_g": "KILLED", "t_h": "FAILED",
    }

    def tagged(tag):
        return {t for t, r in sweep["runs"].items() if client.get_run(r).data.tags.get(tag) == "true"}

    assert tagged("prunetune.stopped_early") == {"t_e"}
    assert tagged("prunetune.interrupted") == {"t_g"}


def test_finalize_marks_a_stopped_trial_killed_even_if_its_driver_recorded_failed(sweep):
    """Tune stopping a trial (ASHA) can surface in the trial driver as an exception; only the
    sweep knows which trials really errored."""
    tracker = Tracker(sweep["uri"], "exp-stop")
    parent = tracker.start_run("s", {}, {ROLE_TAG: "sweep", SEARCHED_TAG: "keep_ratio", OBJECTIVES_TAG: json.dumps(OBJECTIVES)})
    runs = {}
    for trial_id in ("stopped", "broken"):
        runs[trial_id] = tracker.start_run(trial_id, {}, {ROLE_TAG: "trial", TRIAL_TAG: trial_id}, parent_id=parent)
        tracker.end_run(runs[trial_id], "FAILED")
    tracker.finalize_sweep(parent, OBJECTIVES, errored={"broken"}, stopped={"stopped"})
    client = MlflowClient(sweep["uri"])
    assert client.get_run(runs["stopped"]).info.status == "KILLED"
    assert client.get_run(runs["broken"]).info.status == "FAILED"
    parent = client.get_run(sweep["parent"])
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None


def test_ending_leaves_a_run_cut_short_by_someone_else_to_them(sweep):
    """A trial Tune stopped raises in its driver after the sweep may have ended its run KILLED: the
    driver must not write FAILED over that. A failure of its own still ends the run FAILED."""
    tracker = Tracker(sweep["uri"], "exp-ending")
    client = MlflowClient(sweep["uri"])
    statuses = {}
    for name, stopped in (("own-failure", False), ("stopped", True)):
        run_id = tracker.start_run(name, {}, {ROLE_TAG: "trial"})
        with pytest.raises(RuntimeError, match="controller died"):
            with tracker.ending(run_id, left_to_others=lambda: stopped):
                raise RuntimeError("controller died")
        statuses[name] = client.get_run(run_id).info.status
    done = tracker.start_run("done", {}, {ROLE_TAG: "trial"})
    with tracker.ending(done, left_to_others=lambda: True):
        pass
    assert statuses == {"own-failure": "FAILED", "stopped": "RUNNING"}
    assert client.get_run(done).info.status == "FINISHED"


def test_finalize_returns_the_front(sweep):
    rows = sweep["rows"]
    assert [r["run_id"] for r in rows] == [sweep["runs"][t] for t in FRONT]
    a = rows[-1]
    assert a["run_name"] == "trial_t_a" and a["status"] == "FINISHED"
    assert a["params"] == {"keep_ratio": "0.9", "train.lr": "0.001"}  # the searched params only
    assert a["metrics"] == {"val_top1": 90.0, "latency_ms": 10.0}  # final values, known metrics only


def test_finalize_logs_a_summary_on_the_parent(sweep):
    metrics = MlflowClient(sweep["uri"]).get_run(sweep["parent"]).data.metrics
    assert metrics["pareto_size"] == 3 and metrics["trials"] == len(TRIALS) and metrics["trials_finished"] == 4
    assert metrics["best_val_top1"] == 90.0


def test_front_artifacts(sweep, tmp_path):
    client = MlflowClient(sweep["uri"])
    names = {a.path for a in client.list_artifacts(sweep["parent"])}
    assert {"pareto_front.json", "pareto_front.csv", "pareto_front.png"} <= names

    with open(client.download_artifacts(sweep["parent"], "pareto_front.csv", str(tmp_path))) as f:
        rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in rows] == [sweep["runs"][t] for t in FRONT]
    assert {"run_name", "keep_ratio", "train.lr", "val_top1", "latency_ms"} <= set(rows[0])
    assert [float(r["latency_ms"]) for r in rows] == [4.0, 6.0, 10.0]
    assert [r["keep_ratio"] for r in rows] == ["0.5", "0.7", "0.9"]

    table = json.loads(Path(client.download_artifacts(sweep["parent"], "pareto_front.json", str(tmp_path))).read_text())
    assert len(table["data"]) == 3 and "run_id" in table["columns"]

    png = Path(client.download_artifacts(sweep["parent"], "pareto_front.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_read_front_gives_the_same_rows(sweep):
    parent, rows = sweep["tracker"].read_front()
    assert parent.info.run_id == sweep["parent"]
    assert rows == sweep["rows"]
    parent2, rows2 = sweep["tracker"].read_front(sweep["parent"])
    assert parent2.info.run_id == sweep["parent"] and rows2 == rows


def test_find_trial_run(sweep):
    tracker = sweep["tracker"]
    assert tracker.find_trial_run(sweep["parent"], "t_c") == sweep["runs"]["t_c"]
    assert tracker.find_trial_run(sweep["parent"], "t_zz") is None
    assert tracker.find_trial_run(sweep["runs"]["t_a"], "t_c") is None  # another parent


def test_children_lists_all_nested_runs(sweep):
    children = sweep["tracker"].children(sweep["parent"])
    assert {r.info.run_id for r in children} == set(sweep["runs"].values()) | {sweep["other"]}


def test_latest_sweep_is_the_newest_parent(sweep):
    tracker = Tracker(sweep["uri"], "exp-two-sweeps")
    old = tracker.start_run("old", {}, {ROLE_TAG: "sweep"})
    tracker.end_run(old)
    time.sleep(0.01)
    new = tracker.start_run("new", {}, {ROLE_TAG: "sweep", OBJECTIVES_TAG: json.dumps(OBJECTIVES)})
    assert tracker.finalize_sweep(new, OBJECTIVES) == []  # no trials: an empty front (and a plot all the same)
    parent, rows = tracker.read_front()
    assert parent.info.run_id == new and rows == []
    assert tracker.read_front(old)[0].info.run_id == old


def test_front_on_other_objectives(sweep, tmp_path):
    """A sweep on accuracy vs GFLOPs: the front, its order and the plot follow those objectives."""
    objectives = [("val_top1", "max"), ("gflops", "min")]
    tracker = Tracker(sweep["uri"], "exp-gflops")
    parent = tracker.start_run("s", {}, {ROLE_TAG: "sweep", SEARCHED_TAG: "keep_ratio", OBJECTIVES_TAG: json.dumps(objectives)})
    ids = []
    for i, (acc, gflops, latency) in enumerate([(90.0, 2.0, 1.0), (80.0, 1.0, 9.0), (70.0, 1.5, 0.5)]):
        run_id = tracker.start_run(f"t{i}", {"keep_ratio": 0.5 + i / 10}, {ROLE_TAG: "trial", TRIAL_TAG: f"t{i}"}, parent_id=parent)
        tracker.log_metrics(run_id, {"val_top1": acc, "gflops": gflops, "dense_gflops": 3.0, "latency_ms": latency})
        tracker.end_run(run_id)
        ids.append(run_id)
    rows = tracker.finalize_sweep(parent, objectives)
    assert [r["run_id"] for r in rows] == [ids[1], ids[0]]  # t2 is dominated on these objectives; sorted by gflops
    assert tracker.read_front()[1] == rows
    png = Path(MlflowClient(sweep["uri"]).download_artifacts(parent, "pareto_front.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_experiment_is_a_tracking_error(sweep):
    with pytest.raises(TrackingError, match="experiment 'nope' not found"):
        Tracker(sweep["uri"], "nope").read_front()
    assert MlflowClient(sweep["uri"]).get_experiment_by_name("nope") is None  # reading created nothing


def test_experiment_without_a_sweep(sweep):
    tracker = Tracker(sweep["uri"], "exp-no-sweep")
    tracker.experiment_id()
    with pytest.raises(TrackingError, match="has no prunetune sweep"):
        tracker.read_front()


def test_secrets_are_masked_in_params_and_tags(sweep):
    tracker = Tracker(sweep["uri"], "exp-secrets")
    run_id = tracker.start_run(
        "r",
        params={
            "aws_secret_access_key": "AKIAXYZ", "db_password": "pw1", "MY_API_KEY": "k", "empty_password": "",
            "token_distill_weight": 0.5, "tracking.uri": "http://bob:pw2@mlflow:5000",
            "storage": ["s3://k:pw3@minio/bucket"], "long": "x" * 7000,
        },
        tags={"t": "ok"},
    )
    tracker.set_tags(run_id, {"checkpoint_uri": "s3://k:pw4@minio/ckpt", "n": 3})
    run = MlflowClient(sweep["uri"]).get_run(run_id)
    p = run.data.params
    assert p["aws_secret_access_key"] == "***" and p["db_password"] == "***" and p["MY_API_KEY"] == "***"
    assert p["empty_password"] == ""
    assert p["token_distill_weight"] == "0.5"  # "token" alone is not a secret
    assert p["tracking.uri"] == "http://bob:***@mlflow:5000"
    assert p["storage"] == '["s3://k:***@minio/bucket"]'
    assert len(p["long"]) == 6000
    assert run.data.tags["checkpoint_uri"] == "s3://k:***@minio/ckpt" and run.data.tags["n"] == "3"
    everything = json.dumps([p, run.data.tags])
    assert not any(s in everything for s in ("AKIAXYZ", "pw1", "pw2", "pw3", "pw4"))


def test_many_params_and_metrics_are_batched(sweep):
    tracker = Tracker(sweep["uri"], "exp-batch")
    run_id = tracker.start_run("r", params={f"p{i}": i for i in range(250)}, tags={})
    tracker.log_metrics(run_id, {f"m{i}": float(i) for i in range(1200)}, step=2)
    run = MlflowClient(sweep["uri"]).get_run(run_id)
    assert len(run.data.params) == 250 and run.data.params["p249"] == "249"
    assert len(run.data.metrics) == 1200 and run.data.metrics["m1199"] == 1199.0


def test_tracker_is_picklable(sweep):
    import pickle

    clone = pickle.loads(pickle.dumps(sweep["tracker"]))
    assert clone.find_trial_run(sweep["parent"], "t_a") == sweep["runs"]["t_a"]


def test_measurement_tables_become_csv_and_plot_artifacts(mlflow_tmp, tmp_path):
    tracker = Tracker(mlflow_tmp, "tables")
    run_id = tracker.start_run("t", params={}, tags={})
    rows = [{"gflops": 0.3, "val_top1": 80.0, "share": 0.5}, {"gflops": 0.1, "val_top1": 60.0}]
    tracker.log_tables(run_id, {"accuracy_vs_budget": rows, "empty": []})
    client = MlflowClient(mlflow_tmp)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"accuracy_vs_budget.csv", "accuracy_vs_budget.png"}
    back = list(csv.DictReader(open(client.download_artifacts(run_id, "accuracy_vs_budget.csv", str(tmp_path)))))
    assert [(float(r["gflops"]), float(r["val_top1"]), r["share"]) for r in back] == [(0.3, 80.0, "0.5"), (0.1, 60.0, "")]
    assert Path(client.download_artifacts(run_id, "accuracy_vs_budget.png", str(tmp_path))).read_bytes()[:4] == b"\x89PNG"


def test_reference_run_competes_on_the_front_but_is_not_a_trial(mlflow_tmp):
    from orchestrator.tracking import REFERENCE_ROLE

    tracker = Tracker(mlflow_tmp, "ref")
    parent = tracker.start_run("sweep", params={}, tags={ROLE_TAG: "sweep", SEARCHED_TAG: "r"})
    points = {"dense": (80.0, 10.0), "a": (79.0, 6.0), "b": (70.0, 7.0)}  # b is dominated by a; dense is the most accurate
    ids = {}
    for name, (acc, lat) in points.items():
        role = REFERENCE_ROLE if name == "dense" else "trial"
        ids[name] = tracker.start_run(name, params={"r": 1}, tags={ROLE_TAG: role, TRIAL_TAG: name, "method": name}, parent_id=parent)
        tracker.log_metrics(ids[name], {"val_top1": acc, "latency_ms": lat})
        tracker.end_run(ids[name])
    front = tracker.finalize_sweep(parent, OBJECTIVES)
    assert {r["run_id"] for r in front} == {ids["dense"], ids["a"]}
    assert {r["method"] for r in front} == {"dense", "a"}
    parent_run = MlflowClient(mlflow_tmp).get_run(parent)
    assert parent_run.data.metrics["trials"] == 2 and parent_run.data.metrics["pareto_size"] == 2
