"""Metrics, tags and artifacts on their way to a run's MLflow record, kept in order in a local file until the server took them.

Training never waits on the tracking server. Ray Train's controller, a fresh process per run, only
appends each report to the run's JSONL file (``Outbox.append``: importing MLflow and opening its
store there cost 3-4 s of a core in every run, while the ranks trained); the process that called
``fit()``, which has MLflow loaded already, delivers the records from a thread
(``Outbox.delivering()``), oldest first, with their original steps and timestamps. It tries MLflow
only when the server answers its health check (a refused connection fails in milliseconds, where
MLflow's own client would retry for minutes), and removes a record only after MLflow took it, so
an outage or a killed process loses nothing written; replaying a metric twice logs the same (step,
timestamp, value) point again, which MLflow's history tolerates (``backfill_history`` and the
tests count distinct steps). Both sides hold the outbox folder's lock (``fcntl``: they are on one
node, as Train places the controller beside its caller) while they touch the file.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from .tracking import Tracker, redact

__all__ = ["Outbox", "outbox_path", "wait_for_tracking"]

_logger = logging.getLogger(__name__)
T = TypeVar("T")
DELAYED_MS = 10_000  # a record older than this when sent was held back (MLflow down), not just queued


def outbox_path(root: str | Path, run_id: str) -> Path:
    """The outbox file of MLflow run ``run_id`` under a local folder ``root``."""
    return Path(root) / "_mlflow_outbox" / f"{run_id}.jsonl"


def _healthy(uri: str, timeout: float = 2.0) -> bool:
    if urlparse(uri).scheme not in ("http", "https"):
        return True  # a database store: a failure shows in the call itself, quickly
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def wait_for_tracking(tracker: Tracker, what: str, call: Callable[[], T], timeout: float = 900.0) -> T:
    """``call()`` once the tracking server answers, retried until ``timeout`` s (a server down for a
    while must not fail a trial that is about to start or has just finished)."""
    deadline, delay, warned = time.monotonic() + timeout, 1.0, False
    while True:
        try:
            if _healthy(tracker.uri):
                return call()
            error: Exception = ConnectionError("no answer on /health")
        except Exception as e:  # noqa: BLE001 - any tracking failure is retried until the deadline
            error = e
        if time.monotonic() > deadline:
            raise error
        if not warned:
            _logger.warning("MLflow at %s unavailable (%s); %s waits for it", redact(tracker.uri), type(error).__name__, what)
            warned = True
        time.sleep(delay)
        delay = min(delay * 2, 15.0)


class Outbox:
    """The pending MLflow writes of one run (picklable: a tracker, a run id and a local file path)."""

    def __init__(self, tracker: Tracker, run_id: str, path: str | Path) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.path = Path(path).absolute()  # the same file for Train's controller, whatever its working directory

    def pending(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a crash mid-write: the rest is still good
                continue
        return records

    def append(
        self, metrics: dict[str, Any] | None = None, step: int = 0, tags: dict[str, Any] | None = None,
        tables: dict[str, list[dict[str, Any]]] | None = None, texts: dict[str, str] | None = None,
    ) -> None:
        """Keep a record (timestamped now) for ``flush`` to deliver: ``metrics`` at ``step``, ``tags``,
        and artifacts: ``tables`` (``Tracker.log_tables``) and ``texts`` (file name -> text). Never
        touches MLflow, so it never imports it."""
        record = {
            "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "step": int(step), "timestamp_ms": int(time.time() * 1000), "tags": {k: str(v) for k, v in (tags or {}).items()},
        }
        if tables:
            record["tables"] = tables
        if texts:
            record["texts"] = texts
        with self._locked():
            self._append(record)

    def flush(self) -> bool:
        """Send the pending records, oldest first; True when none is left."""
        with self._locked():
            return self._flush()

    def flush_waiting(self, timeout: float) -> bool:
        """``flush``, retried until ``timeout`` s (at the end of a trial: the server may still be down)."""
        deadline, delay = time.monotonic() + timeout, 1.0
        while not self.flush():
            if time.monotonic() > deadline:
                _logger.warning("MLflow run %s: %d record(s) left in %s (sent on resume)", self.run_id, len(self.pending()), self.path)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        return True

    @contextmanager
    def delivering(self, interval: float = 0.5, on_flush: Callable[[float], None] | None = None) -> Iterator[None]:
        """Flush every ``interval`` s from a thread while the block runs (what another process, Train's
        controller, appends), and once more at its end. ``on_flush(seconds)`` is told what each flush
        of a non-empty file took, delivered or not (for the run's time breakdown)."""
        stop = threading.Event()

        def pump() -> None:
            while not stop.wait(interval):
                self._timed_flush(on_flush)

        thread = threading.Thread(target=pump, name=f"outbox-{self.run_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self._timed_flush(on_flush)

    def _timed_flush(self, on_flush: Callable[[float], None] | None) -> None:
        if not self.path.is_file():
            return
        start = time.perf_counter()
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - a record stays in the file; the thread must go on
            _logger.warning("MLflow run %s: delivering its records failed (%s: %s); kept for later", self.run_id, type(e).__name__, e)
        if on_flush is not None:
            on_flush(time.perf_counter() - start)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The outbox folder's lock (a folder can be locked too: no lock file left behind per run)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _flush(self) -> bool:
        records = self.pending()
        if not records:
            return True
        for i, record in enumerate(records):
            if not self._deliver(record):
                self._rewrite(records[i:])
                return False
        self.path.unlink(missing_ok=True)
        if time.time() * 1000 - records[0]["timestamp_ms"] > DELAYED_MS:  # held back by an outage, not just queued
            _logger.info("MLflow run %s: %d delayed record(s) sent", self.run_id, len(records))
        return True

    def _deliver(self, record: dict[str, Any]) -> bool:
        if not _healthy(self.tracker.uri):
            return False
        try:
            if record["metrics"]:
                self.tracker.log_metrics(self.run_id, record["metrics"], step=record["step"], timestamp_ms=record["timestamp_ms"])
            if record["tags"]:
                self.tracker.set_tags(self.run_id, record["tags"])
        except Exception as e:  # noqa: BLE001 - kept for later, whatever the tracking store's error
            _logger.warning("MLflow logging failed for run %s (%s: %s); kept for later", self.run_id, type(e).__name__, e)
            return False
        try:
            if record.get("tables"):
                self.tracker.log_tables(self.run_id, record["tables"])
            for name, text in (record.get("texts") or {}).items():
                self.tracker.log_text(self.run_id, text, name)
        except Exception as e:  # noqa: BLE001 - artifacts are a record, never a reason to hold the metrics back
            _logger.warning("MLflow artifacts not logged for run %s: %s", self.run_id, e)
        return True

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)

