"""Trials survive a killed worker (Ray Train restarts them from their latest checkpoint), and ASHA's
early-stopped trials are recorded as such and kept off the Pareto front."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from proctree import descendants
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.integration


def _dense_config(tmp_path: Path, digits_dir: Path, **sweep) -> Path:
    cfg = {
        "name": "it-dense",
        "method": "dense",
        "model": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 64, "num_heads": 2, "num_classes": 10},
        "data": {"path": str(digits_dir), "hflip": 0.0, "scale": [0.8, 1.0], "color_jitter": None, "crop_pct": 1.0, "loader_workers": 0},
        "train": {"epochs": 3, "batch_size": 64, "lr": 2.0e-3, "amp": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 1},
        "sweep": {"search_space": "dense", "max_concurrent_trials": 1, **sweep},
        "measure": {"batch_size": 8, "warmup": 1, "iters": 3, "rounds": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "it-dense"},
        "storage_path": str(tmp_path / "runs"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _trials(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("it-dense")
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`prunetune.role` = 'trial'")


def _committed_checkpoint(tmp_path: Path) -> str:
    """The run's ``checkpoint_uri`` tag, read through a read-only sqlite connection: an MlflowClient
    here would run schema migrations against the store the sweep is still creating."""
    db = tmp_path / "mlflow.db"
    if not db.is_file():
        return ""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            row = con.execute("SELECT value FROM tags WHERE key = 'checkpoint_uri'").fetchone()
    except sqlite3.Error:  # tables not created yet, or locked for a moment
        return ""
    return row[0] if row else ""


def _kill_own_train_workers(root_pid: int) -> bool:
    """SIGKILL the Ray Train workers of the sweep this test started: its own local Ray runs under the
    CLI process, so they are found among that process's descendants, never by a machine-wide pattern."""
    killed = False
    for pid in descendants(root_pid):
        try:
            if b"ray::RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                killed = True
        except (OSError, ProcessLookupError):
            continue
    return killed


def _end(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and its process tree if it is still running (an assertion failed first)."""
    if proc.poll() is not None:
        return
    tree = descendants(proc.pid)
    proc.kill()
    proc.wait(timeout=30)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def test_killed_worker_resumes_from_latest_checkpoint(tmp_path, digits_dir, cli_env):
    config = _dense_config(tmp_path, digits_dir, num_samples=1)
    out_log, err_log = open(tmp_path / "out.log", "w"), open(tmp_path / "err.log", "w")  # files: pipes could fill and block it
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "sweep", str(config), "--name", "resume"],
        cwd=tmp_path, stdout=out_log, stderr=err_log, text=True, env=cli_env,
    )
    first = tmp_path / "runs" / "resume"
    try:
        # Kill only once Ray Train has committed the first checkpoint: the controller-side MLflow
        # callback tags the run with it after registering the report (a file on disk is not enough).
        deadline = time.time() + 300
        while not _committed_checkpoint(tmp_path).endswith("checkpoint_epoch_0000"):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "err.log").read_text()[-3000:]
            time.sleep(0.2)
        killed = _kill_own_train_workers(proc.pid)
        proc.wait(timeout=600)
    finally:
        _end(proc)
    err = (tmp_path / "err.log").read_text()
    assert proc.returncode == 0, err[-5000:]
    assert killed
    # The restart from checkpoint_epoch_0000 shows in the history below: epoch 0 reported once, not retrained.
    client, (trial,) = _trials(tmp_path)
    assert trial.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(trial.info.run_id, "val_top1"))
    assert steps[0] == 0 and steps[-1] == 2 and set(steps) == {0, 1, 2}
    # Epoch 0 (checkpointed before the kill) was not trained again; only the epoch cut short was redone
    # (train_loss: epoch reports only; the final measurement logs val_top1 at the last epoch again).
    assert sorted(m.step for m in client.get_metric_history(trial.info.run_id, "train_loss")) == [0, 1, 2]
    assert "latency_ms" in trial.data.metrics
    (trial_dir,) = first.glob("trial_*")
    assert (trial_dir / "checkpoint_epoch_0002" / "state.pt").is_file()


def test_ctrl_c_ends_the_sweep_killed_and_resume_finishes_it(tmp_path, digits_dir, run_cli, cli_env):
    config = _dense_config(tmp_path, digits_dir, num_samples=2, study_storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    with open(tmp_path / "out.log", "w") as out_log, open(tmp_path / "err.log", "w") as err_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "sweep", str(config), "--name", "intr"],
            cwd=tmp_path, stdout=out_log, stderr=err_log, text=True, env=cli_env,
        )
        try:
            deadline = time.time() + 300
            while not _committed_checkpoint(tmp_path).endswith("checkpoint_epoch_0000"):
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "err.log").read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)
        finally:
            _end(proc)
    out = (tmp_path / "out.log").read_text()
    assert proc.returncode == 130, (tmp_path / "err.log").read_text()[-5000:]
    assert "1 trials, 0 failed (interrupted)" in out
    client, (trial,) = _trials(tmp_path)
    (parent,) = client.search_runs([trial.info.experiment_id], filter_string="tags.`prunetune.role` = 'sweep'")
    assert parent.info.status == "KILLED" and parent.data.tags["prunetune.interrupted"] == "true"
    assert trial.info.status == "KILLED" and trial.data.tags["prunetune.interrupted"] == "true"
    assert trial.data.tags["pareto"] == "false" and "prunetune.stopped_early" not in trial.data.tags
    # What was recorded before the interrupt is kept: the first epoch's metrics and its checkpoint.
    assert 0 in {m.step for m in client.get_metric_history(trial.info.run_id, "val_top1")}
    (trial_dir,) = (tmp_path / "runs" / "intr").glob("trial_*")
    assert (trial_dir / "checkpoint_epoch_0000" / "state.pt").is_file()
    assert "pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # Resume: the same parent run, the interrupted trial from its checkpoint, then the rest.
    bad = run_cli("sweep", str(config), "--resume", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "--resume nope" in bad.stderr.strip().splitlines()[-1]
    changed = run_cli("sweep", str(config), "--resume", "intr", "--set", "train.epochs=4", cwd=tmp_path)
    assert changed.returncode == 2 and "train.epochs is 4 but the sweep ran with 3" in changed.stderr
    proc = run_cli("sweep", str(config), "--resume", "intr", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "resuming trial at epoch" in proc.stderr  # 1 or 2: Tune lets a trial run on briefly after Ctrl+C
    client, trials = _trials(tmp_path)
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert all("prunetune.interrupted" not in t.data.tags and "latency_ms" in t.data.metrics for t in trials)
    resumed = client.get_run(trial.info.run_id)
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_top1")]
    assert set(steps) == {0, 1, 2} and steps.count(0) == 1  # went on from its checkpoint, did not start over
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "prunetune.interrupted" not in parent.data.tags
    assert any(t.data.tags["pareto"] == "true" for t in trials)
    again = run_cli("sweep", str(config), "--resume", "intr", cwd=tmp_path)
    assert again.returncode == 2 and "already finished" in again.stderr
    # The sweep's Optuna study (sweep.study_storage) went on across the resume: one study trial per
    # Tune trial, the interrupted one completed, none started twice, values as MLflow recorded them.
    study = optuna.load_study(study_name="intr", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 2
    recorded = sorted((t.data.metrics["val_top1"], t.data.metrics["speedup"]) for t in trials)
    assert all(a == pytest.approx(b) for a, b in zip(sorted(tuple(t.values) for t in study.trials), recorded))


def test_asha_stops_trials_early_and_keeps_them_off_the_front(tmp_path, digits_dir, run_cli):
    # The second trial's learning rate is 20x too small: at the first rung it is below the median.
    points = [{"train.lr": 2e-3, "train.weight_decay": 0.05}, {"train.lr": 1e-4, "train.weight_decay": 0.05}]
    # One objective: plain ASHA on accuracy (two objectives would run MO-ASHA, see test_schedulers.py).
    config = _dense_config(tmp_path, digits_dir, num_samples=4, seed=0, points_to_evaluate=points,
                           asha={"grace_period": 1, "reduction_factor": 2}, objectives=[{"metric": "val_top1", "mode": "max"}])
    # On a Ray of its own while the package's shared Ray runs: two Rays on one machine, where Ray's
    # state API has to be told which one is the sweep's, or the stopped trials' placement groups stay.
    proc = run_cli("sweep", str(config), cwd=tmp_path, local_ray=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    client, trials = _trials(tmp_path)
    assert len(trials) == 4
    finished = [t for t in trials if t.info.status == "FINISHED"]
    stopped = [t for t in trials if t.info.status != "FINISHED"]
    assert finished, "ASHA always lets the best trial finish"
    assert stopped, "the trial with the tiny learning rate is below the first rung's median"
    for t in stopped:
        assert t.info.status == "KILLED"
        assert t.data.tags["prunetune.stopped_early"] == "true"
        assert t.data.tags["pareto"] == "false"
        assert "latency_ms" not in t.data.metrics
    for t in finished:
        assert "latency_ms" in t.data.metrics
    assert any(t.data.tags["pareto"] == "true" for t in finished)
    (parent,) = client.search_runs([trials[0].info.experiment_id], filter_string="tags.`prunetune.role` = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert "trials_failed" not in parent.data.tags, "a trial ASHA stopped is not a failed trial"
    assert "4 trials, 0 failed, " in proc.stdout and " stopped early by ASHA" in proc.stdout
    assert parent.data.metrics["trials_finished"] == len(finished)
