"""``pareto --register``'s pieces and ``sweep.study_storage``, without Ray.

The registry round trip on a real sqlite store (marked integration: torch.export is slow): a recorded ToMe run that trained nothing (its
weights are the dense ones it was given) is registered, loaded back with MLflow's own loader, and
predicts what ToMe built here on those weights predicts. (The integration test does the same for a
trained trial's checkpoint on a real ``mlflow server``.)
"""
from __future__ import annotations

import json

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient

from methods import BackboneConfig, create_backbone, get_method, load_backbone_weights
from methods.tome import ToMeConfig
from orchestrator.config import experiment_from_dict, to_flat_dict
from orchestrator.errors import ConfigError, UserError
from orchestrator.registry import choose_run, register_run, run_experiment
from orchestrator.search_space import load_sweep_space
from orchestrator.study import check_new_study, open_storage
from orchestrator.sweep import _searcher
from orchestrator.tracking import Tracker, param_value

MODEL = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 64, "num_heads": 2, "num_classes": 10}


def _rows():
    return [
        {"run_id": "aaaaaaaa1111", "status": "FINISHED", "metrics": {"val_top1": 50.0, "latency_ms": 2.0}},
        {"run_id": "aaaaaaaa2222", "status": "FINISHED", "metrics": {"val_top1": 60.0, "latency_ms": 3.0}},
        {"run_id": "bbbbbbbb3333", "status": "FINISHED", "metrics": {"val_top1": 70.0, "latency_ms": 4.0}},
        {"run_id": "cccccccc4444", "status": "FAILED", "metrics": {}},
    ]


def test_choose_run_by_id_prefix_or_budget_and_refusals():
    rows = _rows()
    assert choose_run(rows, "aaaaaaaa2222", None, None)["run_id"] == "aaaaaaaa2222"
    assert choose_run(rows, "bbbbbbbb", None, None)["run_id"] == "bbbbbbbb3333"  # the table's 8 characters
    assert choose_run(rows, None, 3.5, rows[1])["run_id"] == "aaaaaaaa2222"
    for run, budget, answer, message in [
        ("aaaaaaaa", None, None, "matches several runs"),
        ("bbbb", None, None, "is not a finished run"),  # too short to be taken as a prefix
        ("cccccccc4444", None, None, "is not a finished run"),  # failed: nothing measured to register
        (None, None, None, "--register needs the run to register"),
        (None, 1.0, None, "no finished run is within 1 ms"),
        ("aaaaaaaa1111", 3.0, rows[0], "not both"),
    ]:
        with pytest.raises(UserError, match=message):
            choose_run(rows, run, budget, answer)


def test_a_runs_config_rebuilds_from_its_recorded_params(tmp_path):
    exp = experiment_from_dict({
        "method": {"name": "dynamicvit", "keep_ratio": 0.6, "pruning_loc": [1, 2, 3]},
        "model": {**MODEL, "pretrained": str(tmp_path / "w.pt")},
        "data": {"path": str(tmp_path), "color_jitter": None, "scale": [0.8, 1.0], "hflip": 0.0},
        "train": {"epochs": 2, "lr": 3e-4, "amp": False, "seed": 7},
    })
    params = {k: param_value(k, v) for k, v in to_flat_dict(exp).items()}  # what MLflow holds: strings
    rebuilt = run_experiment(params)
    assert rebuilt.method == "dynamicvit" and rebuilt.method_config == exp.method_config
    assert rebuilt.model == exp.model and rebuilt.data == exp.data and rebuilt.train == exp.train


@pytest.mark.parametrize("uri, message", [
    ("mysql://u@h/db", "study_storage must be sqlite:///PATH or postgresql"),
    ("optuna.db", "study_storage must be sqlite:///PATH or postgresql"),
    ("postgresql://u:hunter2@h/db", "must not contain a password: set PGPASSWORD"),
])
def test_study_storage_is_checked_at_load(uri, message):
    with pytest.raises(ConfigError, match=message) as e:
        experiment_from_dict({"method": "tome", "sweep": {"study_storage": uri}})
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)


def test_study_storage_refuses_the_tracking_database_and_a_taken_study_name(tmp_path):
    with pytest.raises(UserError, match="is the MLflow tracking database"):
        open_storage(f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/mlflow.db")
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db")
    optuna.create_study(storage=storage, study_name="taken")
    check_new_study(storage, "free")
    with pytest.raises(UserError, match="already holds a study of that name"):
        check_new_study(storage, "taken")


def test_the_searchers_study_is_created_in_the_storage_with_the_sweeps_directions(tmp_path):
    exp = experiment_from_dict({
        "method": "tome", "model": MODEL,
        "sweep": {"search_space": "tome", "objectives": [{"metric": "val_top1", "mode": "max"}, {"metric": "gflops", "mode": "min"}]},
    })
    uri = f"sqlite:///{tmp_path}/optuna.db"
    sp = load_sweep_space(exp, base=tmp_path)
    searcher = _searcher(exp, sp, "my-sweep", open_storage(uri))
    searcher.set_search_properties(None, None, {"params": sp.tune_space()})  # what Tune does before the first trial
    config = searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"val_top1": 55.0, "gflops": 0.01, **config})
    study = optuna.load_study(study_name="my-sweep", storage=uri)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == [55.0, 0.01]
    assert set(trial.params) == {f"params/{k}" for k in config["params"]}


@pytest.mark.integration  # torch.export of the model takes tens of seconds on a busy CPU
def test_register_a_run_that_trained_nothing_and_load_it_back(tmp_path, mlflow_tmp, monkeypatch):
    torch.manual_seed(0)
    dense = create_backbone(BackboneConfig(**MODEL))
    torch.save({"model": dense.state_dict()}, tmp_path / "dense.pt")
    exp = experiment_from_dict({
        "method": {"name": "tome", "r": 3}, "model": {**MODEL, "pretrained": str(tmp_path / "dense.pt")},
        "data": {"path": str(tmp_path / "gone")}, "train": {"epochs": 0},
    })
    tracker = Tracker(mlflow_tmp, "reg")
    run_id = tracker.start_run("trial_x", to_flat_dict(exp), {"prunetune.role": "trial", "device": "cpu (test)", "method": "tome"})
    tracker.log_metrics(run_id, {"val_top1": 12.5, "latency_ms": 1.25, "gflops": 0.0123, "speedup": 1.5, "epoch": 0})
    tracker.end_run(run_id)

    version = register_run(mlflow_tmp, run_id, "tiny")
    assert version.uri == "models:/tiny/1"

    base = create_backbone(BackboneConfig(**MODEL))
    load_backbone_weights(base, tmp_path / "dense.pt")
    twin = get_method("tome").build_model(ToMeConfig(r=3), base).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = twin(images).logits
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_tmp)  # MLflow's loaders read the store from here
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_tmp)
    loaded = mlflow.pytorch.load_model("models:/tiny/1")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mlflow.pyfunc.load_model("models:/tiny/1").predict(images.numpy()), expected.numpy(), rtol=1e-4, atol=1e-4)
    mv = MlflowClient(mlflow_tmp, registry_uri=mlflow_tmp).get_model_version("tiny", "1")
    assert mv.run_id == run_id
    assert mv.tags["device"] == "cpu (test)" and mv.tags["method"] == "tome" and mv.tags["source_run_id"] == run_id
    assert float(mv.tags["val_top1"]) == 12.5 and float(mv.tags["latency_ms"]) == 1.25 and float(mv.tags["gflops"]) == 0.0123
    assert mv.tags["input"] == "float32 [N, 3, 32, 32] -> logits [N, 10]"
    assert json.loads(mv.tags["params"]) == {}


def test_registering_needs_weights(tmp_path, mlflow_tmp):
    exp = experiment_from_dict({"method": "tome", "model": MODEL, "train": {"epochs": 0}})
    tracker = Tracker(mlflow_tmp, "reg")
    run_id = tracker.start_run("trial_y", to_flat_dict(exp), {"prunetune.role": "trial"})
    tracker.end_run(run_id)
    with pytest.raises(UserError, match="records no checkpoint and no dense weights"):
        register_run(mlflow_tmp, run_id, "tiny")
    assert not MlflowClient(mlflow_tmp, registry_uri=mlflow_tmp).search_registered_models()
