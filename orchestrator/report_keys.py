"""The keys under which a Train run's reports carry JSON payloads, and the MLflow tags they become.

Imports nothing: the training loop (``loop``, ``nan_guard``) writes them without importing Ray, and
Ray Train's controller reads them (``train_reports``) without importing torch.
"""
from __future__ import annotations

__all__ = ["RANK_KEY", "TABLES_KEY", "NAN_EVENTS_KEY", "RANKS_TAG", "DEVICE_TAG", "NAN_EVENTS_TAG"]

#: Each rank's report carries where it ran (rank, world size, node, device, images seen), as JSON under this key.
RANK_KEY = "rank_json"
#: A trial's measurement tables travel to the tracker inside its final metrics, as JSON under this key.
TABLES_KEY = "measure_tables_json"
#: The NaN guard's events so far, as JSON under this key (``orchestrator.nan_guard``).
NAN_EVENTS_KEY = "nan_events_json"
RANKS_TAG = "prunetune.ranks"  # JSON: each rank's rank, world size, node id, device and images seen per epoch
DEVICE_TAG = "device"  # what rank 0 ran and was measured on (fronts compare only runs of one device)
NAN_EVENTS_TAG = "prunetune.nan_events"  # JSON: the NaN guard's events (also the artifact nan_events.json)
