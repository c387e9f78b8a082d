"""MLflow records: a parent run per sweep, a child run per trial, and the sweep's Pareto front.

The MLflow adapter: with ``orchestrator.registry`` (which logs and registers models) the only
modules that import mlflow. It talks through ``MlflowClient(uri)`` (no process-global active run),
so the sweep driver, Tune trial actors and Ray Train's controller can each log to the same runs by
id. Param values and URIs pass through ``redact`` first: credentials never reach MLflow or the logs.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

from .errors import TrackingError
from .pareto import hypervolume, pareto_mask, reference_point

__all__ = [
    "resolve_uri", "redact", "check_reachable", "Tracker", "ROLE_TAG", "TRIAL_TAG", "PARETO_TAG", "REFERENCE_ROLE",
    "HV_REFERENCE_TAG", "HYPERVOLUME_METRIC",
]

_logger = logging.getLogger(__name__)

ROLE_TAG = "prunetune.role"  # sweep | trial | reference | pretrain
REFERENCE_ROLE = "reference"  # the dense backbone, evaluated and measured in every sweep
TRIAL_TAG = "prunetune.trial_id"
SWEEP_TAG = "prunetune.sweep"
SEARCHED_TAG = "prunetune.searched_params"
OBJECTIVES_TAG = "prunetune.objectives"
PARENT_TAG = "mlflow.parentRunId"
PARETO_TAG = "pareto"
STOPPED_EARLY_TAG = "prunetune.stopped_early"  # a trial ASHA stopped
INTERRUPTED_TAG = "prunetune.interrupted"  # a sweep, or a trial, cut short by an interrupt
HV_REFERENCE_TAG = "prunetune.hv_reference"  # a sweep's hypervolume reference point, JSON {metric: value}
HYPERVOLUME_METRIC = "hypervolume"  # a sweep's front's hypervolume, step = trials finished so far
_CREDENTIALS = re.compile(r"(://[^/:@\s]*:)[^@/\s]+@")  # the user may be empty: redis://:pw@host
_SECRET_KEYS = re.compile(r"(password|secret|credential|access_key|api_key|auth_token)", re.IGNORECASE)
_MAX_PARAM_LEN = 6000


def redact(text: str) -> str:
    """Hide the password of any ``scheme://user:password@host`` inside ``text``."""
    return _CREDENTIALS.sub(r"\1***@", text)


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use everywhere: ``uri``, else MLflow's default, with sqlite paths made absolute.

    Ray workers run in other directories, so a relative ``sqlite:///mlflow.db`` must be pinned to
    the directory the user ran prunetune from.
    """
    import mlflow

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, if the tracking store at ``uri`` cannot be used.

    Raises:
        TrackingError: an unreachable or unhealthy server, or a sqlite file in a missing folder.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            raise TrackingError(f"tracking server {redact(uri)!r} is unreachable ({type(e).__name__})") from None
        if response.status_code != 200:
            raise TrackingError(f"tracking server {redact(uri)!r} answered HTTP {response.status_code} on /health")
        return
    if scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingError(f"tracking URI {redact(uri)!r}: folder {str(folder)!r} does not exist")
        return
    if scheme in ("", "file"):
        raise TrackingError(f"tracking URI {redact(uri)!r}: MLflow 3 needs a database or server URI, e.g. sqlite:///mlflow.db")
    try:  # postgresql://, mysql://, databricks ...
        _client(uri).search_experiments(max_results=1)
    except Exception as e:
        raise TrackingError(f"tracking store {redact(uri)!r} is unreachable ({type(e).__name__})") from None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database (``mlartifacts/``), not in the working
    directory; servers and other stores keep their own default."""
    if urlparse(uri).scheme != "sqlite":
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()


def param_value(key: str, value: Any) -> str:
    text = "***" if _SECRET_KEYS.search(key) and value else redact(json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value))
    return text[:_MAX_PARAM_LEN]


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Tracker:
    """MLflow access for one experiment (picklable: holds only the URI and the experiment name)."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.experiment = experiment

    @property
    def client(self):
        return _client(self.uri)

    def experiment_id(self, create: bool = True) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        if not create:
            raise TrackingError(f"experiment {self.experiment!r} not found in tracking store {redact(self.uri)!r}")
        return self.client.create_experiment(self.experiment, artifact_location=_artifact_location(self.uri))

    # ---- runs -------------------------------------------------------------------------------------

    def start_run(self, name: str, params: dict[str, Any], tags: dict[str, str], parent_id: str | None = None) -> str:
        """Create a run with ``params`` and ``tags`` (nested under ``parent_id`` if given); returns its id."""
        tags = dict(tags)
        if parent_id:
            tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id(), run_name=name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def find_sweep_run(self, name: str):
        """The parent run of the sweep named ``name``, or None."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return None
        runs = self.client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep' AND tags.`{SWEEP_TAG}` = '{name}'", max_results=1,
        )
        return runs[0] if runs else None

    def reopen(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed sweep or trial), dropping its interrupted tag."""
        client = self.client
        client.update_run(run_id, status="RUNNING")
        if INTERRUPTED_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, INTERRUPTED_TAG)

    def find_trial_run(self, parent_id: str, trial_id: str) -> str | None:
        """The child run of a trial already started once (a restarted trial keeps its run)."""
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' AND tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_value(k, v)) for k, v in sorted(params.items())]
        for chunk in _chunks(items, 100):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0, timestamp_ms: int | None = None) -> None:
        """Numeric ``metrics`` at ``step``, timestamped now (or ``timestamp_ms``: a delayed record keeps its time)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        items = [
            Metric(k, float(v), now, step) for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for chunk in _chunks(items, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def log_tables(self, run_id: str, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Each table as ``<name>.csv`` and a plot of its first column against its second (``<name>.png``)."""
        for name, rows in tables.items():
            if not rows:
                continue
            columns = list(dict.fromkeys(k for row in rows for k in row))
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
            self.client.log_text(run_id, buf.getvalue(), f"{name}.csv")
            if len(columns) >= 2:
                self.client.log_figure(run_id, _table_figure(name, rows, columns[0], columns[1]), f"{name}.png")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which ``key`` was logged on ``run_id``."""
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def ending(self, run_id: str, left_to_others: Callable[[], bool] | None = None) -> Iterator[None]:
        """End ``run_id`` FINISHED when the block completes, FAILED (and re-raise) if it does not;
        left as it is (and re-raised) when ``left_to_others()`` says whoever cut the block short ends the run."""
        try:
            yield
        except BaseException:
            if left_to_others is None or not left_to_others():
                self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")

    def children(self, parent_id: str) -> list:
        return self.search_runs(f"tags.`{PARENT_TAG}` = '{parent_id}'", [self.experiment_id()])

    def search_runs(
        self, filter_string: str = "", experiment_ids: Sequence[str] | None = None, order_by: list[str] | None = None,
        deleted: bool = False,
    ) -> list:
        """Every run matching ``filter_string`` in ``experiment_ids`` (default: this experiment), read
        in pages of 1000 (one query per page, never one per run); ``deleted``: the deleted runs only."""
        from mlflow.entities import ViewType

        ids = list(experiment_ids) if experiment_ids is not None else [self.experiment_id(create=False)]
        if not ids:
            return []
        client, runs, token = self.client, [], None
        view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
        while True:
            page = client.search_runs(
                ids, filter_string=filter_string, run_view_type=view, max_results=1000, order_by=order_by, page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def experiment_created(self, experiment_id: str) -> int | None:
        """The experiment's creation time (ms): with the id, what tells a re-created store's experiment apart."""
        return self.client.get_experiment(experiment_id).creation_time

    def get_run(self, run_id: str):
        """One run by id (a TrackingError, in one line, if there is none)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            what = "not found" if e.error_code == "RESOURCE_DOES_NOT_EXIST" else f"could not be read ({e.error_code})"
            raise TrackingError(f"run {run_id!r} {what} in tracking store {redact(self.uri)!r}") from None

    # ---- the Pareto front ---------------------------------------------------------------------------

    def finalize_sweep(
        self, parent_id: str, objectives: Sequence[tuple[str, str]], status: str = "FINISHED",
        errored: set[str] | None = None, stopped: set[str] | None = None, reference: dict[str, float] | None = None,
    ) -> list[dict]:
        """Tag every trial ``pareto`` true/false, attach the front (table + plot) to the parent, log
        the front's ``hypervolume`` (step = trials finished; reference: ``reference``, else
        ``hv_reference``), end it.

        Trials that did not finish are ended by what the sweep knows of them, whatever their driver
        managed to record: stopped by the scheduler (``stopped``) -> KILLED, tagged
        ``prunetune.stopped_early``; failed (``errored``, Tune's failed trial ids) -> FAILED; anything
        else was cut short by the sweep's end or interruption -> KILLED, tagged ``prunetune.interrupted``.
        Such trials have no final measurement and so are never on the front.
        """
        children = self.children(parent_id)
        trials = [r for r in children if r.data.tags.get(ROLE_TAG) == "trial"]
        for r in trials:
            if r.info.status != "FINISHED":
                self._end_unfinished_trial(r, errored or set(), stopped or set())
        # The dense backbone, measured beside the trials, competes on the front like any trial.
        runs = trials + [r for r in children if r.data.tags.get(ROLE_TAG) == REFERENCE_ROLE]
        mask = pareto_mask([r.data.metrics if r.info.status == "FINISHED" else {} for r in runs], objectives)
        for r, on_front in zip(runs, mask):
            self.set_tags(r.info.run_id, {PARETO_TAG: "true" if on_front else "false"})
        searched = (self.client.get_run(parent_id).data.tags.get(SEARCHED_TAG) or "").split(",")
        rows = [_row(r, searched) for r, on in zip(runs, mask) if on]
        rows.sort(key=lambda row: row["metrics"].get(objectives[-1][0], 0.0))
        all_rows = [_row(r, searched) for r in runs]
        self._log_front_artifacts(parent_id, rows, all_rows, objectives)
        best = [r["metrics"].get("val_top1") for r in rows if r["metrics"].get("val_top1") is not None]
        summary = {"pareto_size": len(rows), "trials": len(trials), "trials_finished": sum(r.info.status == "FINISHED" for r in trials)}
        if best:
            summary["best_val_top1"] = max(best)
        self.log_metrics(parent_id, summary)
        reference = dict(reference) if reference else self.hv_reference(parent_id, objectives, children=children)
        if len(reference) == len(objectives):  # the front's hypervolume: the last point of the sweep's curve
            value = hypervolume([r.data.metrics for r, on in zip(runs, mask) if on], objectives, reference)
            self.log_metrics(parent_id, {HYPERVOLUME_METRIC: value}, step=summary["trials_finished"])
        self.end_run(parent_id, status)
        return rows

    def hv_reference(
        self, parent_id: str, objectives: Sequence[tuple[str, str]], trials: Sequence[dict] = (), children: list | None = None,
    ) -> dict[str, float]:
        """The sweep's hypervolume reference point (``orchestrator.pareto.reference_point``), recorded
        on its parent run (tag ``prunetune.hv_reference``) once every objective has a value.

        The recorded point wins, so a sweep's curve keeps one reference; else chance accuracy from the
        parent's ``model.num_classes`` and the dense model's cost from the sweep's reference run,
        or from what finished trials recorded (``dense_latency_ms``, ...: the children's and
        ``trials``, final results not yet in MLflow). Objectives without a value are left out.
        """
        parent = self.client.get_run(parent_id)
        recorded = _json_dict(parent.data.tags.get(HV_REFERENCE_TAG))
        metrics = [m for m, _ in objectives]
        if all(m in recorded for m in metrics):
            return {m: float(recorded[m]) for m in metrics}
        children = self.children(parent_id) if children is None else children
        finished = [r for r in children if r.info.status == "FINISHED"]
        ref_run = next((r.data.metrics for r in finished if r.data.tags.get(ROLE_TAG) == REFERENCE_ROLE), None)
        point = reference_point(
            objectives, recorded=recorded, num_classes=parent.data.params.get("model.num_classes"), reference_run=ref_run,
            trials=[r.data.metrics for r in finished if r.data.tags.get(ROLE_TAG) == "trial"] + list(trials),
        )
        if len(point) == len(objectives):
            self.set_tags(parent_id, {HV_REFERENCE_TAG: json.dumps(point, sort_keys=True)})
        return point

    def end_stopped_early(self, run_id: str) -> None:
        """End a trial the scheduler stopped: KILLED, tagged ``prunetune.stopped_early``."""
        self.end_run(run_id, "KILLED")
        self.set_tags(run_id, {STOPPED_EARLY_TAG: "true"})

    def _end_unfinished_trial(self, run, errored: set[str], stopped: set[str]) -> None:
        trial_id, run_id = run.data.tags.get(TRIAL_TAG), run.info.run_id
        if trial_id in stopped or run.data.tags.get(STOPPED_EARLY_TAG) == "true":  # now, or before a resume
            self.end_stopped_early(run_id)
        elif trial_id in errored:
            if run.info.status != "FAILED":  # its driver died before it could say so
                self.end_run(run_id, "FAILED")
        else:
            self.end_run(run_id, "KILLED")
            self.set_tags(run_id, {INTERRUPTED_TAG: "true"})

    def _log_front_artifacts(self, parent_id: str, rows: list[dict], all_rows: list[dict], objectives) -> None:
        table = [{"run_id": r["run_id"], "run_name": r["run_name"], **r["params"], **r["metrics"]} for r in rows]
        if table:
            self.client.log_table(parent_id, data=_columns(table), artifact_file="pareto_front.json")
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(_columns(table)))
            writer.writeheader()
            writer.writerows(table)
            self.client.log_text(parent_id, buf.getvalue(), "pareto_front.csv")
        self.client.log_figure(parent_id, _front_figure(rows, all_rows, objectives), "pareto_front.png")

    def latest_sweep(self, sweep_run_id: str | None = None):
        """The sweep parent run ``sweep_run_id``, or the experiment's most recent one."""
        exp_id = self.experiment_id(create=False)
        if sweep_run_id:
            return self.client.get_run(sweep_run_id)
        runs = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1, order_by=["attributes.start_time DESC"]
        )
        if not runs:
            raise TrackingError(f"experiment {self.experiment!r} has no prunetune sweep")
        return runs[0]

    def read_front(self, sweep_run_id: str | None = None) -> tuple[Any, list[dict]]:
        """The sweep's parent run and its Pareto-front rows, read back from MLflow."""
        parent = self.latest_sweep(sweep_run_id)
        searched = (parent.data.tags.get(SEARCHED_TAG) or "").split(",")
        runs = [r for r in self.children(parent.info.run_id) if r.data.tags.get(PARETO_TAG) == "true"]
        objectives = json.loads(parent.data.tags.get(OBJECTIVES_TAG) or "[]")
        rows = [_row(r, searched) for r in runs]
        if objectives:
            rows.sort(key=lambda row: row["metrics"].get(objectives[-1][0], 0.0))
        return parent, rows


def _json_dict(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


_FINAL_METRICS = (
    "val_top1", "val_top5", "latency_ms", "throughput_ips", "dense_latency_ms", "dense_throughput_ips",
    "speedup", "throughput_ratio", "gflops", "dense_gflops",
)


def _row(run, searched: list[str], all_metrics: bool = False) -> dict:
    """A run as a plain dict: its searched params and its final metrics (every metric's latest value with ``all_metrics``)."""
    own = run.data.tags.get(SEARCHED_TAG)  # a trial of a multi-method sweep: its own method's parameters
    params = {k: run.data.params[k] for k in (own.split(",") if own else searched) if k in run.data.params}
    metrics = dict(run.data.metrics) if all_metrics else {k: run.data.metrics[k] for k in _FINAL_METRICS if k in run.data.metrics}
    return {
        "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
        "method": run.data.tags.get("method", ""), "role": run.data.tags.get(ROLE_TAG, ""), "params": params, "metrics": metrics,
    }


def _columns(table: list[dict]) -> dict[str, list]:
    keys = list(dict.fromkeys(k for row in table for k in row))
    return {k: [row.get(k) for row in table] for k in keys}


_AXIS_LABELS = {
    "val_top1": "val top-1 (%)", "val_top5": "val top-5 (%)", "latency_ms": "latency (ms, batch 1)",
    "throughput_ips": "throughput (images/s)", "speedup": "latency speed-up vs dense", "gflops": "GFLOPs (MACs)",
    "throughput_ratio": "throughput vs dense",
}
_DENSE_METRIC = {"latency_ms": "dense_latency_ms", "throughput_ips": "dense_throughput_ips", "gflops": "dense_gflops"}


def _front_figure(front: list[dict], everything: list[dict], objectives):
    """Accuracy against the sweep's cost objective (latency by default): every finished trial grey,
    the front in red, the dense baseline's figure as a dashed line."""
    from matplotlib.figure import Figure

    metrics = [m for m, _ in objectives]
    y_key = "val_top1" if "val_top1" in metrics or len(metrics) < 2 else metrics[0]
    x_key = next((m for m in metrics if m != y_key), "latency_ms")
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()

    def xy(rows):
        return sorted((r["metrics"][x_key], r["metrics"][y_key]) for r in rows if x_key in r["metrics"] and y_key in r["metrics"])

    trials = [r for r in everything if r.get("role") != REFERENCE_ROLE]
    for i, method in enumerate(dict.fromkeys(r.get("method", "") for r in trials)):
        if pts := xy([r for r in trials if r.get("method", "") == method]):
            ax.scatter(*zip(*pts), marker="os^vDP*X"[i % 8], c="lightgray", edgecolors="dimgray", label=f"{method or 'trials'} trials")
    if fr := xy(front):
        ax.plot(*zip(*fr), "-", color="tab:red", label="Pareto front")
        ax.scatter(*zip(*fr), facecolors="none", edgecolors="tab:red", s=90)
    if ref := xy([r for r in everything if r.get("role") == REFERENCE_ROLE]):
        ax.scatter(*zip(*ref), marker="*", s=200, color="tab:blue", label="dense backbone", zorder=3)
    else:
        dense = sorted(r["metrics"][_DENSE_METRIC[x_key]] for r in everything if _DENSE_METRIC.get(x_key) in r["metrics"])
        if dense:
            ax.axvline(dense[len(dense) // 2], color="tab:blue", ls="--", label="dense backbone")
    ax.set_xlabel(_AXIS_LABELS.get(x_key, x_key))
    ax.set_ylabel(_AXIS_LABELS.get(y_key, y_key))
    ax.set_title("objectives: " + ", ".join(f"{m} ({d})" for m, d in objectives))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty sweep has nothing to label
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def _table_figure(name: str, rows: list[dict], x: str, y: str):
    from matplotlib.figure import Figure

    pts = sorted((float(r[x]), float(r[y])) for r in rows if r.get(x) is not None and r.get(y) is not None)
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    if pts:
        ax.plot(*zip(*pts), "o-")
    ax.set_xlabel(_AXIS_LABELS.get(x, x))
    ax.set_ylabel(_AXIS_LABELS.get(y, y))
    ax.set_title(name.replace("_", " "))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
