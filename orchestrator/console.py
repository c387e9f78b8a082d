"""What a sweep prints: prunetune's own progress lines, not Ray's per-report chatter.

Ray forwards every worker's log lines to the driver's console. Some of them are routine
bookkeeping that repeats once per report or checkpoint of every trial (``Checkpoint successfully
created at ...``, ``Moving model to device``, ``Requesting resources``); a 10-trial sweep prints
hundreds. ``quiet_worker_logs`` drops exactly those lines from the driver's console; they stay in
Ray's log files (``/tmp/ray/session_latest/logs``), which the workers write themselves, so nothing
is lost. Tune's own trial tables are turned off by the sweep (``RunConfig(verbose=0)``), whose
progress callback prints one line per trial epoch instead. ``prunetune -v`` keeps Ray's console
as it is.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

__all__ = ["NOISE", "is_noise", "quiet_worker_logs"]

_logger = logging.getLogger(__name__)

#: Lines Ray prints for every report, checkpoint or worker group of every trial (routine, not news).
NOISE = re.compile(
    "|".join(
        (
            r"Checkpoint successfully created at",
            r"Moving model to device",
            r"Wrapping provided model in DistributedDataParallel",
            r"Requesting resources: ",
            r"Started distributed worker processes",
            r"Setting up process group for",
            r"\[Gloo\] Rank \d+ is connected to",
            r"Reporting training result",
            r"Attempting to start training worker group of size",
            r"Started training worker group of size",
            r"- \(ip=[\d.]+, pid=\d+\) world_rank=\d+, local_rank=",
            # Logged at error level by every Train run's controller, about its own preemption watcher: not an error.
            r"has constructor arguments in the object store and max_restarts > 0",
        )
    )
)

_HANDLER = "ray_print_logs"  # the name under which ray.init registers its console printer


def is_noise(line: str) -> bool:
    return NOISE.search(line) is not None


def _filtered(print_logs: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def handle(data: dict[str, Any]) -> None:
        lines = [line for line in data.get("lines", ()) if not is_noise(line)]
        if lines:
            print_logs({**data, "lines": lines})

    handle.prunetune_quiet = True  # type: ignore[attr-defined]
    return handle


def quiet_worker_logs() -> bool:
    """Filter Ray's forwarding of worker log lines to this driver's console (after ``ray.init``).

    Returns whether the filter is in place. It wraps the printer ``ray.init`` registered on Ray's
    log dispatcher; where that internal hook is absent (another Ray version, ``log_to_driver=False``)
    the console is left as it is.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - depends on Ray's internals
        return False
    with dispatcher._lock:
        for i, (name, handle) in enumerate(dispatcher.handlers):
            if name == _HANDLER:
                if not getattr(handle, "prunetune_quiet", False):
                    dispatcher.handlers[i] = (name, _filtered(handle))
                return True
    _logger.debug("Ray's console log printer not found; worker log lines are not filtered")
    return False
