"""``sweep.startup_trials``: how many random trials TPE and NSGA-II take before they model the results."""
from __future__ import annotations

import optuna
import pytest

from orchestrator.config import ConfigError, SweepConfig, experiment_from_dict
from orchestrator.sweep import _sampler


def _xs(sampler, n: int) -> list[tuple[float, float]]:
    """The points a sampler asks for in ``n`` trials of a two-objective problem on [0, 1]^2."""

    def objectives(t):
        x, y = t.suggest_float("x", 0.0, 1.0), t.suggest_float("y", 0.0, 1.0)
        return (x - 0.3) ** 2, (y - 0.6) ** 2 + x

    study = optuna.create_study(sampler=sampler, directions=["minimize", "minimize"])
    study.optimize(objectives, n_trials=n)
    return [(t.params["x"], t.params["y"]) for t in study.trials]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_startup_trials_are_the_random_samplers_draws_then_the_model_takes_over():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    random = _xs(optuna.samplers.RandomSampler(seed=0), 8)
    # TPE draws its startup trials from a RandomSampler with its own seed: the same values.
    tpe3 = _xs(_sampler(SweepConfig(sampler="tpe", seed=0, startup_trials=3)), 8)
    assert tpe3[:3] == random[:3] and tpe3[3:] != random[3:]
    # Optuna's default (10 startup trials): random search all along at this budget.
    assert _xs(_sampler(SweepConfig(sampler="tpe", seed=0)), 8) == random
    nsga = _xs(_sampler(SweepConfig(sampler="nsga2", seed=0, startup_trials=4)), 8)
    assert nsga[:4] == random[:4] and nsga[4:] != random[4:]  # the second generation is bred, not drawn


def test_startup_trials_from_yaml_and_checked():
    exp = experiment_from_dict({"name": "x", "sweep": {"sampler": "nsga2", "startup_trials": 4}})
    assert exp.sweep.startup_trials == 4
    with pytest.raises((ConfigError, ValueError), match="startup_trials"):
        experiment_from_dict({"name": "x", "sweep": {"startup_trials": 1}})
