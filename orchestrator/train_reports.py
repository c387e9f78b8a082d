"""What a Train run's controller does with each report: log it to MLflow (``MlflowReportCallback``).

Ray Train unpickles its callbacks in the run's controller process, which starts afresh for every
run. So this module imports neither torch nor the methods (``orchestrator/__init__.py`` imports
nothing either): the controller starts in about 1.5 s instead of 4.5 s on 2 cores. The keys under
which reports carry JSON payloads live in ``report_keys`` (no imports at all), which the training
loop uses too.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from .outbox import Outbox, outbox_path
from .report_keys import DEVICE_TAG, NAN_EVENTS_KEY, NAN_EVENTS_TAG, RANK_KEY, RANKS_TAG, TABLES_KEY
from .timing import Stopwatch
from .tracking import Tracker

__all__ = ["MlflowReportCallback", "RANK_KEY", "TABLES_KEY", "NAN_EVENTS_KEY", "RANKS_TAG", "DEVICE_TAG", "NAN_EVENTS_TAG"]

_logger = logging.getLogger(__name__)

class MlflowReportCallback(UserCallback):
    """Logs rank 0's reported metrics (and the checkpoint URI) to an MLflow run, step = epoch.

    Through an ``Outbox``: while MLflow is down, the records wait in a local file, in order, and
    reach MLflow with their own steps and times once it answers again; training never waits.
    """

    def __init__(self, tracker: Tracker, run_id: str, outbox: Outbox | None = None) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.outbox = outbox or Outbox(tracker, run_id, outbox_path(Path(tempfile.gettempdir()) / "prunetune", run_id))
        # What logging to MLflow costs, counted where it happens (Train's controller holds a copy of
        # this callback) and sent with the next report as ``time_report_logging_s``.
        self.timing = Stopwatch()

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        with self.timing("logging"):
            self._log(metrics, checkpoint)

    def _log(self, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = metrics[0] if metrics else {}
        tags: dict[str, Any] = {}
        ranks = sorted((json.loads(m[RANK_KEY]) for m in metrics if RANK_KEY in m), key=lambda r: r["rank"])
        if ranks and all(r.get("train_samples") is not None for r in ranks):  # each rank's epoch: where it ran, what it saw
            tags.update({RANKS_TAG: json.dumps(ranks), DEVICE_TAG: ranks[0]["device"]})
        if checkpoint is not None:
            tags["checkpoint_uri"] = checkpoint.path
        if NAN_EVENTS_KEY in reported:  # the NaN guard's events so far (the newest, if the list outgrows a tag)
            events = json.loads(reported[NAN_EVENTS_KEY])
            tags[NAN_EVENTS_TAG] = json.dumps(events[-20:])
        # What logging the earlier reports cost (this process is Ray Train's controller: its own clock).
        reported = {**reported, "time_report_logging_s": self.timing.totals.get("logging", 0.0)}
        if self.outbox.send(reported, step=int(reported.get("epoch", 0)), tags=tags):
            try:
                if TABLES_KEY in reported:
                    self.tracker.log_tables(self.run_id, json.loads(reported[TABLES_KEY]))
                if NAN_EVENTS_KEY in reported:
                    self.tracker.log_text(self.run_id, json.dumps(json.loads(reported[NAN_EVENTS_KEY]), indent=1), "nan_events.json")
            except Exception as e:  # artifacts are a record, never a reason to stop training
                _logger.warning("MLflow artifacts not logged for run %s: %s", self.run_id, e)
