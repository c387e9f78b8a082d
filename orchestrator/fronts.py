"""Pareto fronts across sweeps, read back from MLflow: what ``prunetune pareto`` computes.

``read_selection`` reads the sweeps and their runs (trials and dense reference runs) of one or
several experiments, or of given sweep runs, with paged ``search_runs`` queries (1000 runs a page;
one query per role, or one per named sweep, never one per run). Everything else is pure functions
over run rows (``tracking._row`` dicts plus ``experiment``, ``sweep``, ``sweep_run_id``,
``backbone``, ``device``): the combined front on any objectives, the most accurate run within a
latency budget, and each sweep's hypervolume against one reference point.

Only runs that finished with every objective measured compete; the others (failed, stopped early,
interrupted) are ignored with one warning. Filters compare run tags: ``method``, ``backbone`` and
``device`` (what rank 0 ran and was measured on, recorded by every trial since this tag exists; a
``device`` filter leaves out, with a warning, older runs that have none). Runs measured on several
kinds of device are refused unless ``mixed_devices`` asks for them, and then the report says so.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import run_cache
from .errors import UserError
from .pareto import METRIC_MODES, hypervolume, nadir, pareto_mask, reference_point
from .tracking import (
    HV_REFERENCE_TAG, OBJECTIVES_TAG, PARENT_TAG, REFERENCE_ROLE, ROLE_TAG, SEARCHED_TAG, SWEEP_TAG, Tracker, _FINAL_METRICS, _json_dict,
    _row,
)

__all__ = [
    "DEFAULT_OBJECTIVES", "SweepInfo", "Selection", "FrontReport", "parse_objective", "parse_reference", "read_selection",
    "resolve_objectives", "usable", "combined_front", "best_within_budget", "common_reference", "compare",
    "format_table", "to_json", "to_csv", "report_csv", "public_row",
]

_logger = logging.getLogger(__name__)

DEFAULT_OBJECTIVES: list[tuple[str, str]] = [("val_top1", "max"), ("latency_ms", "min")]
_ROLES = ("trial", REFERENCE_ROLE)  # what competes on a front: trials and each sweep's dense reference
_ROW_KEYS = ("run_id", "run_name", "experiment", "sweep", "sweep_run_id", "method", "role", "backbone", "device", "status")


@dataclass
class SweepInfo:
    """A sweep's parent run, as the front needs it."""

    run_id: str
    name: str
    experiment: str
    objectives: list[tuple[str, str]] | None  # as recorded (tag prunetune.objectives)
    reference: dict[str, float] = field(default_factory=dict)  # recorded hypervolume reference point
    num_classes: str | None = None
    searched: list[str] = field(default_factory=list)


@dataclass
class Selection:
    sweeps: list[SweepInfo]
    rows: list[dict]  # every trial and reference run of those sweeps that passed the filters
    left_out: dict[str, int] = field(default_factory=dict)  # why runs were filtered out: count per reason


@dataclass
class FrontReport:
    objectives: list[tuple[str, str]]
    front: list[dict]
    sweeps: list[dict]  # per sweep: run_id, name, experiment, runs, finished, on_front, hypervolume
    reference: dict[str, float]
    reference_from: dict[str, str]  # per objective: "sweeps" (chance / dense / recorded), "given", or "nadir"
    hypervolume: float | None
    ignored: list[dict]  # runs that cannot compete (not finished, or an objective missing)
    budget_ms: float | None = None
    within_budget: dict | None = None
    experiments: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # the kinds of device the runs were measured on


# ---- arguments -------------------------------------------------------------------------------------


def parse_objective(text: str) -> tuple[str, str]:
    """``"metric:max"`` or ``"metric:min"``; a bare known metric (``latency_ms``) takes its usual direction."""
    metric, _, mode = text.partition(":")
    metric, mode = metric.strip(), mode.strip().lower()
    if not mode and metric in METRIC_MODES:
        mode = METRIC_MODES[metric]
    if not metric or mode not in ("max", "min"):
        raise UserError(f"--objective {text!r}: expected METRIC:max or METRIC:min (e.g. val_top1:max, latency_ms:min)")
    return metric, mode


def parse_reference(items: Sequence[str] | None) -> dict[str, float]:
    """``["val_top1=10", "latency_ms=4.2"]`` -> ``{"val_top1": 10.0, "latency_ms": 4.2}``."""
    out = {}
    for item in items or ():
        metric, sep, value = item.partition("=")
        try:
            out[metric.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not metric.strip() or not math.isfinite(out.get(metric.strip(), math.nan)):
            raise UserError(f"--reference {item!r}: expected METRIC=NUMBER (e.g. latency_ms=4.2)")
    return out


# ---- reading MLflow ----------------------------------------------------------------------------------


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _tag_filter(role: str, method: Sequence[str], backbone: Sequence[str]) -> str:
    """The MLflow filter for one role, with a single-valued method or backbone filter pushed down
    (several values are filtered here, MLflow has no IN for tags; so is the device, to count the
    runs that record none)."""
    parts = [f"tags.`{ROLE_TAG}` = '{role}'"]
    for tag, values in (("method", method), ("backbone", backbone)):
        if len(values) == 1:
            parts.append(f"tags.`{tag}` = '{_quote(values[0])}'")
    return " AND ".join(parts)


def _sweep_info(run, experiment: str) -> SweepInfo:
    tags, params = run.data.tags, run.data.params
    recorded = None
    try:
        recorded = [(str(m), str(d)) for m, d in json.loads(tags[OBJECTIVES_TAG])] if tags.get(OBJECTIVES_TAG) else None
    except (ValueError, TypeError):
        recorded = None
    return SweepInfo(
        run_id=run.info.run_id, name=run.info.run_name or tags.get(SWEEP_TAG, ""), experiment=experiment, objectives=recorded or None,
        reference={k: float(v) for k, v in _json_dict(tags.get(HV_REFERENCE_TAG)).items() if isinstance(v, numbers.Real)},
        num_classes=params.get("model.num_classes"), searched=[s for s in (tags.get(SEARCHED_TAG) or "").split(",") if s],
    )


def _search(tracker: Tracker, filter_string: str, experiment_ids: Sequence[str], cache: Path | None, refresh: bool = False) -> list:
    """``tracker.search_runs``, or through the on-disk cache of ended runs (``orchestrator.run_cache``)."""
    if cache is None:
        return tracker.search_runs(filter_string, experiment_ids)
    records = [r for i in experiment_ids for r in run_cache.search_runs_cached(tracker, i, filter_string, cache, refresh)]
    return [run_cache.as_run(r) for r in run_cache.order(records)]


@run_cache.gc_paused()  # thousands of acyclic rows: collections would only rescan them
def read_selection(
    uri: str, experiments: Sequence[str] = (), sweeps: Sequence[str] = (), method: Sequence[str] = (),
    backbone: Sequence[str] = (), device: Sequence[str] = (), cache: Path | None = None, refresh: bool = False,
) -> Selection:
    """The sweeps and runs to compare: the sweep runs ``sweeps`` if any are given (each must then
    lie in one of ``experiments``, when those are given too), else every sweep of ``experiments``.
    ``cache``: a directory where ended trial and reference runs are kept between reads
    (``orchestrator.run_cache``; the same rows, read again only where they changed; ``refresh``:
    everything read again and cached anew); sweep runs are always read afresh.

    Raises:
        TrackingError/UserError: an unknown experiment or run, a run that is not a sweep, or nothing to compare.
    """
    if not experiments and not sweeps:
        raise UserError("pareto needs --experiment or --sweep")
    exp_ids = {name: Tracker(uri, name).experiment_id(create=False) for name in experiments}
    tracker = Tracker(uri, experiments[0] if experiments else "")
    names = {i: n for n, i in exp_ids.items()}
    infos: dict[str, SweepInfo] = {}
    runs = []
    if sweeps:
        for run_id in dict.fromkeys(sweeps):
            parent = tracker.get_run(run_id)
            if parent.data.tags.get(ROLE_TAG) != "sweep":
                raise UserError(f"--sweep {run_id}: run {parent.info.run_name!r} is not a prunetune sweep (role {parent.data.tags.get(ROLE_TAG)!r})")
            exp_id = parent.info.experiment_id
            if exp_ids and exp_id not in names:
                raise UserError(f"--sweep {run_id}: that sweep is not in experiment {', '.join(map(repr, experiments))}")
            names.setdefault(exp_id, tracker.experiment_name(exp_id))
            infos[run_id] = _sweep_info(parent, names[exp_id])
            runs += _search(tracker, f"tags.`{PARENT_TAG}` = '{_quote(run_id)}'", [exp_id], cache, refresh)
        runs = [r for r in runs if r.data.tags.get(ROLE_TAG) in _ROLES]
    else:
        ids = list(exp_ids.values())
        for parent in tracker.search_runs(f"tags.`{ROLE_TAG}` = 'sweep'", ids, order_by=["attributes.start_time ASC"]):
            infos[parent.info.run_id] = _sweep_info(parent, names[parent.info.experiment_id])
        for role in _ROLES:
            runs += _search(tracker, _tag_filter(role, method, backbone), ids, cache, refresh)
        if not infos and not runs:
            raise UserError(f"experiment {', '.join(map(repr, experiments))} has no prunetune sweep")
    rows, left_out = [], Counter()
    for run in runs:
        tags = run.data.tags
        parent_id = tags.get(PARENT_TAG, "")
        info = infos.get(parent_id)
        row = _row(run, info.searched if info else [], all_metrics=True)
        row.update(
            experiment=names.get(run.info.experiment_id, run.info.experiment_id), experiment_id=run.info.experiment_id,
            sweep=info.name if info else tags.get(SWEEP_TAG, ""),
            sweep_run_id=parent_id, backbone=tags.get("backbone", ""), device=tags.get("device", ""),
        )
        reason = _filtered_out(row, method, backbone, device)
        if reason:
            left_out[reason] += 1
        else:
            rows.append(row)
    if left_out.get("no device tag"):
        _logger.warning(
            "--device %s: %d runs left out because they record no device (trials do not tag one yet)", ",".join(device), left_out["no device tag"],
        )
    return Selection(list(infos.values()), rows, dict(left_out))


def _filtered_out(row: dict, method: Sequence[str], backbone: Sequence[str], device: Sequence[str]) -> str | None:
    if method and row["method"] not in method:
        return "method"
    if backbone and row["backbone"] not in backbone:
        return "backbone"
    if device and not row["device"]:
        return "no device tag"
    if device and row["device"] not in device:
        return "device"
    return None


# ---- pure functions over rows ------------------------------------------------------------------------


def resolve_objectives(sweeps: Sequence[SweepInfo], given: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """``given`` if any; else the objectives the sweeps recorded, when they agree; else val_top1:max, latency_ms:min."""
    if given:
        return list(given)
    recorded = list(dict.fromkeys(tuple(s.objectives) for s in sweeps if s.objectives))
    if len(recorded) == 1:
        return list(recorded[0])
    if len(recorded) > 1:
        _logger.warning(
            "the sweeps recorded different objectives (%s); comparing on %s (choose with --objective)",
            "; ".join(_objectives_text(o) for o in recorded), _objectives_text(DEFAULT_OBJECTIVES),
        )
    return list(DEFAULT_OBJECTIVES)


def _objectives_text(objectives) -> str:
    return ", ".join(f"{m}:{d}" for m, d in objectives)


def _finite(v: Any) -> bool:
    if type(v) is float:  # what MLflow returns: no ABC check (most of a 10,000-run front's time otherwise)
        return math.isfinite(v)
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def usable(rows: Sequence[dict], objectives: Sequence[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """(rows that compete, rows ignored): a run competes when it FINISHED with every objective measured."""
    valid, ignored = [], []
    for r in rows:
        ok = r.get("status", "FINISHED") == "FINISHED" and all(_finite(r["metrics"].get(m)) for m, _ in objectives)
        (valid if ok else ignored).append(r)
    return valid, ignored


def _why(row: dict, objectives) -> str:
    if row.get("status", "FINISHED") != "FINISHED":
        return row["status"]
    return "no " + "/".join(m for m, _ in objectives if not _finite(row["metrics"].get(m)))


def combined_front(rows: Sequence[dict], objectives: Sequence[tuple[str, str]]) -> list[dict]:
    """The rows on the Pareto front of ``objectives`` (only finished rows with every objective
    compete), sorted by the last objective."""
    valid, _ = usable(rows, objectives)
    front = [r for r, on in zip(valid, pareto_mask([r["metrics"] for r in valid], objectives)) if on]
    return sorted(front, key=lambda r: (r["metrics"][objectives[-1][0]], r["run_id"]))


def best_within_budget(
    rows: Sequence[dict], budget: float, accuracy: tuple[str, str] = ("val_top1", "max"), cost: str = "latency_ms",
) -> dict | None:
    """The most accurate finished run whose ``cost`` is at most ``budget`` (ties: the cheaper, then
    the run id); None when no run fits."""
    valid, _ = usable(rows, [accuracy, (cost, "min")])
    fits = [r for r in valid if r["metrics"][cost] <= budget]
    if not fits:
        return None
    sign = 1.0 if accuracy[1] == "max" else -1.0
    return min(fits, key=lambda r: (-sign * r["metrics"][accuracy[0]], r["metrics"][cost], r["run_id"]))


def common_reference(
    sweeps: Sequence[SweepInfo], rows: Sequence[dict], objectives: Sequence[tuple[str, str]], given: dict[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """One hypervolume reference point for every sweep compared, and where each value came from.

    Per objective: ``given`` (``--reference``) if set; else the least favourable of the sweeps' own
    reference values (``orchestrator.pareto.reference_point``: the point a sweep recorded, else
    chance accuracy and its dense model's cost), so no sweep's front is cut off; else (an objective
    with no natural reference, e.g. a reversed mode) the nadir of all competing runs.
    """
    given = given or {}
    per_sweep = []
    groups = _by_sweep(rows)
    for s in sweeps:
        own = groups.get(s.run_id, [])
        finished = [r for r in own if r.get("status") == "FINISHED"]
        ref_run = next((r["metrics"] for r in finished if r.get("role") == REFERENCE_ROLE), None)
        per_sweep.append(reference_point(
            objectives, recorded=s.reference, num_classes=s.num_classes, reference_run=ref_run,
            trials=[r["metrics"] for r in finished if r.get("role") != REFERENCE_ROLE],
        ))
    valid, _ = usable(rows, objectives)
    worst = nadir([r["metrics"] for r in valid], objectives)
    point, source = {}, {}
    for metric, mode in objectives:
        values = [p[metric] for p in per_sweep if metric in p]
        if metric in given:
            point[metric], source[metric] = float(given[metric]), "given"
        elif values:
            point[metric], source[metric] = (min(values) if mode == "max" else max(values)), "sweeps"
        elif metric in worst:
            point[metric], source[metric] = worst[metric], "nadir"
    return point, source


def _by_sweep(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("sweep_run_id", ""), []).append(r)
    return out


def compare(
    selection: Selection, objectives: Sequence[tuple[str, str]] | None = None, budget_ms: float | None = None,
    reference: dict[str, float] | None = None, experiments: Sequence[str] = (), mixed_devices: bool = False,
) -> FrontReport:
    """The combined front of the selection, each sweep's hypervolume (one reference point), and the
    most accurate run within ``budget_ms``; runs that cannot compete are ignored with a warning."""
    objectives = resolve_objectives(selection.sweeps, objectives)
    rows = selection.rows
    devices = sorted({r.get("device") or "" for r in rows} - {""})
    if len(devices) > 1 and not mixed_devices:
        raise UserError(
            f"the runs were measured on {len(devices)} kinds of device ({'; '.join(devices)}): their latencies do not compare; "
            "pick one with --device, or pass --mixed-devices to combine them anyway"
        )
    valid, ignored = usable(rows, objectives)
    if ignored:
        reasons = Counter(_why(r, objectives) for r in ignored)
        _logger.warning(
            "%d of %d runs ignored (not finished, or an objective not measured): %s", len(ignored), len(rows),
            ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())),
        )
    front = combined_front(valid, objectives)
    point, source = common_reference(selection.sweeps, rows, objectives, reference)
    complete = len(point) == len(objectives)
    on_front = Counter(r.get("sweep_run_id", "") for r in front)
    groups = _by_sweep(valid)
    sweeps = []
    for s in selection.sweeps:
        mine = [r for r in rows if r.get("sweep_run_id") == s.run_id]
        sweeps.append({
            "run_id": s.run_id, "name": s.name, "experiment": s.experiment, "runs": len(mine),
            "finished": len(groups.get(s.run_id, [])), "on_front": on_front.get(s.run_id, 0),
            "hypervolume": hypervolume([r["metrics"] for r in groups.get(s.run_id, [])], objectives, point) if complete else None,
        })
    within = None
    if budget_ms is not None:
        within = best_within_budget(rows, budget_ms)
    return FrontReport(
        objectives=list(objectives), front=front, sweeps=sweeps, reference=point, reference_from=source,
        hypervolume=hypervolume([r["metrics"] for r in front], objectives, point) if complete else None,
        ignored=ignored, budget_ms=budget_ms, within_budget=within,
        experiments=list(experiments) or list(dict.fromkeys(s.experiment for s in selection.sweeps)),
        devices=devices,
    )


# ---- output --------------------------------------------------------------------------------------------


def _metric_keys(report: FrontReport) -> list[str]:
    return list(dict.fromkeys([m for m, _ in report.objectives] + list(_FINAL_METRICS)))


def public_row(row: dict, metric_keys: Sequence[str]) -> dict:
    """A row as printed: its identity, searched params and the final metrics (objectives included)."""
    out = {k: row.get(k, "") for k in _ROW_KEYS}
    out["params"] = dict(row.get("params", {}))
    out["metrics"] = {k: row["metrics"][k] for k in metric_keys if k in row.get("metrics", {})}
    return out


def to_json(report: FrontReport) -> dict:
    keys = _metric_keys(report)
    out: dict[str, Any] = {
        "experiments": report.experiments, "objectives": [list(o) for o in report.objectives],
        "reference": report.reference, "reference_from": report.reference_from, "hypervolume": report.hypervolume,
        "sweeps": report.sweeps, "ignored": len(report.ignored), "front": [public_row(r, keys) for r in report.front],
        "devices": report.devices,
    }
    if len(report.experiments) == 1:
        out["experiment"] = report.experiments[0]
    if len(report.sweeps) == 1:
        out["sweep_run_id"], out["sweep"] = report.sweeps[0]["run_id"], report.sweeps[0]["name"]
    if report.budget_ms is not None:
        out["budget"] = {
            "latency_ms": report.budget_ms,
            "run": public_row(report.within_budget, keys) if report.within_budget else None,
        }
    return out


def to_csv(rows: Sequence[dict], metric_keys: Sequence[str]) -> str:
    """Rows as CSV: identity columns, metrics, then the searched params (union over the rows)."""
    flat = []
    for r in rows:
        p = public_row(r, metric_keys)
        flat.append({**{k: p[k] for k in _ROW_KEYS}, **p["metrics"], **{k: v for k, v in p["params"].items() if k not in p["metrics"]}})
    columns = list(_ROW_KEYS) + [k for k in metric_keys if any(k in f for f in flat)]
    columns += list(dict.fromkeys(k for f in flat for k in f if k not in columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def report_csv(report: FrontReport) -> str:
    """The front as CSV; with a budget, only the run that answers it (none: the header alone)."""
    rows = report.front if report.budget_ms is None else [r for r in [report.within_budget] if r]
    return to_csv(rows, _metric_keys(report))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def format_table(report: FrontReport) -> str:
    """Plain text: each sweep and its hypervolume, the combined front, and the budget's answer."""
    out = []
    ref = ", ".join(f"{m} {_fmt(v)} ({report.reference_from.get(m, '')})" for m, v in report.reference.items())
    out.append(f"objectives: {_objectives_text(report.objectives)}; hypervolume reference: {ref or 'none'}")
    if len(report.devices) > 1:
        out.append(f"MIXED DEVICES (asked for): {'; '.join(report.devices)}: latencies across them do not compare")
    if report.sweeps:
        lines = [["sweep", "run_id", "experiment", "runs", "finished", "on front", "hypervolume"]]
        for s in report.sweeps:
            hv = "-" if s["hypervolume"] is None else f"{s['hypervolume']:.6g}"
            lines.append([s["name"], s["run_id"][:8], s["experiment"], str(s["runs"]), str(s["finished"]), str(s["on_front"]), hv])
        out.append(f"sweeps ({len(report.sweeps)}):")
        out.append(_table(lines))
    hv = "-" if report.hypervolume is None else f"{report.hypervolume:.6g}"
    out.append(f"Pareto front ({len(report.front)} runs, hypervolume {hv}):")
    if not report.front:
        out.append("  (empty: no run finished with all objectives measured)")
    else:
        keys = [k for k in _metric_keys(report) if k in ("val_top1", "latency_ms", "speedup", "throughput_ips", "gflops") or k in dict(report.objectives)]
        lines = [["run_id", "sweep", "method"] + keys + ["params"]]
        for r in report.front:
            params = " ".join(f"{k}={_short(v)}" for k, v in r.get("params", {}).items())
            lines.append([r["run_id"][:8], r.get("sweep", ""), r.get("method", "")] + [_fmt(r["metrics"][k]) if k in r["metrics"] else "-" for k in keys] + [params])
        out.append(_table(lines))
    if report.budget_ms is not None:
        b = report.within_budget
        if b is None:
            out.append(f"within {_fmt(report.budget_ms)} ms: no finished run is that fast")
        else:
            m = b["metrics"]
            out.append(
                f"within {_fmt(report.budget_ms)} ms: run {b['run_id']} ({b.get('method', '')}, sweep {b.get('sweep', '')}): "
                f"val_top1 {_fmt(m['val_top1'])}% at {_fmt(m['latency_ms'])} ms"
            )
    return "\n".join(out)


def _short(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)
