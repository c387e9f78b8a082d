"""Pipelines: stages run in order, each from the previous one's checkpoint, resumable and recorded.

A pipeline file (YAML) names its stages::

    name: evovit-deit-b
    storage_path: s3://prunetune/pipelines      # each stage's checkpoints and manifest go under <storage_path>/<name>/
    tracking: {experiment: evovit-deit-b}
    stages:
      - {name: warmup, kind: train, config: experiments/evovit_deit_b.yaml, set: {train.epochs: 9, train.schedule_epochs: 300}}
      - {name: main, kind: train, config: experiments/evovit_deit_b.yaml, from: warmup}

``train``: one Ray Train run of the experiment's ``method`` with its ``train`` settings (``from``: it
starts from that stage's final checkpoint, as ``train.init_checkpoint``: weights, optimizer,
schedule position and epoch, so ``epochs: 300`` after a 9-epoch stage trains epochs 9..299).
``sweep``: a ``prunetune sweep`` of the experiment (``from``: a dense ``train`` stage, whose
backbone becomes every trial's ``model.pretrained``).

A stage's identity is the sha256 of its resolved inputs (its flat config and its upstream
checkpoint's sha256). Each stage keeps a manifest, ``<storage_path>/<name>/manifests/<stage>.json``
(status, identity, inputs, checkpoint URI and sha256, MLflow run ids). ``--resume`` skips finished
stages whose inputs match, continues an unfinished one (a ``train`` stage from its newest good
checkpoint, a sweep with ``sweep --resume``), and refuses a stage whose inputs changed, naming the
keys that differ. MLflow: a parent run per pipeline, a child run per stage; a sweep stage's own
sweep run is nested under the pipeline run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from . import checkpoints, storage
from .config import ExperimentConfig, TrackingConfig, apply_overrides, build_dataclass, load_experiment, to_flat_dict
from .errors import ConfigError, UserError
from .resume import check_identity
from .tracking import PARENT_TAG, ROLE_TAG, param_value, redact
from .yaml_file import read_yaml

__all__ = ["StageConfig", "PipelineConfig", "load_pipeline", "run_pipeline", "PipelineOutcome", "stage_inputs", "PIPELINE_TAG", "STAGE_TAG"]

_logger = logging.getLogger(__name__)

PIPELINE_TAG = "prunetune.pipeline"
STAGE_TAG = "prunetune.stage"
#: Inputs that may change between runs without changing what a stage computes.
_NOT_INPUTS = ("tracking.", "name", "storage_path", "sweep.max_concurrent_trials", "resources.max_failures", "resources.worker_start_retries", "data.loader_workers")


@dataclass(frozen=True)
class StageConfig:
    """One stage: ``kind`` train (a Ray Train run) or sweep; ``config`` an experiment file (relative
    to the pipeline file), ``set`` flat overrides, ``from`` the stage whose final checkpoint it starts from."""

    name: str
    config: str
    kind: Literal["train", "sweep"] = "train"
    set: dict = field(default_factory=dict)
    from_: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"a stage needs a name without '/', got {self.name!r}")


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    stages: tuple[StageConfig, ...]
    storage_path: str = "prunetune_runs"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    base: str = "."  # the pipeline file's folder (relative paths resolve against it)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a pipeline needs at least one stage")
        seen: set[str] = set()
        for s in self.stages:
            if s.name in seen:
                raise ValueError(f"stage {s.name!r} is named twice")
            if s.from_ is not None and s.from_ not in seen:
                raise ValueError(f"stage {s.name!r}: from {s.from_!r} must name an earlier stage")
            seen.add(s.name)

    @property
    def folder(self) -> str:
        """Where the pipeline's stages keep their checkpoints (``<storage_path>/<name>``)."""
        return storage.join(self.storage_path, self.name)

    def stage(self, name: str) -> StageConfig:
        return next(s for s in self.stages if s.name == name)


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read a pipeline file; every experiment file it names must exist (each is loaded and validated)."""
    path = Path(path)
    data = read_yaml(path, "pipeline file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    stages = []
    for i, raw in enumerate(data.get("stages") or []):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: stages[{i}] must be a mapping")
        raw = dict(raw)
        if "from" in raw:
            raw["from_"] = raw.pop("from")
        stages.append(build_dataclass(StageConfig, raw, f"{path}: stages[{i}]"))
    rest = {k: v for k, v in data.items() if k != "stages"}
    base = path.resolve().parent
    pipe = build_dataclass(PipelineConfig, {**rest, "stages": tuple(stages), "base": str(base)}, str(path))
    storage_path = pipe.storage_path if "://" in pipe.storage_path else str((base / pipe.storage_path).resolve())
    pipe = replace(pipe, storage_path=storage_path)
    exps = {s.name: stage_experiment(pipe, s) for s in pipe.stages}  # fails here for a missing or invalid file
    methods = {name: exp.method for name, exp in exps.items()}
    for s in pipe.stages:
        if s.kind == "train" and s.from_:  # its checkpoint must be of the same method and backbone
            up = exps[s.from_]
            try:
                check_identity({"method": up.method, "backbone": up.model.name}, exps[s.name].method, exps[s.name].model.name, f"stage {s.from_}'s checkpoint")
            except UserError as e:
                raise ConfigError(f"stage {s.name}: {e}") from None
        if s.kind == "sweep" and s.from_ and (pipe.stage(s.from_).kind != "train" or methods[s.from_] != "dense"):
            raise ConfigError(f"stage {s.name}: a sweep starts from a dense train stage's backbone, but {s.from_} trains {methods[s.from_]}")
    return pipe


def stage_experiment(pipe: PipelineConfig, stage: StageConfig, upstream: str | None = None) -> ExperimentConfig:
    """The stage's experiment: its file with its overrides, the pipeline's tracking and storage, and
    the upstream checkpoint (``train.init_checkpoint``) or backbone (``model.pretrained``, a sweep)."""
    file = Path(pipe.base, stage.config)
    try:
        exp = load_experiment(file, stage.set)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name}: {e}") from None
    tracking = {f"tracking.{k}": v for k, v in dataclasses.asdict(pipe.tracking).items() if v is not None}
    exp = apply_overrides(exp, {**tracking, "storage_path": pipe.folder, "name": f"{pipe.name}-{stage.name}"})
    if stage.kind == "train" and exp.train.epochs < 1:
        raise ConfigError(f"stage {stage.name}: a train stage needs train.epochs >= 1")
    if upstream is not None:
        if stage.kind == "train":
            exp = replace(exp, train=replace(exp.train, init_checkpoint=upstream))
        else:
            exp = replace(exp, model=replace(exp.model, pretrained=upstream))
    return exp


def stage_inputs(exp: ExperimentConfig) -> dict[str, str]:
    """What a stage computes from: its flat config (as MLflow records it), without where it is recorded."""
    return {k: param_value(k, v) for k, v in sorted(to_flat_dict(exp).items()) if not k.startswith(_NOT_INPUTS)}


def identity(inputs: dict[str, str], upstream_sha: str | None) -> str:
    what = {"inputs": inputs, "upstream_sha256": upstream_sha}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys if old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------------------------
# manifests


def manifest_uri(pipe: PipelineConfig, stage: str) -> str:
    return storage.join(pipe.folder, "manifests", f"{stage}.json")


def read_manifest(pipe: PipelineConfig, stage: str) -> dict[str, Any] | None:
    uri = manifest_uri(pipe, stage)
    if not storage.exists(uri):
        return None
    return json.loads(storage.fetch(uri, cache=False).read_text())


def _write_manifest(pipe: PipelineConfig, manifest: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / "manifest.json"
        local.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        storage.upload(local, manifest_uri(pipe, manifest["stage"]))  # atomic locally (rename); a single PUT on S3


# --------------------------------------------------------------------------------------------------
# running


@dataclass
class PipelineOutcome:
    name: str
    run_id: str
    ran: list[str]
    skipped: list[str]
    manifests: dict[str, dict[str, Any]]


def _check_resume(pipe: PipelineConfig, resume: bool) -> dict[str, dict[str, Any]]:
    """The stages' manifests; refuses a fresh run over recorded stages, and a resume whose stage
    inputs changed (the upstream checkpoints are compared as each stage is reached)."""
    manifests = {s.name: m for s in pipe.stages if (m := read_manifest(pipe, s.name)) is not None}
    if manifests and not resume:
        raise UserError(
            f"pipeline {pipe.name} has stages recorded under {redact(pipe.folder)} ({', '.join(manifests)}): "
            f"continue it with --resume, or give the pipeline another name"
        )
    for stage in pipe.stages:
        if stage.name in manifests:
            _check_inputs(stage, manifests[stage.name], stage_inputs(stage_experiment(pipe, stage, manifests[stage.name].get("upstream_checkpoint"))))
    return manifests


def _check_inputs(stage: StageConfig, manifest: dict[str, Any], inputs: dict[str, str], upstream_sha: str | None = None) -> None:
    diff = _difference(manifest["inputs"], inputs)
    if upstream_sha is not None and manifest.get("upstream_sha256") != upstream_sha:
        diff.append(f"upstream checkpoint sha256: {str(manifest.get('upstream_sha256'))[:12]} -> {upstream_sha[:12]}")
    if diff:
        raise UserError(f"stage {stage.name}: its inputs changed since it ran ({'; '.join(diff)}); refusing to resume it")


def run_pipeline(path: str | Path, resume: bool = False, tracking_uri: str | None = None, address: str | None = None) -> PipelineOutcome:
    """Run (or, with ``resume``, continue) the pipeline in the file at ``path``."""
    from .data import check_image_folder
    from .tracking import Tracker, check_reachable, resolve_uri

    pipe = load_pipeline(path)
    if tracking_uri:
        pipe = replace(pipe, tracking=replace(pipe.tracking, uri=tracking_uri))
    uri = resolve_uri(pipe.tracking.uri)
    pipe = replace(pipe, tracking=replace(pipe.tracking, uri=uri))
    check_reachable(uri)
    for stage in pipe.stages:
        check_image_folder(stage_experiment(pipe, stage).data.path)
    manifests = _check_resume(pipe, resume)
    tracker = Tracker(uri, pipe.tracking.experiment)
    parent = None  # the pipeline's run, reopened (and Ray started) once a stage has to run
    ran, skipped = [], []
    with contextlib.ExitStack() as stack:
        for stage in pipe.stages:
            upstream = manifests[stage.from_] if stage.from_ else None
            up_uri = (upstream["checkpoint"] if stage.kind == "train" else upstream.get("backbone")) if upstream else None
            exp = stage_experiment(pipe, stage, up_uri)
            inputs = stage_inputs(exp)
            up_sha = upstream["sha256"] if upstream else None
            ident = identity(inputs, up_sha)
            previous = manifests.get(stage.name)
            if previous is not None:
                _check_inputs(stage, previous, inputs, up_sha)
                if previous["status"] == "finished":
                    _logger.info("stage %s finished earlier (checkpoint %s): skipped", stage.name, redact(previous.get("checkpoint") or ""))
                    skipped.append(stage.name)
                    continue
            if parent is None:
                from .sweep import init_ray

                init_ray(address)
                parent = _pipeline_run(tracker, pipe, manifests)
                stack.enter_context(tracker.ending(parent))
            manifests[stage.name] = _run_stage(pipe, stage, exp, tracker, parent, previous, inputs, ident, up_uri, up_sha)
            ran.append(stage.name)
    if parent is None:  # every stage had finished earlier: no Ray started, nothing recorded
        parent = next((m["pipeline_run_id"] for m in manifests.values() if m.get("pipeline_run_id")), "")
    return PipelineOutcome(pipe.name, parent, ran, skipped, manifests)


def _pipeline_run(tracker, pipe: PipelineConfig, manifests: dict) -> str:
    runs = tracker.search_runs(f"tags.`{ROLE_TAG}` = 'pipeline' AND tags.`{PIPELINE_TAG}` = '{pipe.name}'", [tracker.experiment_id()])
    if runs and manifests:
        tracker.reopen(runs[0].info.run_id)
        return runs[0].info.run_id
    stages = [{"name": s.name, "kind": s.kind, "config": s.config, "from": s.from_, "set": s.set} for s in pipe.stages]
    return tracker.start_run(
        pipe.name, params={"pipeline.stages": json.dumps(stages), "pipeline.storage_path": pipe.folder},
        tags={ROLE_TAG: "pipeline", PIPELINE_TAG: pipe.name, "prunetune.storage_path": redact(pipe.folder)},
    )


def _run_stage(pipe, stage, exp, tracker, parent, previous, inputs, ident, up_uri, up_sha) -> dict[str, Any]:
    run_id = previous.get("mlflow_run_id") if previous else None
    if run_id:
        tracker.reopen(run_id)
    elif stage.kind == "train":
        run_id = tracker.start_run(
            stage.name, params=to_flat_dict(exp),
            tags={ROLE_TAG: "stage", PIPELINE_TAG: pipe.name, STAGE_TAG: stage.name, "method": exp.method, "backbone": exp.model.name},
            parent_id=parent,
        )
    manifest = {
        "pipeline": pipe.name, "stage": stage.name, "kind": stage.kind, "status": "running", "identity": ident,
        "inputs": inputs, "from": stage.from_, "upstream_checkpoint": up_uri, "upstream_sha256": up_sha,
        "method": exp.method, "backbone": exp.model.name, "mlflow_run_id": run_id, "pipeline_run_id": parent,
        "started": (previous or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_manifest(pipe, manifest)
    _logger.info("stage %s (%s)%s", stage.name, stage.kind, " resumed" if previous else "")
    if stage.kind == "train":
        with tracker.ending(run_id):
            manifest.update(_train_stage(pipe, stage, exp, tracker, run_id))
    else:
        manifest.update(_sweep_stage(pipe, stage, exp, tracker, parent, resume=previous is not None))
    manifest.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_manifest(pipe, manifest)
    if manifest.get("mlflow_run_id"):
        tracker.set_tags(manifest["mlflow_run_id"], {"prunetune.stage_identity": ident, **({"checkpoint_uri": manifest["checkpoint"]} if manifest.get("checkpoint") else {})})
    return manifest


def _train_stage(pipe: PipelineConfig, stage: StageConfig, exp: ExperimentConfig, tracker, run_id: str) -> dict[str, Any]:
    """One Ray Train run named after the stage under the pipeline's folder: a rerun of an unfinished
    stage finds its checkpoints there and resumes from the newest good one."""
    import torch

    from . import loop
    from .driver import MlflowReportCallback, make_trainer
    from .outbox import Outbox, outbox_path

    outbox = Outbox(tracker, run_id, outbox_path(loop.cache_dir(exp), run_id))
    outbox.flush()  # what an earlier attempt of this stage could not send
    trainer = make_trainer(exp, "trial", stage.name, pipe.folder, callbacks=[MlflowReportCallback(outbox)])
    with outbox.delivering():  # what the controller queues
        result = trainer.fit()
    if result.checkpoint is not None:
        folder = storage.join(pipe.folder, stage.name, Path(result.checkpoint.path).name)
    else:  # resumed after its last epoch: nothing new was reported
        found = checkpoints.latest_good(storage.join(pipe.folder, stage.name))
        if found is None:
            raise UserError(f"stage {stage.name}: training ended without a checkpoint under {redact(pipe.folder)}")
        folder = found.folder
    path, manifest = checkpoints.verify(folder)
    out: dict[str, Any] = {
        "checkpoint": folder, "sha256": manifest["sha256"] if manifest else checkpoints.sha256_file(path),
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }
    if exp.method == "dense":  # a sweep stage starts its trials from this backbone (timm keys)
        state = checkpoints.load_file(path)
        with tempfile.TemporaryDirectory() as d:
            local = Path(d) / "backbone.pt"
            torch.save({"model": {k.removeprefix("vit."): v for k, v in state["model"].items()}}, local)
            out["backbone"] = storage.upload(local, storage.join(pipe.folder, stage.name, "backbone.pt"))
    return out


def _sweep_stage(pipe: PipelineConfig, stage: StageConfig, exp: ExperimentConfig, tracker, parent: str, resume: bool) -> dict[str, Any]:
    from ray import tune

    from .search_space import load_sweep_space
    from .sweep import run_sweep

    name = f"{pipe.name}-{stage.name}"
    space = load_sweep_space(exp, base=Path(pipe.base, stage.config).resolve().parent)
    earlier = tracker.find_sweep_run(name)
    if earlier is not None and earlier.info.status == "FINISHED":
        outcome_run, front = earlier.info.run_id, None  # it finished, the manifest was not written yet
    else:
        resumable = resume and earlier is not None and tune.Tuner.can_restore(storage.join(exp.storage_path, name))
        outcome = run_sweep(exp, space, name=name, resume=resumable)
        if outcome.interrupted:
            raise UserError(f"stage {stage.name}: the sweep was interrupted; continue with prunetune pipeline --resume")
        outcome_run, front = outcome.parent_run_id, len(outcome.front)
    tracker.set_tags(outcome_run, {PARENT_TAG: parent, PIPELINE_TAG: pipe.name, STAGE_TAG: stage.name})  # nested under the pipeline run
    return {"mlflow_run_id": outcome_run, "sweep": name, "checkpoint": None, "sha256": None, "front_size": front}
