"""A real sweep over DVT, SViTE and S2ViTE on the digits, through Ray, recorded in MLflow.

DVT starts from the dense backbone the sweep trains first, calibrates its exit thresholds on held-out
training images after training, and measures the real early-exit pipeline (exit shares, per-exit
latency, the accuracy-against-budget table). SViTE trains from scratch with dynamic sparse training
on two DDP ranks (gloo), S2ViTE with structured sparsity, whose exported network is measured.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

EXPERIMENT = "it-dvt-svite"
POINTS = [
    {"method": "dvt", "budget": 0.5},
    {"method": "svite", "density": 0.5},
    {"method": "s2vite", "atten_density": 0.67, "other_density": 0.5},
]


def _config(tmp_path: Path, digits_dir: Path) -> Path:
    spaces = {
        "dvt.yaml": {"budget": {"distribution": "uniform", "low": 0.4, "high": 0.9}},
        "svite.yaml": {"density": {"distribution": "uniform", "low": 0.3, "high": 0.7}},
        "s2vite.yaml": {"atten_density": {"distribution": "uniform", "low": 0.34, "high": 1.0},
                        "other_density": {"distribution": "uniform", "low": 0.3, "high": 0.9}},
    }
    for name, space in spaces.items():
        (tmp_path / name).write_text(yaml.safe_dump(space))
    dst = {"update_frequency": 5, "t_end": 0.8}
    cfg = {
        "name": "it-dvt-svite",
        "method": {"name": "dvt"},
        "model": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3, "num_classes": 10},
        "data": {"path": str(digits_dir), "hflip": 0.0, "scale": [0.8, 1.0], "color_jitter": None, "crop_pct": 1.0, "loader_workers": 0},
        "pretrain": {"epochs": 3, "batch_size": 64, "lr": 2.0e-3, "amp": False},
        "train": {"epochs": 1, "batch_size": 64, "lr": 5.0e-4, "amp": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "sweep": {
            "methods": [
                {"method": {"name": "dvt"}, "search_space": "dvt.yaml"},
                # SViTE's masks must agree on every rank: two gloo workers
                {"method": {"name": "svite", **dst}, "search_space": "svite.yaml",
                 "set": {"train.epochs": 2, "resources.num_workers": 2, "resources.cpus_per_worker": 1}},
                {"method": {"name": "s2vite", **dst}, "search_space": "s2vite.yaml"},
            ],
            "num_samples": len(POINTS), "max_concurrent_trials": 1, "seed": 2,
            "objectives": [{"metric": "val_top1", "mode": "max"}, {"metric": "gflops", "mode": "min"}],
            "points_to_evaluate": POINTS,
        },
        "measure": {"batch_size": 16, "warmup": 2, "iters": 5, "rounds": 1},
        "tracking": {"experiment": EXPERIMENT},
        "storage_path": "runs",
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_dir, mlflow_server, run_cli):
    tmp_path = tmp_path_factory.mktemp("dvt_svite")
    proc = run_cli("sweep", str(_config(tmp_path, digits_dir)), "--tracking-uri", mlflow_server, cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`prunetune.role` = 'trial'")
    return tmp_path, client, {t.data.tags["method"]: t for t in trials}


def test_each_method_trained_and_was_measured(sweep):
    _, _, trials = sweep
    assert set(trials) == {"dvt", "svite", "s2vite"}
    for name, t in trials.items():
        assert t.info.status == "FINISHED", name
        m = t.data.metrics
        for key in ("val_top1", "latency_ms", "throughput_ips", "dense_latency_ms", "gflops", "dense_gflops", "speedup", "train_loss"):
            assert key in m, (name, key)


def test_dvt_calibrated_its_exits_and_measured_the_early_exit_pipeline(sweep, tmp_path):
    _, client, trials = sweep
    m = trials["dvt"].data.metrics
    shares = [m[f"exit_share_{k}"] for k in (1, 2, 3)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)
    # expected cost over the val set from the observed exit distribution and each exit's cumulative cost
    assert m["gflops"] == pytest.approx(sum(s * m[f"gflops_exit{k}"] for k, s in zip((1, 2, 3), shares)), rel=1e-6)
    assert m["latency_ms"] == pytest.approx(sum(s * m[f"latency_exit{k}_ms"] for k, s in zip((1, 2, 3), shares)), rel=1e-6)
    assert m["latency_exit1_ms"] < m["latency_exit3_ms"]
    # calibrated for half the dense model's GFLOPs on held-out training images
    assert m["calib_budget_met"] == 1.0 and m["calib_expected_gflops"] <= 0.5 * m["dense_gflops"] * (1 + 1e-6)
    names = {a.path for a in client.list_artifacts(trials["dvt"].info.run_id)}
    assert {"accuracy_vs_budget.csv", "accuracy_vs_budget.png"} <= names
    rows = list(csv.DictReader(open(client.download_artifacts(trials["dvt"].info.run_id, "accuracy_vs_budget.csv", str(tmp_path)))))
    assert len(rows) > 5 and {"gflops", "top1"} <= set(rows[0])


def test_svite_reports_its_density_and_no_speed_up_that_did_not_happen(sweep):
    _, _, trials = sweep
    m = trials["svite"].data.metrics
    assert m["density"] == pytest.approx(0.5, abs=0.01)
    assert m["gflops"] == pytest.approx(m["dense_gflops"], rel=1e-9)  # dense kernels run every weight
    assert m["gflops_theoretical"] < 0.75 * m["dense_gflops"]
    assert trials["svite"].data.params["resources.num_workers"] == "2"


def test_s2vite_measures_its_smaller_exported_network(sweep):
    _, _, trials = sweep
    m = trials["s2vite"].data.metrics
    assert m["gflops"] < m["dense_gflops"]
    assert m["params_m_inference"] < m["params_m"]
