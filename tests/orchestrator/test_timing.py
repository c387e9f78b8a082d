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
    b = sweep_breakdown(60.0, {"setup": 5.0, "reference": 2.0, "finalize": 1.0, "tune": 40.0}, runs)
    # start-up 5 + 4 + 1; training 20; evaluation 2.5; measurement 2 + 3 + 1.5; logging 1 + 1.5 + 0.25
    assert b == {
        "startup": 10.0, "training": 20.0, "evaluation": 2.5, "measurement": 6.5, "logging": 2.75,
        "other": 60.0 - 41.75, "total": 60.0, "trial_count": 3,
    }


def test_breakdown_of_parallel_trials_has_no_negative_other():
    runs = [{"time_train_s": 50.0}, {"time_train_s": 50.0}]  # two trials at once: 100 trial-seconds in 60 s
    b = sweep_breakdown(60.0, {}, runs)
    assert b["training"] == 100.0 and b["other"] == 0.0


def test_format_breakdown_is_one_line_with_shares():
    b = {"startup": 30.0, "training": 150.0, "evaluation": 10.0, "measurement": 6.0, "logging": 3.0, "other": 1.0, "total": 200.0}
    line = format_breakdown(b)
    assert "\n" not in line
    assert line.startswith("200 s: start-up 30 s (15%), training 150 s (75%), evaluation 10 s (5%)")
    assert line.endswith("other 1 s (0%)")


def test_format_breakdown_of_an_empty_sweep():
    assert format_breakdown(sweep_breakdown(0.0, {}, [])).startswith("0 s: start-up 0 s (0%)")
