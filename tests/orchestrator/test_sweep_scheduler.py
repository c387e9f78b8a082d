"""The sweep's ASHA records its own early stops: Tune may later report such a trial as errored."""
from __future__ import annotations

import pickle
import uuid
from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from orchestrator.sweep import _RecordingASHA


def _asha() -> _RecordingASHA:
    return _RecordingASHA(f"sweep-{uuid.uuid4().hex}", time_attr="epoch", metric="val_top1", mode="max", max_t=4, grace_period=1, reduction_factor=2)


def test_records_the_trials_it_stops_and_only_those():
    asha = _asha()
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for t in (good, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"epoch": 0, "val_top1": 50.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, good, {"epoch": 1, "val_top1": 90.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {"epoch": 1, "val_top1": 10.0}) == TrialScheduler.STOP
    assert asha.stopped == {"bad"}


def test_results_without_the_metric_never_stop():
    asha = _asha()
    t = SimpleNamespace(trial_id="t")
    asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, t, {"epoch": 1}) == TrialScheduler.CONTINUE
    assert asha.stopped == set()


def test_a_copy_unpickled_on_resume_records_in_the_same_ledger():
    asha = _asha()
    copy = pickle.loads(pickle.dumps(asha))  # what Tune runs after Tuner.restore
    copy.stopped.add("t")
    assert asha.stopped == {"t"}
