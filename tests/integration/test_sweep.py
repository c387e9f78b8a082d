"""A real sweep: dense pre-training, then 2 DynamicViT trials x 2 DDP (gloo) workers, on a real
MLflow server; then the records, the checkpoints and ``prunetune pareto --json`` are checked."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

EPOCHS = 2
FINAL_METRICS = ("val_top1", "latency_ms", "throughput_ips", "dense_latency_ms", "dense_throughput_ips", "speedup", "gflops")


def _config(tmp_path: Path, digits_dir: Path) -> Path:
    cfg = {
        "name": "it-dynamicvit",
        "method": {"name": "dynamicvit", "pruning_loc": [1, 3, 5]},
        "model": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 6, "embed_dim": 96, "num_heads": 3, "num_classes": 10},
        "data": {"path": str(digits_dir), "hflip": 0.0, "scale": [0.8, 1.0], "color_jitter": None, "crop_pct": 1.0, "loader_workers": 0},
        "pretrain": {"epochs": 2, "batch_size": 64, "lr": 2.0e-3, "amp": False},
        "train": {"epochs": EPOCHS, "batch_size": 64, "lr": 1.0e-3, "amp": False},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        "sweep": {"search_space": "space.yaml", "num_samples": 2, "max_concurrent_trials": 1, "seed": 3},
        "measure": {"batch_size": 16, "warmup": 2, "iters": 5, "rounds": 1},
        "tracking": {"experiment": "it-sweep"},
        "storage_path": "runs",
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "keep_ratio": {"distribution": "uniform", "low": 0.5, "high": 0.9},
        "ratio_weight": {"distribution": "loguniform", "low": 1.0, "high": 10.0},
        "train.lr": {"distribution": "loguniform", "low": 5.0e-4, "high": 2.0e-3},
        "gumbel_tau": {"distribution": "fixed", "value": 1.0},
    }))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_dir, mlflow_server, run_cli):
    tmp_path = tmp_path_factory.mktemp("sweep")
    config = _config(tmp_path, digits_dir)
    proc = run_cli("sweep", str(config), "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp_path, proc, MlflowClient(mlflow_server)


def _runs(client: MlflowClient, role: str):
    exp = client.get_experiment_by_name("it-sweep")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`prunetune.role` = '{role}'")


def test_parent_and_children_recorded(sweep):
    _, _, client = sweep
    (parent,) = _runs(client, "sweep")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["method"] == "dynamicvit"
    assert set(parent.data.tags["prunetune.searched_params"].split(",")) == {"keep_ratio", "ratio_weight", "train.lr", "gumbel_tau"}
    children = _runs(client, "trial")
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["method"] == "dynamicvit"
        assert child.data.tags["backbone"] == "vit_tiny_patch16_224"
        assert child.data.tags["pareto"] in ("true", "false")
        assert 0.5 <= float(child.data.params["keep_ratio"]) <= 0.9
        assert 5e-4 <= float(child.data.params["train.lr"]) <= 2e-3
        assert child.data.params["model.pretrained"].endswith("dense_backbone.pt")
        for metric in FINAL_METRICS:
            assert metric in child.data.metrics, metric
        m = child.data.metrics
        assert 0 <= m["val_top1"] <= 100
        assert m["gflops"] < m["dense_gflops"]  # tokens really dropped at inference
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert sorted(h.step for h in history) == list(range(EPOCHS))
        # Both DDP ranks really ran: each saw its DistributedSampler half of the 1437 training
        # images, ceil(1437 / 2) = 719, in whole batches of 64 (drop_last): 11 * 64 = 704.
        ranks = json.loads(child.data.tags["prunetune.ranks"])
        assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
        assert [r["train_samples"] for r in ranks] == [704, 704]
        assert child.data.tags["device"] == ranks[0]["device"] and ranks[0]["device"].startswith("cpu")
    # The dense backbone is measured beside the trials and competes on the front (it may dominate them).
    (ref,) = _runs(client, "reference")
    assert ref.data.tags["method"] == "dense" and ref.data.tags["mlflow.parentRunId"] == parent.info.run_id
    candidates = children + [ref]
    # On the default objectives, accuracy and the speed-up over dense (the reference's own is dense
    # timed beside itself: about 1).
    assert ref.data.metrics["speedup"] == pytest.approx(1.0, rel=0.3)
    points = {r.info.run_id: (r.data.metrics["val_top1"], r.data.metrics["speedup"]) for r in candidates}
    brute = {k for k, (a, b) in points.items() if not any(a2 >= a and b2 >= b and (a2, b2) != (a, b) for a2, b2 in points.values())}
    assert brute and {r.info.run_id for r in candidates if r.data.tags["pareto"] == "true"} == brute


def test_dense_stage_trained_first(sweep):
    _, _, client = sweep
    (pre,) = _runs(client, "pretrain")
    assert pre.info.status == "FINISHED"
    assert pre.data.tags["method"] == "dense"
    assert len(client.get_metric_history(pre.info.run_id, "val_top1")) == 2


def test_pareto_artifacts_and_tags_agree(sweep):
    _, _, client = sweep
    (parent,) = _runs(client, "sweep")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.csv", "pareto_front.json", "pareto_front.png"} <= names
    png = Path(client.download_artifacts(parent.info.run_id, "pareto_front.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(parent.info.run_id, "pareto_front.csv")).read_text())))
    tagged = {c.info.run_id for c in _runs(client, "trial") + _runs(client, "reference") if c.data.tags["pareto"] == "true"}
    assert {r["run_id"] for r in rows} == tagged


def test_checkpoints_written_per_epoch(sweep):
    tmp_path, _, client = sweep
    (parent,) = _runs(client, "sweep")
    sweep_dir = tmp_path / "runs" / parent.info.run_name
    trial_dirs = sorted(sweep_dir.glob("trial_*"))
    assert len(trial_dirs) == 2
    for d in trial_dirs:
        ckpts = sorted(p.name for p in d.glob("checkpoint_epoch_*"))
        assert ckpts == [f"checkpoint_epoch_{e:04d}" for e in range(EPOCHS)]
        assert (d / ckpts[-1] / "state.pt").is_file()


def test_pareto_cli_reads_the_front_back(sweep, mlflow_server, run_cli):
    tmp_path, _, client = sweep
    proc = run_cli("pareto", "--experiment", "it-sweep", "--tracking-uri", mlflow_server, "--json", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tagged = {c.info.run_id for c in _runs(client, "trial") + _runs(client, "reference") if c.data.tags["pareto"] == "true"}
    assert {r["run_id"] for r in out["front"]} == tagged
    for row in out["front"]:
        assert set(FINAL_METRICS) <= set(row["metrics"])
        if row["role"] == "trial":
            assert {"keep_ratio", "ratio_weight", "train.lr"} <= set(row["params"])
    text = run_cli("pareto", "--experiment", "it-sweep", "--tracking-uri", mlflow_server, cwd=tmp_path, timeout=120)
    assert text.returncode == 0 and "Pareto front" in text.stdout


def test_sweep_output_shows_progress_and_front(sweep, shared_ray):
    tmp_path, proc, _ = sweep
    assert "Pareto front" in proc.stdout
    assert "measured: val_top1" in proc.stderr  # per-trial progress lines
    console = proc.stdout + proc.stderr
    assert console.count(" started: keep_ratio=") == 2  # one line per trial start, with its parameters
    assert console.count("epoch 1/") >= 2 and "train_loss" in console  # one line per trial epoch
    # Ray's per-checkpoint / per-report lines, its worker-group lines and Tune's tables stay out of the console...
    assert "Checkpoint successfully created" not in console and "Moving model to device" not in console
    assert "Trial status:" not in console and "│" not in console and "Configuration for experiment" not in console
    assert "world_rank=" not in console and "PreemptionWatcher" not in console
    assert "took" in console and "start-up" in console  # the sweep's wall-clock breakdown, in one line
    # ...but are still in Ray's own log files (the workers write those themselves).
    ours = f"Checkpoint successfully created at: Checkpoint(filesystem=local, path={tmp_path.resolve()}"
    logs = [f for root in shared_ray.temps for f in root.glob("session_*/logs/**/*")  # the Ray the sweep ran on
            if f.suffix in (".err", ".out", ".log") and f.is_file()]
    assert any(ours in f.read_text(errors="replace") for f in logs), "this sweep's checkpoint lines were expected in Ray's worker logs"
    # A Ray on one machine (LOCAL_RAY_ENV, which the shared Ray has too): Ray Train started no preemption watcher.
    assert not [f.name for f in logs if "PreemptionWatcher" in f.read_text(errors="replace")]
