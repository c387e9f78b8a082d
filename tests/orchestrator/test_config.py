"""ExperimentConfig: the YAML file, --set overrides, flat keys, and the errors that name what is wrong."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from methods import BackboneConfig
from methods.dense import DenseConfig
from methods.dynamicvit import DynamicViTConfig
from orchestrator.config import (
    AshaConfig,
    ExperimentConfig,
    Objective,
    SweepConfig,
    TrackingConfig,
    apply_overrides,
    experiment_from_dict,
    load_experiment,
    parse_set_args,
    resolve_paths,
    to_flat_dict,
    to_yaml,
)
from orchestrator.errors import ConfigError, UserError

MINIMAL = """\
name: digits
method: {name: dynamicvit, keep_ratio: 0.6, pruning_loc: [1, 3, 5]}
model: {name: vit_tiny_patch16_224, img_size: 32, patch_size: 4, depth: 6, num_classes: 10}
data: {path: data/digits}
train: {epochs: 2, lr: 1.0e-3}
sweep: {search_space: dynamicvit, num_samples: 3}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def exp() -> ExperimentConfig:
    return experiment_from_dict(yaml.safe_load(MINIMAL))


# ---- the YAML file ------------------------------------------------------------------------------


def test_minimal_yaml_gives_typed_config(tmp_path):
    exp = load_experiment(write(tmp_path / "exp.yaml", MINIMAL))
    assert exp.method == "dynamicvit"
    assert exp.method_config == DynamicViTConfig(keep_ratio=0.6, pruning_loc=(1, 3, 5))
    assert exp.model.depth == 6 and exp.train.epochs == 2 and exp.train.lr == pytest.approx(1e-3)
    assert exp.train.batch_size == 128  # untouched fields keep their defaults
    assert exp.sweep.objectives == (Objective("val_top1", "max"), Objective("speedup", "max"))


def test_yaml_round_trip_of_a_full_config(tmp_path, make_tiny_experiment):
    """Every section non-default (tuples, a nested asha, points_to_evaluate, None fields) survives to_yaml -> load."""
    exp = make_tiny_experiment(
        "data/digits",
        sweep=SweepConfig(
            search_space="dynamicvit", objectives=(Objective("val_top1", "max"), Objective("gflops", "min"), Objective("speedup", "max")),
            num_samples=5, sampler="nsga2", asha=AshaConfig(grace_period=2, reduction_factor=3),
            points_to_evaluate=({"keep_ratio": 0.7, "train.lr": 1e-3},),
        ),
        tracking=TrackingConfig(uri="sqlite:///mlflow.db", experiment="e1"),
        storage_path="runs",
    )
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, pretrained="weights/dense.pt"))
    exp = resolve_paths(exp, tmp_path)
    path = write(tmp_path / "sub" / "exp.yaml", to_yaml(exp))
    assert load_experiment(path) == exp


def test_default_config_round_trips_and_has_the_method_defaults(tmp_path):
    exp = ExperimentConfig()
    assert exp.method_config == DynamicViTConfig()  # not the empty base MethodConfig
    path = write(tmp_path / "exp.yaml", to_yaml(exp))
    assert load_experiment(path) == resolve_paths(exp, tmp_path)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # elsewhere than the config's folder
    text = MINIMAL + "storage_path: runs\n"
    exp = load_experiment(write(tmp_path / "cfg" / "exp.yaml", text))
    assert exp.data.path == str((tmp_path / "cfg" / "data" / "digits").resolve())
    assert exp.storage_path == str((tmp_path / "cfg" / "runs").resolve())


def test_remote_and_absolute_paths_are_kept(tmp_path):
    text = MINIMAL.replace("data/digits", str(tmp_path / "abs")) + "storage_path: s3://bucket/runs\n"
    exp = load_experiment(write(tmp_path / "exp.yaml", text))
    assert exp.data.path == str(tmp_path / "abs")
    assert exp.storage_path == "s3://bucket/runs"


def test_missing_config_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml") as e:
        load_experiment(missing)
    assert "does not exist" in str(e.value)
    assert isinstance(e.value, UserError)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "name: x\nmethod: {name: dynamicvit\ntrain: [\n")
    with pytest.raises(ConfigError, match="broken.yaml") as e:
        load_experiment(path)
    assert "not valid YAML" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_method_lists_known_methods(tmp_path):
    path = write(tmp_path / "exp.yaml", MINIMAL.replace("name: dynamicvit", "name: no_such_method"))
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    msg = str(e.value)
    assert "'no_such_method'" in msg and "dense" in msg and "dynamicvit" in msg and "exp.yaml" in msg


def test_unknown_field_in_yaml_names_it(tmp_path):
    path = write(tmp_path / "exp.yaml", MINIMAL.replace("epochs: 2", "epochz: 2"))
    with pytest.raises(ConfigError, match="'epochz'"):
        load_experiment(path)


def test_non_mapping_top_level_is_rejected():
    with pytest.raises(ConfigError, match="mapping"):
        experiment_from_dict(["a", "b"])


def test_method_given_as_a_bare_name_gets_its_defaults():
    exp = experiment_from_dict({"method": "dense"})
    assert exp.method == "dense" and exp.method_config == DenseConfig()


def test_pruning_loc_beyond_depth_is_rejected(tmp_path):
    path = write(tmp_path / "exp.yaml", MINIMAL.replace("[1, 3, 5]", "[1, 3, 6]"))
    with pytest.raises(ConfigError, match="pruning_loc"):
        load_experiment(path)
    with pytest.raises(ConfigError, match="pruning_loc"):
        load_experiment(write(tmp_path / "ok.yaml", MINIMAL), overrides={"model.depth": 5})


# ---- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["keep_ratio", "method.keep_ratio"])
def test_override_a_method_field(exp, key):
    out = apply_overrides(exp, {key: 0.55})
    assert out.method_config.keep_ratio == 0.55
    assert out.method_config.pruning_loc == exp.method_config.pruning_loc
    assert exp.method_config.keep_ratio == 0.6  # the original is untouched (frozen, copied)


def test_override_coerces_a_string_number_to_float(exp):
    out = apply_overrides(exp, {"train.lr": "3e-4"})
    assert out.train.lr == pytest.approx(3e-4) and isinstance(out.train.lr, float)


def test_override_a_field_of_a_section_that_is_none(exp):
    assert exp.sweep.asha is None
    out = apply_overrides(exp, {"sweep.asha.grace_period": 3})
    assert out.sweep.asha == AshaConfig(grace_period=3, reduction_factor=2)


def test_override_two_fields_of_a_section_that_is_none(exp):
    """Two --set items under the same absent section: the second must not be rejected as unknown."""
    out = apply_overrides(exp, parse_set_args(["sweep.asha.grace_period=2", "sweep.asha.reduction_factor=3"]))
    assert out.sweep.asha == AshaConfig(grace_period=2, reduction_factor=3)


def test_override_a_whole_optional_section(exp):
    on = apply_overrides(exp, {"sweep.asha": {"grace_period": 4}})
    assert on.sweep.asha == AshaConfig(grace_period=4)
    assert apply_overrides(on, {"sweep.asha": None}).sweep.asha is None


def test_override_several_sections_at_once(exp):
    out = apply_overrides(exp, {"train.epochs": 7, "model.drop_path_rate": 0.1, "name": "other", "pruning_loc": [2, 4]})
    assert (out.train.epochs, out.model.drop_path_rate, out.name, out.method_config.pruning_loc) == (7, 0.1, "other", (2, 4))


@pytest.mark.parametrize("key", ["learning_rate", "train.lrr", "method.foo", "nosection.lr", "train.lr.sub", "sweep.asha.patience"])
def test_unknown_override_key_names_it(exp, key):
    with pytest.raises(ConfigError) as e:
        apply_overrides(exp, {key: 1})
    assert f"'{key}'" in str(e.value)


def test_method_cannot_be_overridden(exp):
    with pytest.raises(ConfigError, match="'method'"):
        apply_overrides(exp, {"method": "dense"})


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"train.epochs": -1}, "epochs"),
        ({"train.epochs": 2.5}, "train.epochs"),
        ({"train.amp": "yes"}, "train.amp"),
        ({"resources.placement_strategy": "X"}, "placement_strategy"),
        ({"sweep.objectives": [{"metric": "foo", "mode": "max"}]}, "foo"),
        ({"sweep.objectives": [{"metric": "val_top1", "mode": "up"}]}, "mode"),
        ({"data.scale": [0.1, 0.2, 0.3]}, "data.scale"),
    ],
)
def test_invalid_values_name_the_field(exp, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(exp, overrides)


def test_invalid_objective_in_yaml_names_the_field(tmp_path):
    text = MINIMAL.replace("num_samples: 3}", "num_samples: 3, objectives: [{metric: foo, mode: max}]}")
    with pytest.raises(ConfigError, match="sweep.objectives.*'foo'"):
        load_experiment(write(tmp_path / "exp.yaml", text))


# ---- --set and flat keys ------------------------------------------------------------------------


def test_parse_set_args_reads_yaml_values():
    out = parse_set_args(["train.lr=3.0e-4", "keep_ratio = 0.6", "pruning_loc=[1, 2]", "train.amp=false", "name=a=b", "train.grad_clip=null"])
    assert out == {"train.lr": 3e-4, "keep_ratio": 0.6, "pruning_loc": [1, 2], "train.amp": False, "name": "a=b", "train.grad_clip": None}
    assert parse_set_args(None) == {}


@pytest.mark.parametrize("item", ["train.lr", "keep_ratio:0.5"])
def test_parse_set_args_rejects_items_without_equals(item):
    with pytest.raises(ConfigError, match=item):
        parse_set_args([item])


def test_parse_set_args_rejects_invalid_yaml():
    with pytest.raises(ConfigError, match="pruning_loc"):
        parse_set_args(["pruning_loc=[1, 2"])


def test_set_args_then_overrides_coerce(exp):
    out = apply_overrides(exp, parse_set_args(["train.lr=3e-4", "method.keep_ratio=0.8"]))
    assert out.train.lr == pytest.approx(3e-4) and out.method_config.keep_ratio == 0.8


def test_flat_dict_keys(exp):
    flat = to_flat_dict(exp)
    for name in DynamicViTConfig.field_names():
        assert flat[name] == getattr(exp.method_config, name)
    assert not any(k.startswith("method.") for k in flat)
    assert flat["train.lr"] == exp.train.lr and flat["model.depth"] == 6 and flat["data.path"] == exp.data.path
    assert flat["method"] == "dynamicvit" and flat["name"] == "digits"
    sections = {k.split(".", 1)[0] for k in flat if "." in k}
    assert sections == {"data", "train", "pretrain", "model", "resources", "sweep", "measure", "tracking"}


def test_flat_dict_nested_section(exp):
    exp = apply_overrides(exp, {"sweep.asha.grace_period": 2})
    flat = to_flat_dict(exp)
    assert flat["sweep.asha.grace_period"] == 2 and flat["sweep.asha.reduction_factor"] == 2
    assert "sweep.asha" not in flat


@pytest.mark.parametrize("asha", [None, AshaConfig(3, 4)])
def test_flat_dict_keys_are_valid_overrides(exp, asha):
    """Every flat key is accepted back by apply_overrides and reproduces the config."""
    exp = dataclasses.replace(exp, sweep=dataclasses.replace(exp.sweep, asha=asha))
    flat = {k: v for k, v in to_flat_dict(exp).items() if k != "method"}
    assert apply_overrides(ExperimentConfig(), flat) == exp


def test_model_section_override(exp):
    out = apply_overrides(exp, {"model.name": "deit_tiny_patch16_224", "model.pretrained": "s3://b/w.pt"})
    assert out.model == dataclasses.replace(exp.model, name="deit_tiny_patch16_224", pretrained="s3://b/w.pt")
    assert isinstance(out.model, BackboneConfig)
