"""``Outbox``: records one process appends (Train's controller) reach MLflow through another
(``delivering()`` in the process that called ``fit()``), in order, each once, with their artifacts;
while MLflow is down they wait in the file."""
from __future__ import annotations

import subprocess
import sys

from orchestrator.outbox import Outbox
from orchestrator.tracking import Tracker
from ports import free_port

N = 40
_APPENDER = """
import pickle, sys, time
outbox = pickle.loads(open(sys.argv[1], "rb").read())
for step in range(int(sys.argv[2])):
    outbox.append({"x": float(step)}, step=step, tags={"last": step})
    time.sleep(0.005)
"""


def _append_from_another_process(outbox: Outbox, tmp_path, n: int) -> None:
    import pickle

    blob = tmp_path / "outbox.pkl"
    blob.write_bytes(pickle.dumps(outbox))
    subprocess.run([sys.executable, "-c", _APPENDER, str(blob), str(n)], check=True, timeout=120)


def test_records_appended_elsewhere_are_delivered_in_order_each_once(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "outbox")
    run_id = tracker.start_run("r", params={}, tags={})
    outbox = Outbox(tracker, run_id, tmp_path / "box" / f"{run_id}.jsonl")
    flushes = []
    with outbox.delivering(interval=0.01, on_flush=flushes.append):  # flushing while the other process appends
        _append_from_another_process(outbox, tmp_path, N)
    history = tracker.client.get_metric_history(run_id, "x")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(N)]  # each step once
    assert tracker.get_run(run_id).data.tags["last"] == str(N - 1)  # tags applied in order: the last one wins
    assert not outbox.path.exists() and len(flushes) >= 2  # everything sent, over several flushes


def test_artifacts_travel_with_their_record(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "outbox")
    run_id = tracker.start_run("r", params={}, tags={})
    outbox = Outbox(tracker, run_id, tmp_path / f"{run_id}.jsonl")
    outbox.append({"x": 1.0}, step=0, tables={"budget": [{"budget": 0.5, "top1": 90.0}, {"budget": 1.0, "top1": 95.0}]},
                  texts={"nan_events.json": '[{"step": 3}]'})
    assert outbox.flush()
    names = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert {"budget.csv", "nan_events.json"} <= names
    assert tracker.client.download_artifacts(run_id, "budget.csv", str(tmp_path)).endswith("budget.csv")
    assert (tmp_path / "budget.csv").read_text().splitlines()[1:] == ["0.5,90.0", "1.0,95.0"]


def test_records_wait_in_the_file_while_mlflow_is_down(tmp_path):
    down = Tracker(f"http://127.0.0.1:{free_port()}", "outbox")  # nothing listens there
    outbox = Outbox(down, "0" * 32, tmp_path / "waiting.jsonl")
    with outbox.delivering(interval=0.01):
        _append_from_another_process(outbox, tmp_path, 5)
    assert [r["step"] for r in outbox.pending()] == [0, 1, 2, 3, 4]  # kept, in order, for a later flush
