"""Failures a sweep survives, each done for real: the sweep driver SIGKILLed and resumed, the
``mlflow server`` stopped and restarted mid-sweep, and a NaN injected into a Ray Train worker's
loss. Each test ends every process it started in ``finally``; processes to kill are found by their
own pid (the CLI process this test started, and its descendants), never by a machine-wide pattern."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from proctree import descendants
import requests
import yaml
from mlflow import MlflowClient

from orchestrator.nan_guard import TEST_INJECT_NAN_ENV

pytestmark = pytest.mark.integration

BATCH = 64
#: Ray's memory monitor kills tasks above 95% of the node's memory, counting other people's processes on
#: a shared test machine; the kernel's OOM killer still guards the machine.
RAY_ENV = {"RAY_memory_usage_threshold": "0.99"}


def _config(
    tmp_path: Path, digits_dir: Path, tracking_uri: str, epochs: int = 3, train: dict | None = None, max_failures: int = 1, **sweep,
) -> Path:
    cfg = {
        "name": "it-fail",
        "method": "dense",
        "model": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 2, "num_classes": 10},
        "data": {"path": str(digits_dir), "hflip": 0.0, "scale": [0.8, 1.0], "color_jitter": None, "crop_pct": 1.0, "loader_workers": 0},
        "train": {"epochs": epochs, "batch_size": BATCH, "lr": 2.0e-3, "amp": False, **(train or {})},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": max_failures},  # 1: a shared machine's OOM killer
        "sweep": {"search_space": "dense", "max_concurrent_trials": 1, **sweep},
        "measure": {"batch_size": 8, "warmup": 1, "iters": 3, "rounds": 1},
        "tracking": {"uri": tracking_uri, "experiment": "it-fail"},
        "storage_path": str(tmp_path / "runs"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start_cli(tmp_path: Path, env: dict, *args: str) -> subprocess.Popen:
    out, err = open(tmp_path / "out.log", "w"), open(tmp_path / "err.log", "w")  # files: pipes could fill and block it
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=tmp_path, stdout=out, stderr=err, text=True, env=env)


def _mlflow_bin() -> str:
    return shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _end(proc: subprocess.Popen | None, tree: set[int] = frozenset()) -> None:
    """SIGKILL ``proc`` and the processes of its tree recorded earlier (``tree``) that are still there."""
    if proc is not None and proc.poll() is None:
        tree = set(tree) | descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
    for pid in _alive(set(tree)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait(condition, proc: subprocess.Popen, tmp_path: Path, timeout: float = 900, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep ended early ({what}): {(tmp_path / 'err.log').read_text()[-4000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}: {(tmp_path / 'err.log').read_text()[-4000:]}"
        time.sleep(0.5)


def _sql(db: Path, query: str) -> list[tuple]:
    """Read the sweep's sqlite store read-only (an MlflowClient would migrate a store being created)."""
    if not db.is_file():
        return []
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute(query).fetchall()
    except sqlite3.Error:
        return []


def _trial_statuses(db: Path) -> list[tuple[str, str]]:
    return _sql(db, "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                    "WHERE t.key = 'prunetune.role' AND t.value = 'trial' ORDER BY r.start_time")


def _runs(client: MlflowClient, role: str) -> list:
    exp = client.get_experiment_by_name("it-fail")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`prunetune.role` = '{role}'", order_by=["attributes.start_time ASC"])


def _steps(client: MlflowClient, run_id: str, key: str = "train_loss") -> list[int]:
    """The epochs ``run_id`` logged ``key`` for (``train_loss``: epoch reports only; the final
    measurement logs ``val_top1`` at the last epoch again)."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_sigkilled_driver_resumes_without_rerunning_or_duplicating(tmp_path, digits_dir, run_cli, cli_env):
    db = tmp_path / "mlflow.db"
    config = _config(tmp_path, digits_dir, f"sqlite:///{db}", epochs=3, num_samples=2)
    proc, tree = None, set()
    try:
        proc = _start_cli(tmp_path, {**cli_env, **RAY_ENV}, "sweep", str(config), "--name", "killed")

        def first_done_second_checkpointed() -> bool:
            trials = _trial_statuses(db)
            if len(trials) < 2 or trials[0][1] != "FINISHED":
                return False
            second = trials[1][0]
            return bool(_sql(db, f"SELECT 1 FROM tags WHERE run_uuid = '{second}' AND key = 'checkpoint_uri'"))

        _wait(first_done_second_checkpointed, proc, tmp_path, what="trial 1 finished, trial 2 checkpointed")
        tree = descendants(proc.pid)
        assert tree, "the driver's local Ray runs below it"
        proc.send_signal(signal.SIGKILL)  # no graceful shutdown
        proc.wait(timeout=30)
        # The dead driver's Ray (GCS, raylet, workers) share its fate: gone without anyone cleaning up.
        deadline = time.time() + 90
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(tree), f"processes of the killed driver still alive: {sorted(_alive(tree))}"

        client = MlflowClient(f"sqlite:///{db}")
        (first, second) = _runs(client, "trial")
        assert first.info.status == "FINISHED" and second.info.status == "RUNNING"  # left behind by the dead driver
        (parent,) = _runs(client, "sweep")
        assert parent.info.status == "RUNNING"
        first_history = client.get_metric_history(first.info.run_id, "val_top1")

        resumed = run_cli("sweep", str(config), "--resume", "killed", cwd=tmp_path, timeout=900)  # on the shared Ray
        assert resumed.returncode == 0, resumed.stderr[-5000:]
        trials = _runs(client, "trial")
        assert [t.info.run_id for t in trials] == [first.info.run_id, second.info.run_id]  # no second run for a trial
        assert all(t.info.status == "FINISHED" and "latency_ms" in t.data.metrics for t in trials)
        # The finished trial was not run again: its history is what it was before the kill.
        assert [(m.step, m.value, m.timestamp) for m in client.get_metric_history(first.info.run_id, "val_top1")] == [
            (m.step, m.value, m.timestamp) for m in first_history
        ]
        # The running one was reconciled, then went on from its checkpoint: each epoch once.
        after = client.get_run(second.info.run_id)
        assert after.data.tags.get("prunetune.reconciled") == "true"
        assert _steps(client, second.info.run_id) == [0, 1, 2]
        assert "resuming trial at epoch" in resumed.stderr
        (parent_after,) = _runs(client, "sweep")
        assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
        exp = client.get_experiment_by_name("it-fail")
        assert not client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")  # none orphaned
        # A new sweep under the same name would be a second parent: refused, nothing recorded.
        again = run_cli("sweep", str(config), "--name", "killed", cwd=tmp_path)
        assert again.returncode == 2 and "continue it with --resume killed" in again.stderr
    finally:
        _end(proc, tree)


def _start_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / "server.log", "a")
    return subprocess.Popen(
        [_mlflow_bin(), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )


def _healthy(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        tree = descendants(server.pid)
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        for pid in _alive(tree):  # its uvicorn worker
            os.kill(pid, signal.SIGKILL)


def test_mlflow_outage_mid_sweep_leaves_no_hole(tmp_path, digits_dir, port_factory, cli_env, shared_ray):
    root = tmp_path / "server"
    root.mkdir()
    port = port_factory()
    uri = f"http://127.0.0.1:{port}"
    config = _config(tmp_path, digits_dir, uri, epochs=5, num_samples=1)
    server = proc = None
    try:
        server = _start_server(root, port)
        deadline = time.time() + 300  # minutes on a loaded shared machine
        while not _healthy(uri):
            assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        proc = _start_cli(tmp_path, {**cli_env, **shared_ray.client_env}, "sweep", str(config), "--name", "outage")
        client = MlflowClient(uri)

        def epoch_logged() -> bool:
            exp = client.get_experiment_by_name("it-fail")
            runs = client.search_runs([exp.experiment_id], "tags.`prunetune.role` = 'trial'") if exp else []
            return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "val_top1"))

        _wait(epoch_logged, proc, tmp_path, what="the first epoch in MLflow")
        (trial,) = _runs(client, "trial")
        _stop_server(server)
        down_at = time.time()
        # Training goes on while MLflow is down: the epochs it reports wait in the trial's outbox.
        outbox = tmp_path / "runs" / "_cache" / "_mlflow_outbox" / f"{trial.info.run_id}.jsonl"

        def epochs_waiting() -> list[dict]:
            lines = outbox.read_text().splitlines() if outbox.is_file() else []
            return [r for r in map(json.loads, lines) if "train_loss" in r["metrics"]]

        _wait(lambda: len(epochs_waiting()) >= 2, proc, tmp_path, what="two epochs trained while MLflow is down")
        time.sleep(max(0.0, 10 - (time.time() - down_at)))  # down for at least 10 s
        pending = epochs_waiting()
        up_at = time.time()
        server = _start_server(root, port)  # same port, same database
        proc.wait(timeout=900)
        assert proc.returncode == 0, (tmp_path / "err.log").read_text()[-5000:]

        (trial,) = _runs(client, "trial")
        assert trial.info.status == "FINISHED" and "latency_ms" in trial.data.metrics
        history = client.get_metric_history(trial.info.run_id, "train_loss")  # epoch reports only
        assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]  # no hole, nothing twice
        # The delayed epochs keep the step and the time they were measured at (during the outage).
        sent = {m.step: m.timestamp for m in history}
        assert all(sent[r["step"]] == r["timestamp_ms"] < up_at * 1000 for r in pending)
        assert not outbox.exists()  # everything was sent
    finally:
        _end(proc)
        if server is not None:
            _stop_server(server)


def test_nan_in_a_ray_worker_is_recorded_and_an_unrecoverable_one_fails_the_trial(tmp_path, digits_dir, run_cli):
    """Epoch 0: one NaN at step 2 -> skipped (recorded in MLflow). Epoch 2: NaN at every step -> skip, then
    out of retries (skip_batch only, 1 retry): the trial fails with the reason; epoch 1's checkpoint stays."""
    db = tmp_path / "mlflow.db"
    n_train = sum(1 for _ in (digits_dir / "train").rglob("*.png"))
    steps = n_train // BATCH  # drop_last: full batches only
    guard = {"policies": ["skip_batch"], "max_retries": 1}
    config = _config(tmp_path, digits_dir, f"sqlite:///{db}", epochs=3, train={"nan_guard": guard}, max_failures=0, num_samples=1)
    # Epoch 0's skip does not advance the step count: epoch 2 starts at step 3 * steps - 1.
    inject = {"rank": 0, "steps": [2], "from_step": 2 * steps - 1 + 3}
    proc = run_cli("sweep", str(config), "--name", "nan", cwd=tmp_path, env={TEST_INJECT_NAN_ENV: json.dumps(inject), **RAY_ENV}, timeout=900,
                   local_ray=True)  # the workers must see the injection's variable
    assert proc.returncode == 1, proc.stderr[-5000:]  # every trial failed
    assert "1 trials, 1 failed" in proc.stdout
    client = MlflowClient(f"sqlite:///{db}")
    (trial,) = _runs(client, "trial")
    assert trial.info.status == "FAILED"
    reason = trial.data.tags["prunetune.failure"]
    assert "NonFiniteLossError" in reason and "at epoch 2" in reason and "gave up after 1 retries" in reason
    assert "last good checkpoint (epoch 1) is kept" in reason
    events = json.loads(trial.data.tags["prunetune.nan_events"])
    assert [(e["epoch"], e["step"], e["policy"]) for e in events] == [(0, 2, "skip_batch")]
    assert [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "nan_events")] == [(0, 1.0), (1, 1.0)]
    assert "nan_events.json" in {a.path for a in client.list_artifacts(trial.info.run_id)}
    assert _steps(client, trial.info.run_id) == [0, 1]  # epoch 2 never finished
    (trial_dir,) = (tmp_path / "runs" / "nan").glob("trial_*")
    assert (trial_dir / "checkpoint_epoch_0001" / "state.pt").is_file()  # the last good checkpoint is kept
    assert trial.data.tags["checkpoint_uri"].endswith("checkpoint_epoch_0001")
