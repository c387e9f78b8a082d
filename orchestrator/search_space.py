"""Search spaces as data: a YAML mapping of parameter -> distribution, validated against the config.

    keep_ratio:   {distribution: uniform, low: 0.5, high: 0.9}
    train.lr:     {distribution: loguniform, low: 1.0e-4, high: 3.0e-3}
    depth_choice: {distribution: choice, values: [4, 6]}
    seed:         {distribution: int, low: 0, high: 9}        # inclusive bounds
    gumbel_tau:   {distribution: fixed, value: 1.0}

Keys are flat config keys (see ``orchestrator.config``): a method's fields bare, others
``section.field``. Every bound and value is applied to the experiment config on load, so a key the
method does not have, or a value its config rejects (``keep_ratio: 1.5``), fails before any trial.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ExperimentConfig, apply_overrides, canonical_key
from .errors import ConfigError
from .yaml_file import read_yaml

__all__ = ["Param", "SearchSpace", "load_search_space", "SHIPPED_DIR", "Arm", "SweepSpace", "load_sweep_space", "METHOD_PARAM"]

#: The search spaces shipped with prunetune, one YAML file per method.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "search_spaces"

Distribution = Literal["uniform", "loguniform", "int", "choice", "fixed"]
_FIELDS = {
    "uniform": {"low", "high"},
    "loguniform": {"low", "high"},
    "int": {"low", "high"},
    "choice": {"values"},
    "fixed": {"value"},
}


@dataclass(frozen=True)
class Param:
    """One searchable parameter."""

    name: str
    distribution: Distribution
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    value: Any = None

    def candidates(self) -> list[Any]:
        """Values that must all be valid for the config: the bounds, every choice, the fixed value."""
        if self.distribution == "int":
            return [self.low, self.high]
        if self.distribution in ("uniform", "loguniform"):
            # and a non-integer interior value: a continuous range over an int field must fail here, not in every trial
            return [self.low, self.low + (self.high - self.low) / math.pi, self.high]
        if self.distribution == "choice":
            return list(self.values)
        return [self.value]

    def to_tune(self) -> Any:
        from ray import tune  # here, not at import: reading and checking a space needs no Ray (seconds on a CLI error)

        if self.distribution == "uniform":
            return tune.uniform(self.low, self.high)
        if self.distribution == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.distribution == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper bound is exclusive
        if self.distribution == "choice":
            return tune.choice(list(self.values))
        return self.value


@dataclass(frozen=True)
class SearchSpace:
    source: str
    params: tuple[Param, ...]

    def trial_searched(self, params: dict[str, Any]) -> list[str]:
        """The parameters searched for the trial with sampled ``params`` (its own method's, and ``method``)."""
        if not self.conditional:
            return self.names()
        return [METHOD_PARAM] + self.arm(params).space.names()

    def tune_space(self) -> dict[str, Any]:
        """Sampled parameters as Tune domains (what Optuna searches)."""
        return {p.name: p.to_tune() for p in self.params if p.distribution != "fixed"}

    def fixed(self) -> dict[str, Any]:
        return {p.name: p.value for p in self.params if p.distribution == "fixed"}

    def names(self) -> list[str]:
        return [p.name for p in self.params]


def _parse_param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {name!r} must be a mapping with 'distribution', got {spec!r}")
    dist = spec.get("distribution")
    if dist not in _FIELDS:
        raise ConfigError(f"{where}: {name!r} has unknown distribution {dist!r} (known: {', '.join(_FIELDS)})")
    given = set(spec) - {"distribution"}
    if given != _FIELDS[dist]:
        missing, extra = _FIELDS[dist] - given, given - _FIELDS[dist]
        what = f"missing {sorted(missing)}" if missing else f"unexpected {sorted(extra)}"
        raise ConfigError(f"{where}: {name!r} ({dist}) {what}")
    if dist in ("uniform", "loguniform", "int"):
        low, high = spec["low"], spec["high"]
        try:
            low, high = float(low), float(high)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {name!r} low/high must be numbers, got {spec['low']!r}, {spec['high']!r}") from None
        if low > high:
            raise ConfigError(f"{where}: {name!r} has low {low:g} > high {high:g}")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: {name!r} loguniform needs low > 0, got {low:g}")
        if dist == "int" and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{where}: {name!r} int bounds must be integers, got {low:g}, {high:g}")
        return Param(name, dist, low=low, high=high)
    if dist == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {name!r} choice needs a non-empty list of values, got {values!r}")
        return Param(name, dist, values=tuple(values))
    return Param(name, dist, value=spec["value"])


def resolve_search_space_path(ref: str, base: Path | None = None) -> Path:
    """A search-space reference: a file path (relative to ``base``), or a shipped name like ``dynamicvit``."""
    candidates = [Path(ref)]
    if base is not None and not Path(ref).is_absolute():
        candidates.insert(0, base / ref)
    if "/" not in ref and not ref.endswith((".yaml", ".yml")):
        candidates.append(SHIPPED_DIR / f"{ref}.yaml")
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"search space {ref!r} not found (a YAML file, or one of: {', '.join(shipped_names())})")


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def load_search_space(ref: str, exp: ExperimentConfig, base: Path | None = None) -> SearchSpace:
    """Load, parse and validate the search space ``ref`` for experiment ``exp``."""
    path = resolve_search_space_path(ref, base)
    data = read_yaml(path, "search space")
    return parse_search_space(data, exp, str(path))


def parse_search_space(data: Any, exp: ExperimentConfig, where: str) -> SearchSpace:
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: a search space is a non-empty mapping of parameter -> distribution")
    params = []
    for raw_name, spec in data.items():
        name = canonical_key(str(raw_name), exp)
        param = _parse_param(name, spec, where)
        for value in param.candidates():
            try:
                apply_overrides(exp, {name: value})
            except ConfigError as e:
                raise ConfigError(f"{where}: {raw_name!r}: {e}") from None
        params.append(param)
    return SearchSpace(where, tuple(params))


# --------------------------------------------------------------------------------------------------
# what a sweep searches: one method's space, or several methods side by side (a conditional space)

#: In a sweep over several methods, the searched method is this parameter, and each method's own
#: parameters are named ``<method>:<key>`` (``tome:r``), so two methods never share a distribution.
METHOD_PARAM = "method"


@dataclass(frozen=True)
class Arm:
    """One method of a sweep: the config its trials start from, and its search space."""

    method: str
    experiment: ExperimentConfig
    space: SearchSpace


@dataclass(frozen=True)
class SweepSpace:
    """The whole search of a sweep. One arm: that method's space, keys as written. Several arms:
    ``method`` is a searched choice and each arm's parameters are conditional on it."""

    arms: tuple[Arm, ...]

    @property
    def conditional(self) -> bool:
        return len(self.arms) > 1

    @property
    def source(self) -> str:
        return ", ".join(f"{a.method}: {a.space.source}" for a in self.arms) if self.conditional else self.arms[0].space.source

    def methods(self) -> list[str]:
        return [a.method for a in self.arms]

    def names(self) -> list[str]:
        """The searched parameters as recorded on trials (bare config keys, plus ``method`` when conditional)."""
        if not self.conditional:
            return self.arms[0].space.names()
        return [METHOD_PARAM] + list(dict.fromkeys(n for a in self.arms for n in a.space.names()))

    def trial_searched(self, params: dict[str, Any]) -> list[str]:
        """The parameters searched for the trial with sampled ``params`` (its own method's, and ``method``)."""
        if not self.conditional:
            return self.names()
        return [METHOD_PARAM] + self.arm(params).space.names()

    def tune_space(self) -> dict[str, Any]:
        """Tune domains for a plain space; a conditional one is searched by ``define_by_run`` instead."""
        return {} if self.conditional else self.arms[0].space.tune_space()

    def with_pretrained(self, uri: str) -> "SweepSpace":
        """Every arm whose method starts from trained dense weights starting from those at ``uri``
        (the sweep trained them first); methods trained from scratch keep none."""
        from methods import get_method

        return SweepSpace(tuple(
            replace(a, experiment=replace(a.experiment, model=replace(a.experiment.model, pretrained=uri)))
            if get_method(a.method).needs_pretrained else a
            for a in self.arms
        ))

    def define_by_run(self) -> "DefineByRun":
        return DefineByRun(tuple((a.method, a.space.params) for a in self.arms))

    def arm(self, params: dict[str, Any]) -> Arm:
        if not self.conditional:
            return self.arms[0]
        name = params.get(METHOD_PARAM)
        for a in self.arms:
            if a.method == name:
                return a
        raise ConfigError(f"trial parameters name no method of the sweep ({name!r}; known: {', '.join(self.methods())})")

    def trial_overrides(self, params: dict[str, Any]) -> tuple[Arm, dict[str, Any]]:
        """The arm a trial's sampled ``params`` select, and the flat overrides for its config."""
        arm = self.arm(params)
        if not self.conditional:
            return arm, {**arm.space.fixed(), **params}
        prefix = f"{arm.method}:"
        sampled = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        return arm, {**arm.space.fixed(), **{k: _decode(v) for k, v in sampled.items()}}

    def trial_experiment(self, params: dict[str, Any]) -> ExperimentConfig:
        arm, overrides = self.trial_overrides(params)
        return apply_overrides(arm.experiment, overrides)

    def optuna_point(self, point: dict[str, Any]) -> dict[str, Any]:
        """A user's ``points_to_evaluate`` entry (bare keys, ``method`` when conditional) in the searcher's names."""
        if not self.conditional:
            return dict(point)
        arm = self.arm(point)
        return {METHOD_PARAM: arm.method, **{f"{arm.method}:{k}": _encode(v) for k, v in point.items() if k != METHOD_PARAM}}


def _encode(value: Any) -> Any:
    """Optuna's categorical choices are scalars; lists (``pruning_loc``) travel as YAML text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else "yaml:" + yaml.safe_dump(value, default_flow_style=True).strip()


def _decode(value: Any) -> Any:
    return yaml.safe_load(value[len("yaml:"):]) if isinstance(value, str) and value.startswith("yaml:") else value


class DefineByRun:
    """Optuna define-by-run space over several methods (picklable, so a resumed sweep keeps it).

    Ray's ``OptunaSearch`` nests the values under ``prefix`` (``params/method`` -> ``config["params"]["method"]``).
    """

    def __init__(self, arms: tuple[tuple[str, tuple[Param, ...]], ...], prefix: str = "params/") -> None:
        self.arms = arms
        self.prefix = prefix

    def __call__(self, trial) -> None:
        method = trial.suggest_categorical(self.prefix + METHOD_PARAM, [name for name, _ in self.arms])
        for name, params in self.arms:
            if name != method:
                continue
            for p in params:
                key = f"{self.prefix}{name}:{p.name}"
                if p.distribution in ("uniform", "loguniform"):
                    trial.suggest_float(key, p.low, p.high, log=p.distribution == "loguniform")
                elif p.distribution == "int":
                    trial.suggest_int(key, int(p.low), int(p.high))
                elif p.distribution == "choice":
                    trial.suggest_categorical(key, [_encode(v) for v in p.values])
        return None


def load_sweep_space(exp: ExperimentConfig, base: Path | None = None) -> SweepSpace:
    """The sweep's search: ``sweep.methods`` (one arm each), else ``method`` with ``sweep.search_space``."""
    from .config import arm_experiment

    if not exp.sweep.methods:
        space = load_search_space(exp.sweep.search_space or exp.method, exp, base)
        return SweepSpace((Arm(exp.method, exp, space),))
    arms = []
    for arm in exp.sweep.methods:
        arm_exp = arm_experiment(exp, arm)
        arms.append(Arm(arm.name, arm_exp, load_search_space(arm.search_space or arm.name, arm_exp, base)))
    return SweepSpace(tuple(arms))
