"""What Ray Train's controller unpickles for every run stays light: no methods, timm or torchvision.

The controller is a fresh process per run; it keeps ``train_loop_config`` in its run context and
holds the run's callbacks. Each is unpickled there in a clean interpreter here, which then lists
the heavy modules it had to import.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from orchestrator import driver, worker
from orchestrator.outbox import Outbox
from orchestrator.quickstart import digits_tiny_vit
from orchestrator.tracking import Tracker
from orchestrator.train_reports import MlflowReportCallback

HEAVY = ("methods", "timm", "torchvision", "torch._dynamo", "orchestrator.config", "mlflow")
_PROBE = """
import pickle, sys
pickle.loads(open(sys.argv[1], "rb").read())
print(",".join(m for m in sys.argv[2].split(",") if m in sys.modules))
"""


def _imported_by_unpickling(obj, tmp_path: Path) -> list[str]:
    blob = tmp_path / "payload.pkl"
    blob.write_bytes(pickle.dumps(obj))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(blob), ",".join(HEAVY)], capture_output=True, text=True, check=True, timeout=120,
    )
    return [m for m in out.stdout.strip().split(",") if m]


def test_loop_config_unpickles_without_the_methods_and_the_worker_gets_the_experiment_back(tmp_path):
    exp = digits_tiny_vit(str(tmp_path / "digits"))
    config = driver.train_loop_config(exp, "trial", str(tmp_path / "run"), started_at=123.0)
    assert _imported_by_unpickling(config, tmp_path) == []
    assert pickle.loads(config[worker.EXPERIMENT_KEY]) == exp  # what train_fn_per_worker rebuilds
    assert (config["stage"], config["run_dir"], config["started_at"]) == ("trial", str(tmp_path / "run"), 123.0)


def test_report_callback_unpickles_without_the_methods_or_mlflow(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "payload")
    callback = MlflowReportCallback(Outbox(tracker, "0" * 32, tmp_path / "outbox.jsonl"))
    assert _imported_by_unpickling(callback, tmp_path) == []


_REPORT = """
import json, pickle, sys
callback = pickle.loads(open(sys.argv[1], "rb").read())
rank = json.dumps({"rank": 0, "train_samples": 64, "device": "cpu"})
for epoch in range(3):
    callback.after_report(None, [{"epoch": epoch, "val_top1": 50.0 + epoch, "rank_json": rank}], None)
print(",".join(m for m in sys.argv[2].split(",") if m in sys.modules))
"""


def test_report_callback_queues_reports_in_the_controller_without_importing_mlflow(tmp_path):
    """Train's controller runs ``after_report`` for every report: it appends to the run's outbox file
    and imports nothing heavy (a first MLflow call there cost 3-4 s of a core per run)."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "payload")
    outbox = Outbox(tracker, "0" * 32, tmp_path / "outbox.jsonl")
    blob = tmp_path / "callback.pkl"
    blob.write_bytes(pickle.dumps(MlflowReportCallback(outbox)))
    out = subprocess.run([sys.executable, "-c", _REPORT, str(blob), ",".join(HEAVY)], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == ""  # none of HEAVY, mlflow among them
    records = outbox.pending()
    assert [(r["step"], r["metrics"]["val_top1"]) for r in records] == [(0, 50.0), (1, 51.0), (2, 52.0)]
    assert all(r["tags"]["device"] == "cpu" for r in records)
