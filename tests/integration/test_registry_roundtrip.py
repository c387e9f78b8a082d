"""The registry round trip and the Optuna study in a database, on one tiny real sweep.

One ToMe trial (r=4, fine-tuned one epoch on the digits from dense weights written here) on a real
``mlflow server``, its Optuna study in a sqlite file. Then ``prunetune pareto --register``: the
registered version loads with MLflow's own loaders (pytorch and pyfunc) and predicts what the
model built here from the methods API and the trial's checkpoint predicts; its tags carry the
metrics and device MLflow recorded for the run.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient

from methods import BackboneConfig, create_backbone, get_method, load_backbone_weights
from methods.tome import ToMeConfig
from orchestrator.config import DataConfig
from orchestrator.data import build_val_dataset

pytestmark = pytest.mark.integration

EXPERIMENT = "it-registry"
SWEEP = "reg"
MODEL = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 64, "num_heads": 2, "num_classes": 10}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_dir, mlflow_server, run_cli):
    tmp = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    dense = create_backbone(BackboneConfig(**MODEL))
    torch.save({"model": dense.state_dict()}, tmp / "dense.pt")
    (tmp / "tome.yaml").write_text(yaml.safe_dump({"r": {"distribution": "int", "low": 1, "high": 8}}))
    cfg = {
        "name": "it-registry", "method": {"name": "tome"}, "model": {**MODEL, "pretrained": str(tmp / "dense.pt")},
        "data": {"path": str(digits_dir), "hflip": 0.0, "scale": [0.8, 1.0], "color_jitter": None, "crop_pct": 1.0, "loader_workers": 0},
        "train": {"epochs": 1, "batch_size": 64, "lr": 1.0e-3, "amp": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "sweep": {"search_space": "tome.yaml", "num_samples": 1, "points_to_evaluate": [{"r": 4}], "max_failures": 2,
                  "study_storage": "sqlite:///optuna.db"},
        "measure": {"batch_size": 8, "warmup": 1, "iters": 3, "rounds": 1},
        "tracking": {"experiment": EXPERIMENT},
        "storage_path": "runs",
    }
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("sweep", str(tmp / "sweep.yaml"), "--name", SWEEP, "--tracking-uri", mlflow_server, cwd=tmp, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (trial,) = client.search_runs([exp.experiment_id], filter_string="tags.`prunetune.role` = 'trial'")
    return tmp, proc, client, trial


def _images(digits_dir: Path, n: int) -> torch.Tensor:
    ds = build_val_dataset(DataConfig(path=str(digits_dir), crop_pct=1.0), 32)
    return torch.stack([ds[i][0] for i in range(n)])


def test_the_study_lives_in_the_database_with_the_sweeps_trial(sweep, mlflow_server, run_cli):
    tmp, proc, _, trial = sweep
    assert f"optuna-dashboard sqlite:///{tmp / 'optuna.db'}" in proc.stdout
    study = optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{tmp / 'optuna.db'}")
    # The default objectives: accuracy and the speed-up over dense, both maximised.
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MAXIMIZE]
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.COMPLETE
    assert t.params == {"params/r": 4}
    assert t.values == pytest.approx([trial.data.metrics["val_top1"], trial.data.metrics["speedup"]])
    assert [b.number for b in study.best_trials] == [0]
    # A new sweep of the same name would mix its trials into this study: refused before anything is recorded.
    again = run_cli("sweep", str(tmp / "sweep.yaml"), "--name", SWEEP, "--tracking-uri", mlflow_server, cwd=tmp)
    assert again.returncode == 2 and "already holds a study of that name" in again.stderr.strip().splitlines()[-1]
    assert len(optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{tmp / 'optuna.db'}").trials) == 1


def test_registered_model_loads_by_name_and_predicts_like_the_checkpoint(sweep, mlflow_server, run_cli, digits_dir, monkeypatch):
    tmp, _, client, trial = sweep
    missing = run_cli("pareto", "--experiment", EXPERIMENT, "--tracking-uri", mlflow_server, "--register", "tiny-tome", cwd=tmp)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("prunetune: error: --register needs the run")
    bogus = run_cli("pareto", "--experiment", EXPERIMENT, "--tracking-uri", mlflow_server, "--register", "tiny-tome", "--run", "0" * 32, cwd=tmp)
    assert bogus.returncode == 2 and "is not a finished run" in bogus.stderr
    assert not client.search_registered_models("name = 'tiny-tome'")  # refusals register nothing

    proc = run_cli("pareto", "--experiment", EXPERIMENT, "--tracking-uri", mlflow_server, "--register", "tiny-tome",
                   "--run", trial.info.run_id[:8], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"registered run {trial.info.run_id} as models:/tiny-tome/1" in proc.stdout

    # The twin: ToMe r=4 on the dense weights, with the trial's last checkpoint, built here from the methods API.
    method = get_method("tome")
    base = create_backbone(BackboneConfig(**MODEL))
    load_backbone_weights(base, tmp / "dense.pt")
    twin = method.build_model(ToMeConfig(r=4), base)
    (state,) = (tmp / "runs" / SWEEP).glob("trial_*/checkpoint_epoch_0000/state.pt")
    twin.load_state_dict(torch.load(state, map_location="cpu", weights_only=True)["model"])
    twin.eval()
    images = _images(digits_dir, 5)  # not the example's batch size: the batch dimension is dynamic
    with torch.inference_mode():
        expected = twin(images).logits

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # MLflow's loaders read the store from here
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    loaded = mlflow.pytorch.load_model("models:/tiny-tome/1")
    with torch.inference_mode():
        got = loaded(images)
    assert got.shape == (5, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-tome/1")
    np.testing.assert_allclose(pyfunc.predict(images.numpy()), expected.numpy(), rtol=1e-4, atol=1e-4)
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, 3, 32, 32)

    mv = client.get_model_version("tiny-tome", "1")
    assert mv.run_id == trial.info.run_id
    tags, metrics = mv.tags, trial.data.metrics
    assert tags["device"] == trial.data.tags["device"] and tags["method"] == "tome" and tags["backbone"] == MODEL["name"]
    for key in ("val_top1", "latency_ms", "throughput_ips", "gflops", "speedup", "dense_latency_ms"):
        assert float(tags[key]) == pytest.approx(metrics[key], rel=1e-5), key
    assert json.loads(tags["params"]) == {"r": "4"}
    assert tags["source_run_id"] == trial.info.run_id


def test_budget_answer_is_registered_as_the_next_version(sweep, mlflow_server, run_cli):
    tmp, _, client, trial = sweep
    proc = run_cli("pareto", "--experiment", EXPERIMENT, "--tracking-uri", mlflow_server, "--budget-ms", "1e6",
                   "--register", "tiny-tome", "--format", "json", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    answer = out["budget"]["run"]
    assert out["registered"]["uri"] == "models:/tiny-tome/2" and out["registered"]["run_id"] == answer["run_id"]
    mv = client.get_model_version("tiny-tome", "2")
    assert mv.tags["source_run_id"] == answer["run_id"]
    assert float(mv.tags["val_top1"]) == pytest.approx(answer["metrics"]["val_top1"], rel=1e-5)
