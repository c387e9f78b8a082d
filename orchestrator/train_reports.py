"""What a Train run's controller does with each report: queue it for MLflow (``MlflowReportCallback``).

Ray Train unpickles its callbacks in the run's controller process, which starts afresh for every
run. So this module imports neither torch nor the methods (``orchestrator/__init__.py`` imports
nothing either): the controller starts in about 1.5 s instead of 4.5 s on 2 cores. The keys under
which reports carry JSON payloads live in ``report_keys`` (no imports at all), which the training
loop uses too.
"""
from __future__ import annotations

import json
from typing import Any

from ray.train import UserCallback

from .outbox import Outbox
from .report_keys import DEVICE_TAG, NAN_EVENTS_KEY, NAN_EVENTS_TAG, RANK_KEY, RANKS_TAG, TABLES_KEY
from .timing import Stopwatch

__all__ = ["MlflowReportCallback", "RANK_KEY", "TABLES_KEY", "NAN_EVENTS_KEY", "RANKS_TAG", "DEVICE_TAG", "NAN_EVENTS_TAG"]


class MlflowReportCallback(UserCallback):
    """Queues rank 0's reported metrics (and the checkpoint URI, the ranks' devices, the NaN guard's
    events and tables) for a run's MLflow record, step = epoch, in its ``Outbox`` file.

    Train's controller holds this callback: a fresh process per run, where a first MLflow call
    would import MLflow and open its store (3-4 s of a core on 2 cores, while the ranks train). So it
    only appends; the process that called ``fit()`` delivers, inside ``outbox.delivering()``. While
    MLflow is down the records wait in the file, in order, and reach MLflow with their own steps and
    times once it answers again; training never waits.
    """

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        # What queueing a report costs, counted where it happens (Train's controller holds a copy of
        # this callback) and sent with the next report as ``time_report_logging_s``.
        self.timing = Stopwatch()

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        with self.timing("logging"):
            self._queue(metrics, checkpoint)

    def _queue(self, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = metrics[0] if metrics else {}
        tags: dict[str, Any] = {}
        ranks = sorted((json.loads(m[RANK_KEY]) for m in metrics if RANK_KEY in m), key=lambda r: r["rank"])
        if ranks and all(r.get("train_samples") is not None for r in ranks):  # each rank's epoch: where it ran, what it saw
            tags.update({RANKS_TAG: json.dumps(ranks), DEVICE_TAG: ranks[0]["device"]})
        if checkpoint is not None:
            tags["checkpoint_uri"] = checkpoint.path
        texts = {}
        if NAN_EVENTS_KEY in reported:  # the NaN guard's events so far (the newest, if the list outgrows a tag)
            events = json.loads(reported[NAN_EVENTS_KEY])
            tags[NAN_EVENTS_TAG] = json.dumps(events[-20:])
            texts["nan_events.json"] = json.dumps(events, indent=1)
        tables = json.loads(reported[TABLES_KEY]) if TABLES_KEY in reported else None
        # What queueing the earlier reports cost (this process is Ray Train's controller: its own clock).
        reported = {**reported, "time_report_logging_s": self.timing.totals.get("logging", 0.0)}
        self.outbox.append(reported, step=int(reported.get("epoch", 0)), tags=tags, tables=tables, texts=texts)
