"""Pareto fronts: hand-computed cases and a randomized comparison with a brute-force definition."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from orchestrator.pareto import dominates, pareto_mask

ACC_LAT = [("val_top1", "max"), ("latency_ms", "min")]


def pt(acc, lat, **more):
    return {"val_top1": acc, "latency_ms": lat, **more}


def test_dominates():
    assert dominates([2, 2], [1, 2]) and dominates([2, 3], [1, 2])
    assert not dominates([1, 2], [1, 2])  # equal: not better anywhere
    assert not dominates([2, 1], [1, 2])  # a trade-off
    assert not dominates([1, 2], [2, 2])


def test_max_min_front():
    points = [pt(90, 10), pt(80, 5), pt(85, 12), pt(70, 4), pt(70, 6)]
    # (85, 12) is beaten by (90, 10); (70, 6) by (80, 5); the rest trade accuracy for latency
    assert pareto_mask(points, ACC_LAT) == [True, True, False, True, False]


@pytest.mark.parametrize(
    "modes, expected",
    [
        (("max", "max"), [False, False, True, False]),
        (("min", "min"), [True, True, False, False]),
        (("max", "min"), [False, True, True, False]),
        (("min", "max"), [True, False, False, False]),
    ],
)
def test_every_mode_combination(modes, expected):
    points = [{"a": 1, "b": 9}, {"a": 2, "b": 1}, {"a": 3, "b": 9}, {"a": 2, "b": 9}]
    assert pareto_mask(points, [("a", modes[0]), ("b", modes[1])]) == expected


def test_ties_are_all_kept():
    points = [pt(90, 10), pt(90, 10), pt(80, 10)]
    assert pareto_mask(points, ACC_LAT) == [True, True, False]


def test_equal_in_one_objective_better_in_the_other_dominates():
    assert pareto_mask([pt(90, 10), pt(90, 11), pt(89, 10)], ACC_LAT) == [True, False, False]


@pytest.mark.parametrize("bad", [{"val_top1": 99.0}, pt(float("nan"), 1.0), pt(99.0, None), pt(99.0, "1.0"), {}])
def test_missing_or_nan_metric_is_never_on_the_front(bad):
    """Even an otherwise unbeatable point is off the front without all objectives, and dominates nothing."""
    mask = pareto_mask([bad, pt(50.0, 100.0)], ACC_LAT)
    assert mask == [False, True]


def test_numpy_scalars_count_as_numbers():
    import numpy as np

    points = [pt(np.float32(90.0), np.float64(10.0)), pt(np.int64(80), np.float32(5.0)), pt(np.float32(70.0), np.float32(20.0))]
    assert pareto_mask(points, ACC_LAT) == [True, True, False]
    assert pareto_mask([pt(np.float32("nan"), 1.0), pt(1.0, 2.0)], ACC_LAT) == [False, True]


def test_all_missing_gives_an_empty_front():
    assert pareto_mask([{}, {"latency_ms": 1.0}], ACC_LAT) == [False, False]
    assert pareto_mask([], ACC_LAT) == []


def test_single_objective_keeps_the_best_only():
    assert pareto_mask([pt(1, 0), pt(3, 0), pt(3, 0), pt(2, 0)], [("val_top1", "max")]) == [False, True, True, False]


def test_three_objectives():
    objectives = ACC_LAT + [("gflops", "min")]
    points = [
        pt(90, 10, gflops=2.0),  # best accuracy
        pt(80, 5, gflops=2.0),  # fastest
        pt(80, 6, gflops=1.0),  # cheapest: worse than #1 in latency only, so still on the front
        pt(79, 6, gflops=1.5),  # dominated by #2 (not by #1: it has fewer flops than #1)
        pt(90, 10, gflops=2.5),  # dominated by #0 (same acc and latency, more flops)
    ]
    assert pareto_mask(points, objectives) == [True, True, True, False, False]
    # without gflops, #2 is dominated by #1, and #4 ties #0
    assert pareto_mask(points, ACC_LAT) == [True, True, False, False, True]


def test_extra_metrics_are_ignored():
    points = [pt(90, 10, speedup=1.0), pt(80, 5, speedup=0.1)]
    assert pareto_mask(points, ACC_LAT) == [True, True]


def _brute_force(points, objectives):
    def complete(p):
        return all(isinstance(p.get(m), (int, float)) and not math.isnan(p[m]) for m, _ in objectives)

    def better_or_equal(a, b, m, mode):
        return a[m] >= b[m] if mode == "max" else a[m] <= b[m]

    def strictly_better(a, b, m, mode):
        return a[m] > b[m] if mode == "max" else a[m] < b[m]

    out = []
    for p in points:
        if not complete(p):
            out.append(False)
            continue
        beaten = any(
            complete(q)
            and all(better_or_equal(q, p, m, d) for m, d in objectives)
            and any(strictly_better(q, p, m, d) for m, d in objectives)
            for q in points
        )
        out.append(not beaten)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_random_points_match_brute_force(seed):
    rnd = random.Random(seed)
    metrics = ["a", "b", "c"]
    n_obj = rnd.randint(1, 3)
    objectives = [(m, rnd.choice(["max", "min"])) for m in metrics[:n_obj]]
    points = []
    for _ in range(rnd.randint(0, 25)):
        p = {m: float(rnd.randint(0, 5)) for m in metrics}  # small integer grid: many ties
        if rnd.random() < 0.15:
            p[rnd.choice(metrics)] = float("nan")
        if rnd.random() < 0.1:
            del p[rnd.choice(metrics)]
        points.append(p)
    mask = pareto_mask(points, objectives)
    assert mask == _brute_force(points, objectives)
    complete = [p for p, ok in zip(points, _brute_force(points, objectives)) if ok]
    # no front point dominates another, and the front is non-empty whenever one point is complete
    for p, q in itertools.permutations(complete, 2):
        sign = [1 if d == "max" else -1 for _, d in objectives]
        assert not dominates([s * p[m] for s, (m, _) in zip(sign, objectives)], [s * q[m] for s, (m, _) in zip(sign, objectives)])
    if any(all(m in p and not math.isnan(p[m]) for m, _ in objectives) for p in points):
        assert any(mask)
