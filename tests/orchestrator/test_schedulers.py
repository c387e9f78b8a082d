"""MO-ASHA's promotions (a hand-made rung, and a brute-force check of every decision), cost metrics
taken from whatever the reports hold, the last-epoch guard of both schedulers, the wiring in the
sweep, and the hypervolume curve the sweep's progress callback logs."""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import random
import uuid
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from ray.tune.schedulers import TrialScheduler

from orchestrator.pareto import dominates, hypervolume, survives_halving
from orchestrator.schedulers import MultiObjectiveASHA, RecordingASHA, ledger, trial_epochs

ACC_LAT = [("val_top1", "max"), ("latency_ms", "min")]
CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


class _Space:
    """Stands in for a SweepSpace: ``trial_experiment(params).train.epochs``."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def trial_experiment(self, params):
        return SimpleNamespace(train=SimpleNamespace(epochs=self.epochs))


def trial(trial_id: str, epochs: int | None = 10, **more) -> SimpleNamespace:
    config = {"space": _Space(epochs), "params": {}} if epochs is not None else {}
    return SimpleNamespace(trial_id=trial_id, config=config, **more)


def _sweep() -> str:
    return f"sweep-{uuid.uuid4().hex}"


# ---- the ranking at one rung ---------------------------------------------------------------------------

# Eight trials at a rung (accuracy up, latency down), reduction factor 2: the top 4 continue.
# Front 0: A, B, C, H, D (five points: one too many); front 1: E (beaten by B), F (beaten by C);
# front 2: G. Within front 0 the extremes A (most accurate) and D (fastest) have infinite crowding
# distance; B: (90-80)/20 + (10-4)/7 = 1.357, C: (85-75)/20 + (6-3.5)/7 = 0.857,
# H: (80-70)/20 + (4-3)/7 = 0.643. So A, D, B, C continue and H is the one cut from front 0.
RUNG = {
    "A": {"val_top1": 90, "latency_ms": 10}, "B": {"val_top1": 85, "latency_ms": 6}, "C": {"val_top1": 80, "latency_ms": 4},
    "D": {"val_top1": 70, "latency_ms": 3}, "H": {"val_top1": 75, "latency_ms": 3.5}, "E": {"val_top1": 84, "latency_ms": 8},
    "F": {"val_top1": 79, "latency_ms": 5}, "G": {"val_top1": 60, "latency_ms": 9},
}


def test_promotions_on_a_hand_made_rung():
    assert {t for t in RUNG if survives_halving(RUNG, ACC_LAT, 2, t)} == {"A", "B", "C", "D"}
    # reduction factor 4: the top 2 are the two extremes of front 0
    assert {t for t in RUNG if survives_halving(RUNG, ACC_LAT, 4, t)} == {"A", "D"}
    # reduction factor 1.5: ceil(8 / 1.5) = 6: all of front 0 and, of front 1, the more isolated...
    # a two-point front has infinite distances: a tie, resolved for whichever trial is judged
    assert {t for t in RUNG if survives_halving(RUNG, ACC_LAT, 1.5, t)} == {"A", "B", "C", "D", "H", "E", "F"}


def test_fronts_decide_before_crowding():
    rung = {"a": {"val_top1": 90, "latency_ms": 5}, "b": {"val_top1": 80, "latency_ms": 2}, "c": {"val_top1": 89, "latency_ms": 6},
            "d": {"val_top1": 50, "latency_ms": 9}}
    assert {t for t in rung if survives_halving(rung, ACC_LAT, 2, t)} == {"a", "b"}


def test_reversed_modes_reverse_the_ranking():
    rung = {"fast": {"val_top1": 60, "latency_ms": 1}, "slow": {"val_top1": 90, "latency_ms": 9}, "mid": {"val_top1": 70, "latency_ms": 5}}
    assert {t for t in rung if survives_halving(rung, [("val_top1", "max")], 3, t)} == {"slow"}
    assert {t for t in rung if survives_halving(rung, [("val_top1", "min")], 3, t)} == {"fast"}
    assert {t for t in rung if survives_halving(rung, [("latency_ms", "max")], 3, t)} == {"slow"}


def test_only_objectives_every_trial_reported_are_compared():
    rung = {"a": {"val_top1": 90}, "b": {"val_top1": 80, "latency_ms": 1.0}}
    assert survives_halving(rung, ACC_LAT, 2, "a") and not survives_halving(rung, ACC_LAT, 2, "b")  # accuracy only
    assert survives_halving({"a": {}, "b": {}}, ACC_LAT, 2, "b")  # nothing in common: nobody is stopped


def _brute_force_survives(rung, objectives, rf, candidate):
    """Independent: peel fronts by pairwise dominance, NSGA-II crowding by its definition, top ceil(n/rf)."""
    common = [(m, d) for m, d in objectives if all(m in v for v in rung.values())]
    if not common:
        return True
    ids = list(rung)
    vec = {t: [rung[t][m] if d == "max" else -rung[t][m] for m, d in common] for t in ids}
    front_of, left, k = {}, set(ids), 0
    while left:
        layer = {t for t in left if not any(dominates(vec[u], vec[t]) for u in left)}
        front_of.update({t: k for t in layer})
        left -= layer
        k += 1
    crowd = {}
    for f in set(front_of.values()):
        members = [t for t in ids if front_of[t] == f]  # in rung order, as the stable sort keeps ties
        dist = dict.fromkeys(members, 0.0)
        if len(members) <= 2:
            dist = dict.fromkeys(members, math.inf)
        else:
            for j in range(len(common)):
                order = sorted(members, key=lambda t: vec[t][j])
                lo, hi = vec[order[0]][j], vec[order[-1]][j]
                dist[order[0]] = dist[order[-1]] = math.inf
                for p in range(1, len(order) - 1):
                    if hi > lo:
                        dist[order[p]] += (vec[order[p + 1]][j] - vec[order[p - 1]][j]) / (hi - lo)
        crowd.update(dist)
    ahead = [t for t in ids if t != candidate and (front_of[t], -crowd[t]) < (front_of[candidate], -crowd[candidate])]
    return len(ahead) < math.ceil(len(ids) / rf)


@pytest.mark.parametrize("seed", range(30))
def test_scheduler_decisions_match_brute_force(seed):
    """Trials reach rung 1 one after another; each is judged against those recorded before it."""
    rnd = random.Random(seed)
    rf = rnd.choice([2, 3, 4])
    objectives = rnd.choice([ACC_LAT, [("val_top1", "max"), ("latency_ms", "min"), ("gflops", "min")], [("val_top1", "min")]])
    sched = MultiObjectiveASHA(_sweep(), objectives, max_t=10, grace_period=1, reduction_factor=rf)
    recorded, stopped = {}, set()
    for i in range(rnd.randint(1, 14)):
        t = trial(f"t{i}")
        metrics = {m: float(rnd.randint(0, 6)) for m, _ in objectives}  # small grid: ties and shared fronts
        assert sched.on_trial_result(None, t, {"epoch": 0, **metrics}) == CONTINUE  # before the first rung
        recorded[t.trial_id] = metrics
        expected = _brute_force_survives(recorded, objectives, rf, t.trial_id)
        assert sched.on_trial_result(None, t, {"epoch": 1, **metrics}) == (CONTINUE if expected else STOP)
        if not expected:
            stopped.add(t.trial_id)
    assert sched.stopped == stopped and sched.num_stopped == len(stopped)


def test_rungs_and_one_decision_per_rung():
    sched = MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=9, grace_period=1, reduction_factor=3)
    assert sched.rungs == [1, 3, 9]
    good, bad = trial("good"), trial("bad")
    assert sched.on_trial_result(None, good, {"epoch": 1, "val_top1": 90.0, "latency_ms": 1.0}) == CONTINUE
    # ceil(2 / 3) = 1 trial continues: 'good', which dominates 'bad'
    assert sched.on_trial_result(None, bad, {"epoch": 1, "val_top1": 10.0, "latency_ms": 9.0}) == STOP
    # a report past several rungs is judged once, at the highest it reached
    late = trial("late")
    assert sched.on_trial_result(None, late, {"epoch": 4, "val_top1": 50.0, "latency_ms": 5.0}) == CONTINUE  # alone at rung 3
    assert set(sched.recorded[3]) == {"late"} and "late" not in sched.recorded[1]
    assert sched.on_trial_result(None, late, {"epoch": 5, "val_top1": 1.0, "latency_ms": 50.0}) == CONTINUE  # rung 3 judged already
    assert sched.stopped == {"bad"}


def test_a_dominated_trial_is_stopped_and_recorded_in_the_ledger():
    sched = MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=8, grace_period=1, reduction_factor=2)
    good, bad = trial("good"), trial("bad")
    assert sched.on_trial_result(None, good, {"epoch": 1, "val_top1": 90.0, "latency_ms": 1.0}) == CONTINUE
    assert sched.on_trial_result(None, good, {"epoch": 2, "val_top1": 91.0, "latency_ms": 1.0}) == CONTINUE  # rung 1 judged already
    assert sched.on_trial_result(None, bad, {"epoch": 1, "val_top1": 10.0, "latency_ms": 9.0}) == STOP
    assert sched.stopped == {"bad"} and ledger(sched.sweep).stopped == {"bad"}
    assert set(sched.recorded[1]) == {"good", "bad"} and set(sched.recorded[2]) == {"good"}


def test_cost_reported_once_is_carried_to_later_rungs():
    """A trial that measured its latency at start (epoch 0) is ranked on it at rung 1, where it reports accuracy only."""
    sched = MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=8, grace_period=1, reduction_factor=2)
    accurate, fast = trial("accurate"), trial("fast")
    for t, lat in ((accurate, 9.0), (fast, 1.0)):
        assert sched.on_trial_result(None, t, {"epoch": 0, "val_top1": 50.0, "latency_ms": lat}) == CONTINUE
    assert sched.on_trial_result(None, accurate, {"epoch": 1, "val_top1": 90.0}) == CONTINUE
    # less accurate but faster: a trade-off, so on front 0 with 'accurate' (a tie resolved in its favour)
    assert sched.on_trial_result(None, fast, {"epoch": 1, "val_top1": 60.0}) == CONTINUE
    assert sched.recorded[1]["fast"] == {"val_top1": 60.0, "latency_ms": 1.0}
    # on accuracy alone the same 'fast' trial would have been stopped
    acc_only = MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=8, grace_period=1, reduction_factor=2)
    acc_only.on_trial_result(None, accurate, {"epoch": 1, "val_top1": 90.0})
    assert acc_only.on_trial_result(None, fast, {"epoch": 1, "val_top1": 60.0}) == STOP


def test_results_without_time_or_objectives_never_stop():
    sched = MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=4, grace_period=1, reduction_factor=2)
    sched.on_trial_result(None, trial("a"), {"epoch": 1, "val_top1": 90.0})
    assert sched.on_trial_result(None, trial("b"), {"epoch": 1}) == CONTINUE
    assert sched.on_trial_result(None, trial("c"), {"epoch": 1, "val_top1": float("nan"), "latency_ms": float("inf")}) == CONTINUE
    t = trial("d")
    assert sched.on_trial_result(None, t, {"val_top1": 1.0}) == CONTINUE  # no time: remembered, not judged
    assert sched.stopped == set()
    assert sched.on_trial_result(None, t, {"epoch": 1}) == STOP  # judged on the accuracy it reported before


@pytest.mark.parametrize("epochs, expected", [(2, CONTINUE), (3, STOP), (None, STOP)])
def test_mo_asha_never_stops_a_trial_at_its_last_epoch(epochs, expected):
    """epochs 2 -> epoch 1 is the last (fully trained, its measurement next): never stopped."""
    sched = MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=2, grace_period=1, reduction_factor=2)
    sched.on_trial_result(None, trial("good"), {"epoch": 1, "val_top1": 90.0, "latency_ms": 1.0})
    assert sched.on_trial_result(None, trial("bad", epochs), {"epoch": 1, "val_top1": 10.0, "latency_ms": 9.0}) == expected
    assert sched.stopped == ({"bad"} if expected == STOP else set())


@pytest.mark.parametrize("epochs, expected", [(2, CONTINUE), (3, STOP)])
def test_asha_never_stops_a_trial_at_its_last_epoch(epochs, expected):
    asha = RecordingASHA(_sweep(), time_attr="epoch", metric="val_top1", mode="max", max_t=2, grace_period=1, reduction_factor=2)
    good, bad = trial("good"), trial("bad", epochs)
    for t in (good, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"epoch": 1, "val_top1": 90.0}) == CONTINUE
    assert asha.on_trial_result(None, bad, {"epoch": 1, "val_top1": 10.0}) == expected
    assert asha.stopped == ({"bad"} if expected == STOP else set())


def test_finished_trials_inform_later_cutoffs():
    sched = MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=4, grace_period=1, reduction_factor=2)
    sched.on_trial_complete(None, trial("done"), {"epoch": 3, "val_top1": 95.0, "latency_ms": 1.0})
    assert "done" in sched.recorded[2]
    sched.on_trial_result(None, trial("x"), {"epoch": 1, "val_top1": 95.0, "latency_ms": 1.0})
    assert sched.on_trial_result(None, trial("y"), {"epoch": 2, "val_top1": 10.0, "latency_ms": 5.0}) == STOP


def test_a_copy_unpickled_on_resume_keeps_its_rungs_and_ledger():
    sched = MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=4, grace_period=1, reduction_factor=2)
    sched.on_trial_result(None, trial("a"), {"epoch": 1, "val_top1": 90.0, "latency_ms": 1.0})
    copy = pickle.loads(pickle.dumps(sched))
    assert copy.on_trial_result(None, trial("b"), {"epoch": 1, "val_top1": 10.0, "latency_ms": 9.0}) == STOP
    assert sched.stopped == {"b"}  # the same ledger, by sweep name


def test_trial_epochs_reads_the_trials_config():
    assert trial_epochs(trial("a", 7)) == 7
    assert trial_epochs(trial("a", None)) is None
    assert trial_epochs(SimpleNamespace(trial_id="x")) is None


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        MultiObjectiveASHA(_sweep(), [], max_t=4)
    with pytest.raises(ValueError):
        MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=4, reduction_factor=1)
    with pytest.raises(ValueError):
        MultiObjectiveASHA(_sweep(), ACC_LAT, max_t=1, grace_period=2)


# ---- the sweep's wiring ----------------------------------------------------------------------------------


def test_the_sweep_picks_mo_asha_for_several_objectives(make_tiny_experiment):
    from orchestrator.config import AshaConfig, Objective
    from orchestrator.sweep import _scheduler

    exp = make_tiny_experiment("data")
    assert _scheduler(exp, "s", 3) is None
    two = dataclasses.replace(exp, sweep=dataclasses.replace(exp.sweep, asha=AshaConfig(grace_period=1, reduction_factor=3)))
    sched = _scheduler(two, "s", 3)
    # the default objectives: accuracy and the speed-up over dense
    assert isinstance(sched, MultiObjectiveASHA) and sched.objectives == [("val_top1", "max"), ("speedup", "max")]
    assert sched.rungs == [1, 3] and sched.reduction_factor == 3
    one = dataclasses.replace(two, sweep=dataclasses.replace(two.sweep, objectives=(Objective("val_top1", "max"),)))
    assert isinstance(_scheduler(one, "s", 3), RecordingASHA)
    assert isinstance(_scheduler(dataclasses.replace(two, sweep=dataclasses.replace(two.sweep, asha=AshaConfig(grace_period=5))), "s", 3), MultiObjectiveASHA)


# ---- the hypervolume curve --------------------------------------------------------------------------------


def _progress(mlflow_tmp, reference=None, num_classes=10):
    from orchestrator.sweep import _Progress
    from orchestrator.tracking import ROLE_TAG, Tracker

    tracker = Tracker(mlflow_tmp, "curve")
    parent = tracker.start_run("s", params={"model.num_classes": num_classes}, tags={ROLE_TAG: "sweep"})
    return _Progress({"m": 2}, _sweep(), ACC_LAT, tracker, parent, reference), parent


def _done(trial_id, acc, lat, epoch=1, epochs=2, **more):
    return trial(trial_id, epochs, status="TERMINATED", last_result={"epoch": epoch, "val_top1": acc, "latency_ms": lat, **more})


def test_progress_logs_the_hypervolume_after_every_finished_trial(mlflow_tmp):
    progress, parent = _progress(mlflow_tmp, reference={"val_top1": 10.0, "latency_ms": 5.0})
    ref = {"val_top1": 10.0, "latency_ms": 5.0}
    trials = []
    a, b, stopped, c = _done("a", 90.0, 3.0), _done("b", 70.0, 1.0), _done("s", 99.0, 0.1, epoch=0), _done("c", 80.0, 4.0)
    ledger(progress.sweep).stopped.add("s")
    for t in (a, b, stopped, c):
        trials.append(t)
        t.status = "RUNNING"  # Tune calls back before it marks the trial terminated
        progress.on_trial_complete(0, trials, t)
        t.status = "TERMINATED"
    history = sorted((m.step, m.value) for m in MlflowClient(mlflow_tmp).get_metric_history(parent, "hypervolume"))
    expected = [
        (1, hypervolume([a.last_result], ACC_LAT, ref)),
        (2, hypervolume([a.last_result, b.last_result], ACC_LAT, ref)),
        (3, hypervolume([a.last_result, b.last_result, c.last_result], ACC_LAT, ref)),  # the stopped trial adds no step
    ]
    assert [s for s, _ in history] == [1, 2, 3]
    assert [v for _, v in history] == pytest.approx([v for _, v in expected])
    assert history[1][1] == pytest.approx(160 + 240 - 120)


def test_progress_ends_a_stopped_trials_run_when_tune_stops_it(mlflow_tmp):
    """The stopped trial's own driver leaves its run alone (driver.stopped_by_tune): the sweep ends
    it as soon as Tune reports it, not only at the sweep's end. A finished trial's run is its driver's."""
    from orchestrator.tracking import ROLE_TAG, TRIAL_TAG

    progress, parent = _progress(mlflow_tmp)
    runs = {t: progress.tracker.start_run(f"trial_{t}", {}, {ROLE_TAG: "trial", TRIAL_TAG: t}, parent_id=parent) for t in ("s", "a")}
    ledger(progress.sweep).stopped.add("s")
    for t in (_done("s", 50.0, 3.0, epoch=0), _done("a", 90.0, 3.0)):
        progress.on_trial_complete(0, [t], t)
    client = MlflowClient(mlflow_tmp)
    stopped, finished = client.get_run(runs["s"]), client.get_run(runs["a"])
    assert stopped.info.status == "KILLED" and stopped.data.tags["prunetune.stopped_early"] == "true"
    assert finished.info.status == "RUNNING" and "prunetune.stopped_early" not in finished.data.tags


def test_progress_completes_the_reference_from_the_trials_and_records_it(mlflow_tmp):
    from orchestrator.tracking import HV_REFERENCE_TAG

    progress, parent = _progress(mlflow_tmp, reference={"val_top1": 10.0})  # no reference run measured the dense latency
    t = _done("a", 90.0, 3.0, dense_latency_ms=6.0)
    progress.on_trial_complete(0, [t], t)
    client = MlflowClient(mlflow_tmp)
    assert json.loads(client.get_run(parent).data.tags[HV_REFERENCE_TAG]) == {"val_top1": 10.0, "latency_ms": 6.0}
    assert client.get_metric_history(parent, "hypervolume")[0].value == pytest.approx(80 * 3)


def test_progress_skips_the_curve_without_a_reference_and_never_raises(mlflow_tmp):
    progress, parent = _progress(mlflow_tmp, reference=None)
    t = _done("a", 90.0, 3.0)  # no dense latency anywhere
    progress.on_trial_complete(0, [t], t)
    progress.tracker = SimpleNamespace(hv_reference=lambda *a, **k: 1 / 0)  # an MLflow outage, say
    progress.reference = {}
    progress.on_trial_complete(0, [t], t)  # logged as a warning, the sweep goes on
    assert MlflowClient(mlflow_tmp).get_metric_history(parent, "hypervolume") == []


def test_progress_lines_take_epoch_reports_with_a_latency(mlflow_tmp, caplog):
    """Once the loop reports cost metrics every epoch (for MO-ASHA), an epoch's line stays an epoch's line."""
    import logging

    progress, _ = _progress(mlflow_tmp)
    t = trial("a")
    t.config["space"].arm = lambda params: SimpleNamespace(method="m")
    with caplog.at_level(logging.INFO, logger="orchestrator.sweep"):
        progress.on_trial_result(0, [t], t, {"epoch": 0, "val_top1": 50.0, "train_loss": 1.0, "latency_ms": 3.0})
        progress.on_trial_result(0, [t], t, {"epoch": 1, "val_top1": 60.0, "latency_ms": 3.0})  # a final report lacking some figures
    assert "epoch 1/2: val_top1 50.00%" in caplog.text
    assert "measured: val_top1 60.00%, latency 3.000 ms (dense nan" in caplog.text
