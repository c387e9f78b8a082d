"""``prunetune pareto ... --register NAME``: a chosen run's model in the MLflow Model Registry.

The run is rebuilt from what MLflow recorded: its flat config (params) gives the method, its
settings and the backbone; its last checkpoint (tag ``checkpoint_uri``, under the sweep's storage
path) gives the weights; a run that trained nothing (``train.epochs: 0``) is the method on the dense
weights it was given (``model.pretrained``); a method fitted after training (``needs_calibration``)
is calibrated again on the same held-out images. What is logged is the network inference runs
(``methods.export.inference_module``: eval mode, logits out), under the trial's own run, with a
signature and an input example from two real validation images, as ``torch.export``'s ``pt2``
(self-contained: loading needs torch alone) where the model exports, else pickled (loading then
needs prunetune's ``methods`` installed and ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``). The new
version carries the run's measured metrics as tags (and linked to the logged model), the device
they were measured on, the method, backbone, searched parameters and source run.

Registering needs a database-backed store (sqlite, PostgreSQL, ...) or a tracking server; MLflow's
file store has no registry (``tracking.check_reachable`` refuses it first).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from methods import CheckpointError, create_backbone, get_method, load_backbone_weights
from methods.checkpoint import load_method_checkpoint
from methods.export import inference_module

from . import loop, storage
from .config import ConfigError, ExperimentConfig, apply_overrides, experiment_from_dict
from .errors import UserError
from .tracking import PARENT_TAG, ROLE_TAG, SEARCHED_TAG, SWEEP_TAG, TRIAL_TAG, Tracker, _FINAL_METRICS, redact

__all__ = ["RegisteredVersion", "choose_run", "run_experiment", "rebuild_model", "register_run"]

_logger = logging.getLogger(__name__)

_STATE_FILE = "state.pt"  # worker.STATE_FILE (not imported: worker pulls in ray.train)
_CONFIG_PREFIXES = ("model.", "data.", "train.", "measure.")
_EXAMPLE_IMAGES = 2  # > 1, so pt2's batch dimension is exported as dynamic


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    serialization: str  # pt2 | pickle

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# ---- which run ------------------------------------------------------------------------------------


def choose_run(rows: Sequence[dict], run: str | None, budget_ms: float | None, within_budget: dict | None) -> dict:
    """The run to register: ``run`` (a run id, or an unambiguous prefix of 8+ characters, among the
    finished runs compared), else the ``--budget-ms`` answer.

    Raises:
        UserError: neither given, both given, no run within the budget, or ``run`` not among them.
    """
    if run and budget_ms is not None:
        raise UserError("--register: choose the run either with --run RUN_ID or with --budget-ms X, not both")
    if run:
        finished = [r for r in rows if r.get("status") == "FINISHED"]
        matches = [r for r in finished if r["run_id"] == run] or ([r for r in finished if r["run_id"].startswith(run)] if len(run) >= 8 else [])
        if len(matches) != 1:
            what = "matches several runs" if matches else "is not a finished run of the sweeps compared (see the front above, or --format json)"
            raise UserError(f"--run {run}: {what}")
        return matches[0]
    if budget_ms is None:
        raise UserError("--register needs the run to register: --run RUN_ID (e.g. one of the front), or --budget-ms X (the most accurate run within X ms)")
    if within_budget is None:
        raise UserError(f"--register: no finished run is within {budget_ms:g} ms, nothing to register")
    return within_budget


# ---- the model, rebuilt from the run ---------------------------------------------------------------


def _value(text: str) -> Any:
    """A param as MLflow holds it (``str(value)``, JSON for lists) back to a YAML-like value."""
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def run_experiment(params: dict[str, str]) -> ExperimentConfig:
    """The typed config of a recorded run, from its flat params (method settings, model, data, train, measure)."""
    if "method" not in params:
        raise UserError("the run records no method (is it a prunetune trial?)")
    exp = experiment_from_dict({"method": params["method"]}, where="the run's params")
    known = set(exp.method_config.field_names())
    flat = {k: _value(v) for k, v in params.items() if k in known or k == "storage_path" or k.startswith(_CONFIG_PREFIXES)}
    try:
        return apply_overrides(exp, flat)
    except ConfigError as e:
        raise UserError(f"the run's recorded config does not rebuild: {e}") from None


def _checkpoint_file(run, sweep_storage: str | None) -> str | None:
    """The run's last checkpoint (``state.pt``), under the sweep's storage path when that is on S3."""
    tag = run.data.tags.get("checkpoint_uri")
    if not tag:
        return None
    root = sweep_storage or ""
    trial = run.data.tags.get(TRIAL_TAG)
    if storage.is_s3(root) and trial:  # Ray records the path without its s3:// scheme
        return storage.join(root, f"trial_{trial}", Path(tag).name, _STATE_FILE)
    return storage.join(tag, _STATE_FILE)


def rebuild_model(run, sweep_storage: str | None = None, device: str = "cpu") -> tuple[torch.nn.Module, ExperimentConfig, int]:
    """The run's deployable network (``methods.export.inference_module``), its config and image size.

    ``sweep_storage``: the sweep's storage path (its parent's ``prunetune.storage_path`` tag).

    Raises:
        UserError: no weights recorded for it, or they do not fit the recorded config.
    """
    exp = run_experiment(run.data.params)
    method = get_method(exp.method)
    dev = torch.device(device)
    base = create_backbone(replace(exp.model, pretrained=None))
    checkpoint = _checkpoint_file(run, sweep_storage)
    try:
        if checkpoint is None and exp.model.pretrained:  # trained nothing: the method on the given dense weights
            load_backbone_weights(base, storage.fetch(exp.model.pretrained))
        elif checkpoint is None:
            raise UserError(f"run {run.info.run_id} records no checkpoint and no dense weights: nothing to register")
        cfg = method.resolve(exp.method_config, copy.deepcopy(base), dev, loop.cache_dir(exp))  # may time the backbone
        model = method.build_model(cfg, base)
        if checkpoint is not None:
            load_method_checkpoint(method, cfg, model, storage.fetch(checkpoint), "prunetune")
    except CheckpointError as e:
        raise UserError(str(e)) from None
    model.to(dev).eval()
    if method.needs_calibration:  # fitted after the last checkpoint: fitted again on the same held-out images
        from torch.utils.data import DataLoader

        from .data import build_calibration_datasets

        _, held_out, _ = build_calibration_datasets(exp.data, base.patch_embed.img_size[0], exp.train.seed)
        method.calibrate(model, cfg, DataLoader(held_out, batch_size=exp.train.batch_size), dev)
    return inference_module(method, model, cfg), exp, base.patch_embed.img_size[0]


def example_images(exp: ExperimentConfig, img: int, n: int = _EXAMPLE_IMAGES) -> torch.Tensor:
    """``n`` validation images ``[n, 3, img, img]`` float32 as the model sees them (random ones when the data is gone)."""
    try:
        from .data import build_val_dataset

        ds = build_val_dataset(exp.data, img)
        return torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).float()
    except Exception as e:  # the data folder may be gone by now; only the shape matters for the signature
        _logger.warning("no validation images at %r (%s): the input example is random", exp.data.path, type(e).__name__)
        return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(0))


# ---- MLflow ----------------------------------------------------------------------------------------------


@contextmanager
def _mlflow_at(uri: str) -> Iterator[Any]:
    """MLflow's fluent API pointed at ``uri`` for the block (``log_model`` has no client form), then
    exactly as before: ``set_*_uri`` also export ``MLFLOW_*_URI``, and setting back the resolved
    default would pin it, so the module globals and the environment are restored as they were."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "torchvision", "timm", "numpy"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


def version_tags(run, exp: ExperimentConfig) -> dict[str, str]:
    """What a deployment needs to know of a version: measured metrics, device, method, backbone, source."""
    tags = run.data.tags
    metrics = {k: v for k, v in run.data.metrics.items() if k in _FINAL_METRICS or k in ("params_m",)}
    searched = [s for s in (tags.get(SEARCHED_TAG) or "").split(",") if s]
    out = {
        "device": tags.get("device", ""), "method": exp.method, "backbone": exp.model.name,
        "source_run_id": run.info.run_id, "sweep": tags.get(SWEEP_TAG, ""), "sweep_run_id": tags.get(PARENT_TAG, ""),
        "role": tags.get(ROLE_TAG, ""), "num_classes": str(exp.model.num_classes or ""),
        "params": json.dumps({k: run.data.params[k] for k in searched if k in run.data.params}, sort_keys=True),
        **{k: f"{v:.6g}" for k, v in sorted(metrics.items()) if math.isfinite(v)},
    }
    return {k: redact(v) for k, v in out.items() if v != ""}


def _description(run, exp: ExperimentConfig) -> str:
    m, device = run.data.metrics, run.data.tags.get("device", "an unrecorded device")
    parts = [f"{exp.method} on {exp.model.name} from run {run.info.run_id}"]
    if "val_top1" in m and "latency_ms" in m:
        parts.append(f"val_top1 {m['val_top1']:.4g}% at {m['latency_ms']:.4g} ms (batch 1) on {device}")
    if "speedup" in m:
        parts.append(f"{m['speedup']:.3g}x the dense latency")
    return "; ".join(parts)


def register_run(uri: str, run_id: str, name: str) -> RegisteredVersion:
    """Log run ``run_id``'s model under that run and register it as a new version of ``name``."""
    from mlflow.models import infer_signature

    if not name.strip():
        raise UserError("--register needs a model name")
    tracker = Tracker(uri, "")
    run = tracker.get_run(run_id)
    if run.info.status != "FINISHED":
        raise UserError(f"run {run_id} is {run.info.status}: only a finished run has a measured model to register")
    parent = run.data.tags.get(PARENT_TAG)
    sweep_storage = tracker.get_run(parent).data.tags.get("prunetune.storage_path") if parent else None
    module, exp, img = rebuild_model(run, sweep_storage)
    images = example_images(exp, img)
    with torch.inference_mode():
        logits = module(images)
    signature = infer_signature(images.numpy(), logits.numpy())
    step = int(run.data.metrics.get("epoch", 0))  # the final measurement's step: its metrics are linked to the model
    common = dict(
        name="model", run_id=run_id, signature=signature, input_example=images.numpy(), registered_model_name=name,
        pip_requirements=_requirements(), step=step,
    )
    with _mlflow_at(uri) as mlflow:
        try:
            info, fmt = mlflow.pytorch.log_model(module, serialization_format="pt2", **common), "pt2"
        except Exception as e:  # data-dependent control flow (e.g. early exits) does not export; pickle it instead
            _logger.warning("%s does not export with torch.export (%s: %s); logging it pickled", exp.method, type(e).__name__, str(e)[:200])
            info, fmt = mlflow.pytorch.log_model(module, serialization_format="pickle", **common), "pickle"
    version = str(info.registered_model_version)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry of this store, whatever the process default
    shape = f"float32 [N, 3, {img}, {img}] -> logits [N, {logits.shape[1]}]"
    for key, value in {**version_tags(run, exp), "input": shape, "serialization": fmt}.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=_description(run, exp))
    _logger.info("registered run %s as models:/%s/%s (%s)", run_id, name, version, fmt)
    return RegisteredVersion(name, version, run_id, fmt)
