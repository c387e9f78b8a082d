"""The sweep's wall-clock breakdown: sums by hand, and the line a person reads."""
from __future__ import annotations

from orchestrator import timing
from orchestrator.timing import Stopwatch, format_breakdown, sweep_breakdown


def test_stopwatch_sums_and_marks(monkeypatch):
    clock = iter([10.0, 12.5, 20.0, 21.0])  # two timed blocks: 2.5 s and 1 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    sw = Stopwatch()
    with sw("train"):
        pass
    with sw("train"):
        pass
    sw.add("eval", 0.25)
    monkeypatch.setattr(timing.time, "time", lambda: 1000.0)
    sw.mark("to_first_step")
    monkeypatch.setattr(timing.time, "time", lambda: 2000.0)
    sw.mark("to_first_step")  # only the first time counts
    assert sw.metrics() == {"time_train_s": 3.5, "time_eval_s": 0.25}
    assert sw.metrics(started_at=990.0) == {"time_train_s": 3.5, "time_eval_s": 0.25, "time_to_first_step_s": 10.0}


def test_breakdown_adds_trials_to_the_sweeps_own_phases():
    runs = [
        # a trained trial: 4 s to start, 20 s training, 2 s eval, 3 s measuring, 1 s checkpoints + 0.5 s MLflow
        {"time_startup_s": 4.0, "time_train_s": 20.0, "time_eval_s": 2.0, "time_measure_s": 3.0, "time_checkpoint_s": 1.0, "time_logging_s": 0.5},
        # an evaluation-only trial (ToMe): no training, no checkpoints
        {"time_startup_s": 1.0, "time_eval_s": 0.5, "time_measure_s": 1.5, "time_logging_s": 0.25},
        {"val_top1": 90.0},  # a trial that recorded no times (e.g. failed early): counts as nothing
    ]
    pretrain = {"time_startup_s": 2.0, "time_train_s": 10.0, "time_eval_s": 1.0}
    b = sweep_breakdown(80.0, {"setup": 5.0, "pretrain": 14.0, "reference": 2.0, "finalize": 1.0, "tune": 40.0}, runs, pretrain)
    # start-up 5 + 2 + 4 + 1; training 10 + 20; evaluation 1 + 2.5; measurement 2 + 3 + 1.5; logging 1 + 1.5 + 0.25
    assert b == {
        "startup": 12.0, "training": 30.0, "evaluation": 3.5, "measurement": 6.5, "logging": 2.75,
        "other": 80.0 - 54.75, "total": 80.0, "trial_count": 3, "trial_seconds": 33.75, "trial_scale": 1.0, "pretrain_scale": 1.0,
    }


def test_parallel_trials_count_as_shares_of_the_tuners_wall_time():
    # two trials at once, each 10 s start-up + 50 s training: 120 trial-seconds in a 60-s Tuner
    runs = [{"time_startup_s": 10.0, "time_train_s": 50.0}, {"time_startup_s": 10.0, "time_train_s": 50.0}]
    b = sweep_breakdown(70.0, {"setup": 10.0, "tune": 60.0}, runs)
    assert b["startup"] == 10.0 + 10.0 and b["training"] == 50.0  # half of each, by hand
    assert b["other"] == 0.0 and sum(b[p] for p in timing.PHASES) == b["total"] == 70.0
    assert b["trial_seconds"] == 120.0 and b["trial_scale"] == 0.5
    assert "trial phases overlapped (120 s of them" in format_breakdown(b)


def test_pretraining_is_not_scaled_with_the_trials():
    b = sweep_breakdown(100.0, {"pretrain": 40.0, "tune": 50.0}, [{"time_train_s": 60.0}, {"time_train_s": 40.0}], {"time_train_s": 38.0})
    assert b["training"] == 38.0 + 50.0  # the pre-training's own 38 s, plus the trials' 100 s in 50
    assert b["pretrain_scale"] == 1.0


def test_logging_that_overlapped_the_pretraining_is_a_share_of_its_wall_time():
    # Train's controller logged 6 s to MLflow while the workers trained: 36 s of phases in 30 s
    pretrain = {"time_startup_s": 6.0, "time_train_s": 24.0, "time_report_logging_s": 6.0}
    b = sweep_breakdown(35.0, {"setup": 5.0, "pretrain": 30.0}, [], pretrain)
    assert (b["startup"], b["training"], b["logging"]) == (5.0 + 5.0, 20.0, 5.0)  # 30/36 of each, by hand
    assert b["pretrain_scale"] == round(30 / 36, 4) and b["other"] == 0.0
    assert sum(b[p] for p in timing.PHASES) == b["total"]


def test_format_breakdown_is_one_line_with_shares():
    b = {"startup": 30.0, "training": 150.0, "evaluation": 10.0, "measurement": 6.0, "logging": 3.0, "other": 1.0, "total": 200.0}
    line = format_breakdown(b)
    assert "\n" not in line
    assert line.startswith("200 s: start-up 30 s (15%), training 150 s (75%), evaluation 10 s (5%)")
    assert line.endswith("other 1 s (0%)")


def test_format_breakdown_of_an_empty_sweep():
    assert format_breakdown(sweep_breakdown(0.0, {}, [])).startswith("0 s: start-up 0 s (0%)")
