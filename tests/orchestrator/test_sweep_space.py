"""Sweeps over several methods: the conditional space, each trial's config, the searcher, resources."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from orchestrator.config import experiment_from_dict
from orchestrator.driver import TRIAL_RESOURCES
from orchestrator.errors import ConfigError
from orchestrator.search_space import load_search_space, load_sweep_space
from orchestrator.sweep import _searcher

TINY_MODEL = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3, "num_classes": 10}


def _experiment(tmp_path: Path, **sweep) -> dict:
    (tmp_path / "dyn.yaml").write_text(yaml.safe_dump({
        "keep_ratio": {"distribution": "uniform", "low": 0.5, "high": 0.9},
        "pruning_loc": {"distribution": "choice", "values": [[1, 2, 3], [1, 3]]},
        "train.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-3},
    }))
    return {
        "method": {"name": "dynamicvit", "pruning_loc": [1, 2, 3]},
        "model": TINY_MODEL,
        "train": {"epochs": 3},
        "resources": {"num_workers": 2, "cpus_per_worker": 1.5},
        "sweep": {
            "methods": [
                {"method": {"name": "dynamicvit", "pruning_loc": [1, 2, 3]}, "search_space": "dyn.yaml", "set": {"train.epochs": 2}},
                {"method": {"name": "tome", "r": 5}, "search_space": "tome"},
            ],
            "objectives": [{"metric": "val_top1", "mode": "max"}, {"metric": "gflops", "mode": "min"}],
            **sweep,
        },
    }


@pytest.fixture
def space(tmp_path):
    exp = experiment_from_dict(_experiment(tmp_path))
    return exp, load_sweep_space(exp, base=tmp_path)


def test_arms_carry_their_method_config_and_fixed_overrides(space):
    exp, sp = space
    assert sp.conditional and sp.methods() == ["dynamicvit", "tome"]
    dyn, tome = sp.arms
    assert dyn.experiment.method == "dynamicvit" and dyn.experiment.train.epochs == 2
    assert tome.experiment.method == "tome" and tome.experiment.method_config.r == 5
    assert tome.experiment.train.epochs == 3  # the shipped tome space fixes 0 per trial, not per arm
    assert sp.names()[0] == "method"
    assert {"keep_ratio", "pruning_loc", "train.lr", "r", "inflect", "train.epochs"} <= set(sp.names())


def test_each_trial_gets_its_own_methods_config(space):
    _, sp = space
    dyn = sp.trial_experiment({"method": "dynamicvit", "dynamicvit:keep_ratio": 0.6, "dynamicvit:pruning_loc": "yaml:[1, 3]",
                               "dynamicvit:train.lr": 2e-4, "tome:r": 9})
    assert (dyn.method, dyn.method_config.keep_ratio, dyn.method_config.pruning_loc, dyn.train.lr, dyn.train.epochs) == (
        "dynamicvit", 0.6, (1, 3), 2e-4, 2)  # tome:r belongs to another arm and is ignored
    tome = sp.trial_experiment({"method": "tome", "tome:r": 9, "tome:inflect": -1.0})
    assert (tome.method, tome.method_config.r, tome.method_config.inflect, tome.train.epochs) == ("tome", 9, -1.0, 0)
    assert sp.trial_searched({"method": "tome"}) == ["method", "r", "inflect", "train.epochs"]
    with pytest.raises(ConfigError, match="nope"):
        sp.trial_experiment({"method": "nope"})


def test_define_by_run_samples_only_the_chosen_methods_parameters(space):
    """A real Optuna study: every trial has ``method`` and exactly its arm's sampled parameters, in range."""
    _, sp = space
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        sp.define_by_run()(trial)
        params = {k.removeprefix("params/"): v for k, v in trial.params.items()}
        method = params.pop("method")
        seen.add(method)
        expected = {"dynamicvit": {"keep_ratio", "pruning_loc", "train.lr"}, "tome": {"r", "inflect"}}[method]
        assert {k.split(":", 1)[1] for k in params} == expected
        assert all(k.startswith(method + ":") for k in params)
        exp = sp.trial_experiment({"method": method, **params})
        if method == "dynamicvit":
            assert 0.5 <= exp.method_config.keep_ratio <= 0.9 and exp.method_config.pruning_loc in ((1, 2, 3), (1, 3))
        else:
            assert 1 <= exp.method_config.r <= 12
        study.tell(trial, [1.0, 1.0])
    assert seen == {"dynamicvit", "tome"}


def test_points_to_evaluate_reach_the_searcher_in_its_names(tmp_path):
    exp = experiment_from_dict(_experiment(tmp_path, points_to_evaluate=[{"method": "tome", "r": 4, "inflect": 0.0}]))
    sp = load_sweep_space(exp, base=tmp_path)
    searcher = _searcher(exp, sp)
    searcher.set_search_properties(None, None, {})
    config = searcher.suggest("t1")
    assert config["params"] == {"method": "tome", "tome:r": 4, "tome:inflect": 0.0}
    assert sp.trial_experiment(config["params"]).method_config.r == 4


def test_every_trial_actor_reserves_memory_only():
    """Trial actors hold no CPU (Ray Train's workers, or an evaluation task, hold those), and all
    reserve the same, so Tune can hand a finished trial's actor to the next trial."""
    assert [dict(b) for b in TRIAL_RESOURCES.bundles] == [{"memory": 512 * 1024**2}]


def test_a_search_range_that_breaks_the_backbone_is_refused(tmp_path):
    """keep_ratio down to 0.2 with three stages on 64 patches keeps no token (int(64 * 0.2**3) = 0)."""
    exp = experiment_from_dict({"method": {"name": "dynamicvit", "pruning_loc": [1, 2, 3]}, "model": TINY_MODEL})
    (tmp_path / "s.yaml").write_text("keep_ratio: {distribution: uniform, low: 0.2, high: 0.9}\n")
    with pytest.raises(ConfigError, match=r"keep_ratio.*0\.2.*keeps no token of 64"):
        load_search_space(str(tmp_path / "s.yaml"), exp)
    (tmp_path / "ok.yaml").write_text("keep_ratio: {distribution: uniform, low: 0.25, high: 0.9}\n")
    load_search_space(str(tmp_path / "ok.yaml"), exp)  # int(64 * 0.25**3) = 1: fits


def test_an_arm_that_does_not_fit_the_backbone_is_refused(tmp_path):
    data = _experiment(tmp_path)
    data["sweep"]["methods"][1]["method"]["r_per_layer"] = [1, 2]  # 4 blocks
    with pytest.raises(ConfigError, match="sweep.methods\\[tome\\]"):
        experiment_from_dict(data)
    data = _experiment(tmp_path)
    data["sweep"]["methods"].append({"method": {"name": "tome"}})
    with pytest.raises(ConfigError, match="twice"):
        experiment_from_dict(data)
