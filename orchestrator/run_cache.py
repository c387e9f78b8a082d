"""Ended runs kept on disk, so that reading thousands of runs again asks MLflow only for what changed.

Reading 10,000 runs through ``search_runs`` costs seconds however it is paged: the store builds an
entity (tags, params, latest metrics) for every run. ``prunetune pareto`` reads the same ended runs
again and again, and prunetune never changes what a front reads of a run once that run has ended
(its status, params, metrics and the tags ``method``, ``backbone``, ``device``, role, parent, sweep,
searched params; the tags a sweep sets after ending a trial, ``pareto`` and
``prunetune.stopped_early``, are not read) without first making it RUNNING again (a resumed trial)
and ending it anew. So
``search_runs_cached`` keeps, per tracking store, experiment and filter, the runs it read, and on the
next read asks only for:

* the runs that ended since the previous read (``attributes.end_time >`` its start, less
  ``MARGIN_MS`` for clocks of other hosts and for runs ending while it read);
* the runs not ended (RUNNING, SCHEDULED): always read again, never taken from the cache;
* by id, the runs that were not ended at the previous read (they may have ended without an end
  time) and those deleted then but not now (restored, or purged by ``mlflow gc``);
* the deleted runs (``ViewType.DELETED_ONLY``), which are left out.

A re-created store is told apart by the experiment's creation time, part of the cache's key with
the tracking URI (hashed: it may hold credentials), the experiment id and the filter. What the cache
cannot see is a run ended before a read, then deleted *and* purged (``mlflow gc``) before the next:
``prunetune pareto --refresh`` reads everything again. Files are JSON (never unpickled), written
atomically; an unreadable or foreign file is ignored and rewritten. The directory is
``$PRUNETUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/prunetune/runs``, else ``~/.cache/prunetune/runs``.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .tracking import Tracker

__all__ = ["RunRecord", "default_cache_dir", "run_record", "as_run", "order", "gc_paused", "search_runs_cached", "MARGIN_MS"]

_logger = logging.getLogger(__name__)

_VERSION = 1
MARGIN_MS = 60_000  # runs that ended up to this long before the previous read began are read again
_ENDED = ("FINISHED", "FAILED", "KILLED")
_BY_ID = 100  # run ids per ``attributes.run_id IN (...)`` query

RunRecord = dict  # run_id, run_name, status, experiment_id, start_time, end_time, tags, params, metrics


def default_cache_dir() -> Path:
    if os.environ.get("PRUNETUNE_CACHE_DIR"):
        return Path(os.environ["PRUNETUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prunetune" / "runs"


def run_record(run) -> RunRecord:
    """An MLflow run as plain data: what fronts read of it (every tag, param and latest metric)."""
    info, data = run.info, run.data
    return {
        "run_id": info.run_id, "run_name": info.run_name, "status": info.status, "experiment_id": info.experiment_id,
        "start_time": info.start_time, "end_time": info.end_time,
        "tags": dict(data.tags), "params": dict(data.params), "metrics": dict(data.metrics),
    }


class _Info:
    __slots__ = ("run_id", "run_name", "status", "experiment_id", "start_time", "end_time")

    def __init__(self, r: RunRecord) -> None:
        self.run_id, self.run_name, self.status = r["run_id"], r["run_name"], r["status"]
        self.experiment_id, self.start_time, self.end_time = r["experiment_id"], r["start_time"], r["end_time"]


class _Data:
    __slots__ = ("tags", "params", "metrics")

    def __init__(self, r: RunRecord) -> None:
        self.tags, self.params, self.metrics = r["tags"], r["params"], r["metrics"]


class _Run:
    __slots__ = ("info", "data")

    def __init__(self, r: RunRecord) -> None:
        self.info, self.data = _Info(r), _Data(r)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic collector off while many records are built: they hold no cycles, and a
    collection would scan all of them, again and again (most of a cached read's time otherwise)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def as_run(record: RunRecord) -> _Run:
    """A record shaped like an MLflow ``Run`` (``info.*``, ``data.tags/params/metrics``), for code that reads runs."""
    return _Run(record)


def order(records) -> list[RunRecord]:
    """MLflow's own order for ``search_runs`` without ``order_by``: newest start first, then run id."""
    return sorted(records, key=lambda r: (-(r["start_time"] or 0), r["run_id"]))


def _path(directory: Path, tracker: Tracker, experiment_id: str, filter_string: str, created: int | None) -> Path:
    key = json.dumps([_VERSION, tracker.uri, experiment_id, created, filter_string])
    return directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _load(path: Path, key: dict) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("key") != key or not isinstance(state.get("runs"), dict):
        return None
    return state


def _save(path: Path, state: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, separators=(",", ":")))  # dumps: the C encoder (json.dump's is pure Python)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError as e:  # a cache that cannot be written only costs the next read its speed
        _logger.warning("run cache not written to %s (%s)", path.parent, e)


def _and(filter_string: str, clause: str) -> str:
    return f"{filter_string} AND {clause}" if filter_string else clause


def search_runs_cached(
    tracker: Tracker, experiment_id: str, filter_string: str, directory: Path | None, refresh: bool = False,
) -> list[RunRecord]:
    """The active runs of ``experiment_id`` matching ``filter_string``, as ``run_record``s in MLflow's
    order: read through the cache in ``directory`` (all of them the first time, or with ``refresh``),
    or straight from MLflow when ``directory`` is None."""
    if directory is None:
        return [run_record(r) for r in tracker.search_runs(filter_string, [experiment_id])]
    created = tracker.experiment_created(experiment_id)
    path = _path(Path(directory), tracker, experiment_id, filter_string, created)
    key = {"experiment_id": experiment_id, "created": created, "filter": filter_string}
    started = int(time.time() * 1000)
    state = None if refresh else _load(path, key)
    changed = state is None
    if state is None:
        runs = {r.info.run_id: run_record(r) for r in tracker.search_runs(filter_string, [experiment_id])}
    else:
        runs = state["runs"]
        since = int(state["read_at"]) - MARGIN_MS
        recheck = [i for i, r in runs.items() if r["status"] not in _ENDED or i in state["deleted"]]
        fresh = tracker.search_runs(_and(filter_string, f"attributes.end_time > {since}"), [experiment_id])
        fresh += tracker.search_runs(_and(filter_string, " AND ".join(f"attributes.status != '{s}'" for s in _ENDED)), [experiment_id])
        for i in range(0, len(recheck), _BY_ID):
            ids = ", ".join(f"'{r}'" for r in recheck[i:i + _BY_ID])
            fresh += tracker.search_runs(_and(filter_string, f"attributes.run_id IN ({ids})"), [experiment_id])
        before = {i: runs.pop(i) for i in recheck if i in runs}  # re-read below if still there; gone (purged) otherwise
        for r in fresh:
            record = run_record(r)
            changed = changed or runs.get(record["run_id"], before.get(record["run_id"])) != record
            runs[record["run_id"]] = record
        changed = changed or any(i not in runs for i in before)
    deleted = tracker.search_runs(filter_string, [experiment_id], deleted=True)
    deleted_ids = {r.info.run_id for r in deleted}
    for r in deleted:  # kept: a restored run comes back as it was
        record = run_record(r)
        changed = changed or runs.get(record["run_id"]) != record
        runs[record["run_id"]] = record
    if changed or sorted(deleted_ids) != state["deleted"]:
        # Unchanged: the file (and its read time) stays, and the runs that ended near it are read again next time.
        _save(path, {"key": key, "read_at": started, "deleted": sorted(deleted_ids), "runs": runs})
    return order(r for i, r in runs.items() if i not in deleted_ids)
