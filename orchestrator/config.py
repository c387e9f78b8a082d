"""Typed experiment configuration: frozen dataclasses, a YAML file, ``--set`` overrides, flat dicts.

A sweep is described by a YAML file that serializes ``ExperimentConfig``::

    name: digits-dynamicvit
    method: {name: dynamicvit, keep_ratio: 0.7, pruning_loc: [1, 3, 5]}
    model: {name: vit_tiny_patch16_224, img_size: 32, patch_size: 4, depth: 6, num_classes: 10}
    data: {path: data/digits}
    train: {epochs: 8, lr: 1.0e-3}
    sweep: {search_space: dynamicvit, num_samples: 8}

Flat keys (search spaces, ``--set``, MLflow params) share one namespace: a method's own fields are
bare (``keep_ratio``; ``method.keep_ratio`` is accepted too) and every other field is
``section.field`` (``train.lr``, ``model.depth``). ``apply_overrides`` rejects unknown keys, and
each trial rebuilds its typed config from the experiment plus its sampled values.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import torch
import yaml

from methods import BackboneConfig, create_backbone, Geometry, MeasureConfig, MethodConfig, UnknownMethodError, get_method

from .errors import ConfigError
from .yaml_file import read_yaml

__all__ = [
    "DataConfig", "TrainConfig", "NanGuardConfig", "ResourcesConfig", "Objective", "AshaConfig", "MethodArm", "SweepConfig", "arm_experiment",
    "TrackingConfig", "ExperimentConfig", "load_experiment", "experiment_from_dict", "apply_overrides",
    "to_flat_dict", "parse_set_args", "METRICS",
]

#: Final metrics every trial reports, and the direction that is better for each.
METRICS: dict[str, str] = {
    "val_top1": "max", "val_top5": "max", "latency_ms": "min", "throughput_ips": "max",
    "speedup": "max", "throughput_ratio": "max", "gflops": "min",
}


@dataclass(frozen=True)
class DataConfig:
    """An ImageNet-layout folder (``train/`` and ``val/``, a sub-folder per class) and its timm transforms."""

    path: str = ""
    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float | None = 0.4
    auto_augment: str | None = None
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    loader_workers: int = 4
    holdout: float = 0.1  # share of train/ held out (eval transforms) for methods that calibrate after training

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")


NanPolicy = Literal["skip_batch", "lower_lr", "amp_off", "fp32_attention"]


@dataclass(frozen=True)
class NanGuardConfig:
    """What a run does when a step's loss or gradients are not finite on any rank (``orchestrator.nan_guard``).

    Every rank sees the event in the same step. The n-th event since the last good checkpoint applies
    ``policies[n]`` (the last one again once the list is used up): ``skip_batch`` drops that step's
    update; ``lower_lr`` (x ``lr_factor``), ``amp_off`` and ``fp32_attention`` roll the model,
    optimizer, schedule and scaler back to the last good checkpoint first, and stay on for the rest
    of the run. Event ``max_retries + 1`` since the last good checkpoint fails the run with the
    reason; its checkpoints are kept. ``enabled: false``: the first non-finite loss stops the run.
    """

    enabled: bool = True
    policies: tuple[NanPolicy, ...] = ("skip_batch", "lower_lr", "amp_off", "fp32_attention")
    lr_factor: float = 0.5
    max_retries: int = 4

    def __post_init__(self) -> None:
        if self.enabled and not self.policies:
            raise ValueError("nan_guard.policies must name at least one policy (or set nan_guard.enabled: false)")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"nan_guard.lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.max_retries < 0:
            raise ValueError(f"nan_guard.max_retries must be >= 0, got {self.max_retries}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (per-worker batch; the global batch is ``batch_size * num_workers``).

    ``epochs: 0`` evaluates and measures the method's model as built (a training-free method such
    as ToMe on a trained backbone): such a trial runs in its Tune actor, with no worker group.

    ``init_checkpoint`` starts from a prunetune checkpoint (e.g. a warm-up stage) when the run has
    none of its own yet; a run's own latest checkpoint always wins, so restarts resume exactly.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = None
    amp: bool = True
    seed: int = 0
    init_checkpoint: str | None = None
    checkpoints_to_keep: int = 2
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    # Also checkpoint every N optimizer steps inside an epoch (long epochs); 0: at epoch ends only.
    checkpoint_every_steps: int = 0
    # Length of the LR schedule in epochs when it outlasts this run (a warm-up stage that a later
    # stage resumes to the full schedule, e.g. 9 of 300 epochs); None: ``epochs``.
    schedule_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}")
        if self.schedule_epochs is not None and self.schedule_epochs < self.epochs:
            raise ValueError(f"schedule_epochs ({self.schedule_epochs}) must be >= epochs ({self.epochs})")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0: evaluate and measure without training), got {self.epochs}")
        for name in ("batch_size", "checkpoints_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class ResourcesConfig:
    """Ray Train workers of one trial (DDP ranks): gloo on CPUs, NCCL when ``gpus_per_worker`` > 0."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 1
    #: How many times Ray Train tries again to start a trial's workers when they do not all start
    #: within its timeout (60 s, ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``): long enough for an
    #: autoscaler to add a GPU node, bounded so that a trial whose workers never start fails with
    #: the reason instead of waiting forever (Ray's default: no limit).
    worker_start_retries: int = 10

    def __post_init__(self) -> None:
        if self.worker_start_retries < 0:
            raise ValueError(f"worker_start_retries must be >= 0, got {self.worker_start_retries}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ValueError("gpus_per_worker must be >= 1 with several workers (NCCL rejects shared GPUs)")


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: Literal["max", "min"]

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown objective metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"objective mode must be 'max' or 'min', got {self.mode!r}")


@dataclass(frozen=True)
class AshaConfig:
    """Successive-halving early stopping with ``epoch`` as time: ASHA for one objective, MO-ASHA
    (non-dominated sorting at each rung, ``orchestrator.schedulers``) for several."""

    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class MethodArm:
    """One method of a sweep that searches several side by side (``sweep.methods``).

    Attributes:
        method: the method's config as in the top-level ``method`` section (``{name: tome, r: 8}``).
        search_space: its search space (a path, or a shipped name); default: the method's own.
        set: fixed overrides for its trials, flat keys (``{train.epochs: 0}``).
    """

    method: dict = field(default_factory=dict)
    search_space: str = ""
    set: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method.get("name"), str):
            raise ValueError(f"each of sweep.methods needs method: {{name: ...}}, got {self.method!r}")

    @property
    def name(self) -> str:
        return self.method["name"]


@dataclass(frozen=True)
class SweepConfig:
    """The search: a search-space file (a path, or the name of one in ``search_spaces/``) and Optuna.

    ``methods`` makes the method itself a searched choice: each arm brings its own config and
    search space (a conditional space), and all trials land on one Pareto front.
    """

    search_space: str = ""
    methods: tuple[MethodArm, ...] = ()
    # Accuracy against the speed-up over the dense backbone timed beside the model, call by call
    # (a ratio): absolute latency moves with whatever else runs on the machine,
    # the ratio does not. ``latency_ms`` is still recorded, and can be the objective instead.
    objectives: tuple[Objective, ...] = (Objective("val_top1", "max"), Objective("speedup", "max"))
    num_samples: int = 8
    max_concurrent_trials: int = 1
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    # Random trials before the sampler models (TPE's n_startup_trials, NSGA-II's population size);
    # None: Optuna's defaults (10 and 50), i.e. random search for small budgets.
    startup_trials: int | None = None
    asha: AshaConfig | None = None
    points_to_evaluate: tuple[dict, ...] = ()
    max_failures: int = 0
    # Where the Optuna study lives (``sqlite:///optuna.db``, ``postgresql://user@host/db``), named after
    # the sweep, for optuna-dashboard and resumes; None: in memory. Passwords come from the
    # environment (PGPASSWORD, ~/.pgpass), never from the config.
    study_storage: str | None = None

    def __post_init__(self) -> None:
        if not self.objectives:
            raise ValueError("objectives must name at least one metric")
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ValueError("num_samples and max_concurrent_trials must be >= 1")
        if self.startup_trials is not None and self.startup_trials < 2:
            raise ValueError(f"sweep.startup_trials must be >= 2, got {self.startup_trials}")
        names = [a.name for a in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep.methods names a method twice: {names}")
        if self.study_storage is not None:
            check_study_storage(self.study_storage)


_STUDY_SCHEMES = ("sqlite", "postgresql")


def check_study_storage(uri: str) -> None:
    """A ``sweep.study_storage`` URI: ``sqlite:///PATH`` or ``postgresql[+driver]://...``, with no password in it.

    Raises:
        ValueError: another scheme, or a password written into the URI.
    """
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0]
    if scheme not in _STUDY_SCHEMES or (scheme == "sqlite" and not uri.startswith("sqlite:///")):
        raise ValueError(
            f"study_storage must be sqlite:///PATH or postgresql://USER@HOST/DB, got a {parsed.scheme or 'plain path'!r} URI"
        )
    if parsed.password:
        raise ValueError("study_storage must not contain a password: set PGPASSWORD (or ~/.pgpass) in the environment instead")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: ``uri`` None means MLflow's own default (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)."""

    uri: str | None = None
    experiment: str = "prunetune"


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "prunetune"
    method: str = "dynamicvit"
    method_config: MethodConfig = field(default_factory=MethodConfig)
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage_path: str = "prunetune_runs"

    def __post_init__(self) -> None:
        # The field default (a bare MethodConfig) stands for the defaults of ``method``'s own config.
        if type(self.method_config) is MethodConfig:
            try:
                object.__setattr__(self, "method_config", get_method(self.method).config_cls())
            except UnknownMethodError as e:
                raise ValueError(str(e)) from None


_SECTIONS = {f.name for f in fields(ExperimentConfig)} - {"name", "method", "method_config", "storage_path"}


# --------------------------------------------------------------------------------------------------
# dict -> typed dataclass, with errors that name the field


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if tp is float else value
            if tp is int:
                if isinstance(value, float) and value.is_integer():
                    number = int(value)
                elif not isinstance(value, int):
                    number = int(str(value))
            return number
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls: type, data: dict, where: str) -> Any:
    """``cls(**data)`` with types coerced and unknown or invalid fields reported as ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _method_config(name: str, data: dict, where: str) -> MethodConfig:
    try:
        method = get_method(name)
    except UnknownMethodError as e:
        raise ConfigError(f"{where}: {e}") from None
    return build_dataclass(method.config_cls, data, where)


def experiment_from_dict(data: dict, where: str = "config") -> ExperimentConfig:
    """Build and validate an ``ExperimentConfig`` from its YAML mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    method = data.pop("method", ExperimentConfig.method)
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError(f"{where}: 'method' must be a name or a mapping with 'name'")
    method = dict(method)
    name = str(method.pop("name"))
    method_cfg = _method_config(name, method, f"{where}: method")
    exp = build_dataclass(ExperimentConfig, {**data, "method": name}, where)
    exp = replace(exp, method_config=method_cfg)
    return _validated(exp, where)


def _validated(exp: ExperimentConfig, where: str) -> ExperimentConfig:
    try:
        get_method(exp.method)
    except UnknownMethodError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        exp.method_config.validate_for(backbone_geometry(exp.model))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    for arm in exp.sweep.methods:
        arm_experiment(exp, arm)
    return exp


def arm_experiment(exp: ExperimentConfig, arm: MethodArm) -> ExperimentConfig:
    """The config an arm's trials start from: ``exp`` with the arm's method and fixed overrides."""
    fields_ = dict(arm.method)
    name = str(fields_.pop("name"))
    where = f"sweep.methods[{name}]"
    base = replace(exp, method=name, method_config=_method_config(name, fields_, f"{where}.method"), sweep=replace(exp.sweep, methods=()))
    try:
        base.method_config.validate_for(backbone_geometry(base.model))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not arm.set:
        return base
    try:
        return apply_overrides(base, arm.set)
    except ConfigError as e:
        raise ConfigError(f"{where}.set: {e}") from None


@functools.lru_cache(maxsize=64)
def backbone_geometry(model: BackboneConfig) -> Geometry:
    """Depth, patches, channels of the configured backbone (built on the meta device: no memory, no init)."""
    try:
        with torch.device("meta"):
            return Geometry.of(create_backbone(replace(model, pretrained=None)))
    except (ValueError, NotImplementedError, RuntimeError, TypeError, AssertionError) as e:
        raise ValueError(f"model: {e}") from None


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read the YAML file at ``path``, apply ``overrides``; relative data/storage paths resolve against the file."""
    path = Path(path)
    data = read_yaml(path, "config file")
    exp = experiment_from_dict(data or {}, where=str(path))
    if overrides:
        exp = apply_overrides(exp, overrides)
    return resolve_paths(exp, path.parent)


def _is_remote(uri: str) -> bool:
    return "://" in uri


def resolve_paths(exp: ExperimentConfig, base: Path) -> ExperimentConfig:
    """Make local paths absolute against ``base`` (Ray workers run elsewhere): data, storage,
    pretrained weights, init checkpoints and a sqlite tracking store."""

    def absolute(p: str | None) -> str | None:
        if not p or _is_remote(p):
            return p
        return str((base / os.path.expanduser(p)).resolve())

    uri = exp.tracking.uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + absolute(uri[len("sqlite:///"):])
    study = exp.sweep.study_storage
    if study and study.startswith("sqlite:///") and not study.startswith("sqlite:////"):
        study = "sqlite:///" + absolute(study[len("sqlite:///"):])
    return replace(
        exp,
        tracking=replace(exp.tracking, uri=uri),
        sweep=replace(exp.sweep, study_storage=study),
        storage_path=absolute(exp.storage_path),
        data=replace(exp.data, path=absolute(exp.data.path) or ""),
        model=replace(exp.model, pretrained=absolute(exp.model.pretrained)),
        train=replace(exp.train, init_checkpoint=absolute(exp.train.init_checkpoint)),
    )


# --------------------------------------------------------------------------------------------------
# flat dotted keys


def canonical_key(key: str, exp: ExperimentConfig) -> str:
    """``method.keep_ratio`` -> ``keep_ratio``; other keys unchanged."""
    if key.startswith("method.") and key[len("method."):] in exp.method_config.field_names():
        return key[len("method."):]
    return key


def to_flat_dict(exp: ExperimentConfig) -> dict[str, Any]:
    """Every leaf value under its flat key (method fields bare, others ``section.field``)."""
    flat: dict[str, Any] = {"name": exp.name, "method": exp.method, "storage_path": exp.storage_path}
    for f in fields(exp.method_config):
        flat[f.name] = getattr(exp.method_config, f.name)
    for section in sorted(_SECTIONS):
        for k, v in _flatten(dataclasses.asdict(getattr(exp, section)), section).items():
            flat[k] = v
    return flat


def _flatten(d: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v and k not in ("points_to_evaluate", "methods", "set"):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def apply_overrides(exp: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A copy of ``exp`` with flat-key overrides applied and validated; unknown keys raise ``ConfigError``."""
    method_updates: dict[str, Any] = {}
    section_updates: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for raw_key, value in overrides.items():
        key = canonical_key(raw_key, exp)
        if key in exp.method_config.field_names():
            method_updates[key] = value
        elif key in ("name", "storage_path"):
            top[key] = value
        elif key == "method":
            raise ConfigError("'method' cannot be overridden; write another config file")
        elif "." in key and key.split(".", 1)[0] in _SECTIONS:
            section, rest = key.split(".", 1)
            section_updates.setdefault(section, {})[rest] = value
        else:
            raise ConfigError(
                f"unknown parameter {raw_key!r} for method {exp.method!r} "
                f"(method fields: {', '.join(exp.method_config.field_names()) or 'none'}; "
                f"other keys are section.field, e.g. train.lr)"
            )
    if method_updates:
        current = dataclasses.asdict(exp.method_config)
        current.update(method_updates)
        exp = replace(exp, method_config=build_dataclass(type(exp.method_config), current, f"method {exp.method}"))
    for section, updates in section_updates.items():
        current = dataclasses.asdict(getattr(exp, section))
        for dotted, value in updates.items():
            _set_nested(current, dotted.split("."), value, f"{section}.{dotted}", type(getattr(exp, section)))
        cls = type(getattr(exp, section))
        exp = replace(exp, **{section: build_dataclass(cls, current, section)})
    if top:
        exp = replace(exp, **{k: str(v) for k, v in top.items()})
    return _validated(exp, "overrides")


def _set_nested(d: dict, parts: list[str], value: Any, where: str, cls: Any) -> None:
    for part in parts[:-1]:
        if part not in d:
            raise ConfigError(f"unknown parameter {where!r}")
        sub = _dataclass_field_type(cls, part)
        if d[part] is None and sub is not None:  # an optional section that is off (sweep.asha): start from its defaults
            d[part] = dataclasses.asdict(sub())
        if not isinstance(d[part], dict):
            raise ConfigError(f"unknown parameter {where!r}")
        d, cls = d[part], sub
    if parts[-1] not in d:
        raise ConfigError(f"unknown parameter {where!r}")
    d[parts[-1]] = value


def _dataclass_field_type(cls: Any, name: str) -> type | None:
    """The dataclass type of field ``name`` of dataclass ``cls`` (``X | None`` gives ``X``), else None."""
    if cls is None or not is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(name)
    return next((a for a in (typing.get_args(tp) or (tp,)) if is_dataclass(a)), None)


def parse_set_args(items: list[str] | None) -> dict[str, Any]:
    """``["train.lr=3e-4", "keep_ratio=0.6"]`` -> ``{"train.lr": 0.0003, "keep_ratio": 0.6}`` (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def to_yaml(exp: ExperimentConfig) -> str:
    """The YAML form of ``exp`` (what ``load_experiment`` reads back)."""
    data = dataclasses.asdict(exp)
    data["method"] = {"name": exp.method, **data.pop("method_config")}
    return yaml.safe_dump(_plain(data), sort_keys=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
