"""Search spaces: the shipped files, each distribution's Tune domain, and errors that name file and parameter."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

from methods import BackboneConfig
from orchestrator.config import ExperimentConfig, apply_overrides, experiment_from_dict, to_flat_dict
from orchestrator.errors import ConfigError
from orchestrator.search_space import SHIPPED_DIR, load_search_space, parse_search_space, shipped_names


@pytest.fixture
def dvit() -> ExperimentConfig:
    """DynamicViT on a 12-block backbone with its default pruning_loc (3, 6, 9)."""
    return experiment_from_dict({"method": "dynamicvit", "model": {"depth": 12}})


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- shipped files ------------------------------------------------------------------------------


def test_a_file_ships_for_each_method():
    assert {"dynamicvit", "dense"} <= set(shipped_names())


@pytest.mark.parametrize("method", ["dynamicvit", "dense"])
def test_shipped_space_parses_and_keys_are_config_keys(method):
    exp = experiment_from_dict({"method": method, "model": {"depth": 12}})
    space = load_search_space(method, exp)  # by name: resolves to search_spaces/<method>.yaml
    assert Path(space.source) == (SHIPPED_DIR / f"{method}.yaml").resolve()
    raw_keys = list(yaml.safe_load((SHIPPED_DIR / f"{method}.yaml").read_text()))
    assert space.names() == raw_keys
    flat = to_flat_dict(exp)
    for name in space.names():
        assert name in flat, f"{name} is not a config key"
        if "." in name:
            assert name.split(".", 1)[0] in {"train", "pretrain", "model", "data", "sweep", "resources", "measure", "tracking"}
        else:
            assert name in exp.method_config.field_names()
    assert set(space.tune_space()) | set(space.fixed()) == set(space.names())


def test_dynamicvit_space_searches_the_paper_knobs(dvit):
    space = load_search_space("dynamicvit", dvit)
    assert {"keep_ratio", "ratio_weight", "distill_weight", "train.lr"} <= set(space.names())


def test_search_space_path_relative_to_a_base(tmp_path, dvit):
    (tmp_path / "spaces").mkdir()
    write_space(tmp_path / "spaces", "keep_ratio: {distribution: uniform, low: 0.5, high: 0.6}\n", "mine.yaml")
    space = load_search_space("spaces/mine.yaml", dvit, base=tmp_path)
    assert space.names() == ["keep_ratio"]


def test_missing_search_space_names_the_shipped_ones(dvit):
    with pytest.raises(ConfigError, match="'nosuch'.*dynamicvit"):
        load_search_space("nosuch", dvit)


# ---- good spaces --------------------------------------------------------------------------------


GOOD = """\
keep_ratio:         {distribution: uniform, low: 0.5, high: 0.9}
train.lr:           {distribution: loguniform, low: 1.0e-4, high: 3.0e-3}
train.seed:         {distribution: int, low: 0, high: 9}
train.batch_size:   {distribution: choice, values: [32, 64]}
method.gumbel_tau:  {distribution: fixed, value: 0.5}
pruning_loc:        {distribution: choice, values: [[2, 5, 8], [3, 6, 9]]}
"""


def test_each_distribution_gives_its_tune_domain(tmp_path, dvit):
    space = load_search_space(str(write_space(tmp_path, GOOD)), dvit)
    domains = space.tune_space()
    assert list(domains) == ["keep_ratio", "train.lr", "train.seed", "train.batch_size", "pruning_loc"]

    kr = domains["keep_ratio"]
    assert isinstance(kr, Float) and isinstance(kr.get_sampler(), Uniform)
    assert (kr.lower, kr.upper) == (0.5, 0.9)

    lr = domains["train.lr"]
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform)
    assert (lr.lower, lr.upper) == pytest.approx((1e-4, 3e-3))

    seed = domains["train.seed"]
    assert isinstance(seed, Integer)
    assert (seed.lower, seed.upper) == (0, 10)  # randint's upper bound is exclusive: high 9 is included
    samples = {seed.sample() for _ in range(400)}
    assert samples == set(range(10))

    bs = domains["train.batch_size"]
    assert isinstance(bs, Categorical) and bs.categories == [32, 64]
    assert domains["pruning_loc"].categories == [[2, 5, 8], [3, 6, 9]]

    assert space.fixed() == {"gumbel_tau": 0.5}  # method.gumbel_tau is the bare method key
    assert "gumbel_tau" in space.names()


def test_sampled_values_apply_to_the_config(tmp_path, dvit):
    space = load_search_space(str(write_space(tmp_path, GOOD)), dvit)
    for _ in range(20):
        sample = {k: d.sample() for k, d in space.tune_space().items()}
        exp = apply_overrides(dvit, {**space.fixed(), **sample})
        assert 0.5 <= exp.method_config.keep_ratio <= 0.9 and exp.method_config.gumbel_tau == 0.5
        assert isinstance(exp.train.seed, int) and exp.method_config.pruning_loc in ((2, 5, 8), (3, 6, 9))


def test_optuna_search_suggests_within_bounds(tmp_path, dvit):
    """The Tune domains go through Ray's OptunaSearch (Optuna underneath) and come back in range."""
    from ray.tune.search.optuna import OptunaSearch

    logging.getLogger("optuna").setLevel(logging.WARNING)
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith("pruning_loc"))
    space = load_search_space(str(write_space(tmp_path, text)), dvit)
    searcher = OptunaSearch(space=None, metric=["val_top1", "latency_ms"], mode=["max", "min"])
    assert searcher.set_search_properties(None, None, {"params": space.tune_space()})
    seeds = set()
    for i in range(12):
        params = searcher.suggest(f"t{i}")["params"]
        assert set(params) == {"keep_ratio", "train.lr", "train.seed", "train.batch_size"}
        assert 0.5 <= params["keep_ratio"] <= 0.9
        assert 1e-4 <= params["train.lr"] <= 3e-3
        assert isinstance(params["train.seed"], int) and 0 <= params["train.seed"] <= 9
        assert params["train.batch_size"] in (32, 64)
        seeds.add(params["train.seed"])
        apply_overrides(dvit, params)  # every suggestion is a valid trial config
        searcher.on_trial_complete(f"t{i}", {"val_top1": 50.0 + i, "latency_ms": 1.0 + i})
    assert len(seeds) > 1


def test_dense_space_for_dense(tmp_path):
    exp = experiment_from_dict({"method": "dense"})
    space = load_search_space(str(write_space(tmp_path, "train.weight_decay: {distribution: uniform, low: 0.0, high: 0.1}\n")), exp)
    assert space.names() == ["train.weight_decay"]


# ---- bad spaces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, param, words",
    [
        ("keep_ratio: {distribution: normal, low: 0.5, high: 0.9}\n", "keep_ratio", "unknown distribution"),
        ("keep_ratio: {distribution: uniform, low: 0.9, high: 0.5}\n", "keep_ratio", "low 0.9 > high 0.5"),
        ("train.lr: {distribution: loguniform, low: 0, high: 0.1}\n", "train.lr", "low > 0"),
        ("train.lr: {distribution: loguniform, low: -1, high: 0.1}\n", "train.lr", "low > 0"),
        ("keep_ratio: {distribution: uniform, low: 0.5}\n", "keep_ratio", "missing ['high']"),
        ("keep_ratio: {distribution: uniform, low: 0.5, high: 0.9, step: 0.1}\n", "keep_ratio", "unexpected ['step']"),
        ("keep_ratio: {distribution: choice, value: 0.5}\n", "keep_ratio", "missing ['values']"),
        ("keep_ratio: {distribution: choice, values: []}\n", "keep_ratio", "non-empty"),
        ("keep_ratio: {low: 0.5, high: 0.9}\n", "keep_ratio", "unknown distribution"),
        ("keep_ratio: 0.5\n", "keep_ratio", "must be a mapping"),
        ("keep_ratio: {distribution: uniform, low: a, high: 0.9}\n", "keep_ratio", "must be numbers"),
        ("train.seed: {distribution: int, low: 0.5, high: 3}\n", "train.seed", "integers"),
        ("drop_ratio: {distribution: uniform, low: 0.5, high: 0.9}\n", "drop_ratio", "unknown parameter"),
        ("train.lrr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n", "train.lrr", "unknown parameter"),
        ("method: {distribution: fixed, value: dense}\n", "method", "cannot be overridden"),
        ("keep_ratio: {distribution: uniform, low: 0.5, high: 1.5}\n", "keep_ratio", "keep_ratio must be in (0, 1]"),
        ("train.epochs: {distribution: uniform, low: 1, high: 4}\n", "train.epochs", "expected an integer"),
        ("train.batch_size: {distribution: choice, values: [32, 0]}\n", "train.batch_size", "batch_size must be >= 1"),
        ("pruning_loc: {distribution: fixed, value: [3, 6, 12]}\n", "pruning_loc", "pruning_loc"),
    ],
)
def test_bad_space_names_file_and_parameter(tmp_path, dvit, text, param, words):
    path = write_space(tmp_path, "train.weight_decay: {distribution: uniform, low: 0.0, high: 0.1}\n" + text, "bad_space.yaml")
    with pytest.raises(ConfigError) as e:
        load_search_space(str(path), dvit)
    msg = str(e.value)
    assert str(path) in msg
    assert f"'{param}'" in msg
    assert words in msg
    assert "\n" not in msg


def test_dynamicvit_parameter_is_unknown_for_dense(tmp_path):
    exp = experiment_from_dict({"method": "dense"})
    path = write_space(tmp_path, "keep_ratio: {distribution: uniform, low: 0.5, high: 0.9}\n")
    with pytest.raises(ConfigError, match=r"space\.yaml.*'keep_ratio'.*method 'dense'"):
        load_search_space(str(path), exp)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[keep_ratio, train.lr]\n", "just a string\n", "{}\n"])
def test_empty_or_non_mapping_space_names_the_file(tmp_path, dvit, text):
    path = write_space(tmp_path, text, "empty_space.yaml")
    with pytest.raises(ConfigError, match="empty_space.yaml.*non-empty mapping"):
        load_search_space(str(path), dvit)


def test_malformed_yaml_space_names_the_file(tmp_path, dvit):
    path = write_space(tmp_path, "keep_ratio: {distribution: uniform, low: 0.5\n", "broken_space.yaml")
    with pytest.raises(ConfigError, match="broken_space.yaml.*not valid YAML"):
        load_search_space(str(path), dvit)


def test_space_is_validated_against_the_experiment(dvit):
    """The same bounds pass on a deep model and fail where the model is too shallow for pruning_loc."""
    data = {"pruning_loc": {"distribution": "choice", "values": [[3, 6, 9], [2, 4, 10]]}}
    parse_search_space(data, dvit, "inline")
    shallow = dataclasses.replace(dvit, model=BackboneConfig(depth=10))
    with pytest.raises(ConfigError, match=r"inline.*'pruning_loc'.*needs more than 10 blocks"):
        parse_search_space(data, shallow, "inline")


# Method settings that fit the quickstart's 4-block tiny ViT (the paper defaults assume 12 blocks).
_TINY_FIT = {"dynamicvit": {"pruning_loc": [1, 2, 3]}, "spvit": {"pruning_loc": [1, 2, 3]}, "evovit": {"prune_location": 1}}


@pytest.mark.parametrize("method", shipped_names())
def test_every_shipped_space_fits_the_quickstart_backbone(method):
    """Each file is sized for the tiny ViT the quickstart and tests use: every bound and choice applies."""
    exp = experiment_from_dict({
        "method": {"name": method, **_TINY_FIT.get(method, {})},
        "model": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3, "num_classes": 10},
    })
    space = load_search_space(method, exp)
    assert space.names()
    for name in space.names():
        if "." not in name:
            assert name in exp.method_config.field_names()
