"""Hypervolume (moocore) against hand-computed boxes and a brute-force grid count; the reference-point
rule; non-dominated sorting and crowding distance (MO-ASHA's ranking); the hypervolume a finalized
sweep logs."""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from mlflow import MlflowClient

from orchestrator.pareto import (
    METRIC_MODES, crowding_distances, default_reference, dense_costs, dominates, hypervolume, nadir, nondominated_ranks,
    reference_point,
)
from orchestrator.tracking import HV_REFERENCE_TAG, OBJECTIVES_TAG, REFERENCE_ROLE, ROLE_TAG, SEARCHED_TAG, TRIAL_TAG, Tracker

ACC_LAT = [("val_top1", "max"), ("latency_ms", "min")]


def pt(acc, lat, **more):
    return {"val_top1": acc, "latency_ms": lat, **more}


def test_metric_modes_mirror_the_config():
    from orchestrator.config import METRICS

    assert METRIC_MODES == METRICS


def test_one_point_is_its_box():
    assert hypervolume([pt(90, 3)], ACC_LAT, {"val_top1": 10, "latency_ms": 5}) == pytest.approx(80 * 2)
    assert hypervolume([pt(90, 3)], ACC_LAT, [10, 5]) == pytest.approx(160)  # reference in objectives' order


def test_two_points_overlap_counted_once():
    # boxes 80x2 (acc 10..90, lat 3..5) and 60x4 (acc 10..70, lat 1..5) overlap in 60x2
    assert hypervolume([pt(90, 3), pt(70, 1)], ACC_LAT, {"val_top1": 10, "latency_ms": 5}) == pytest.approx(160 + 240 - 120)


def test_dominated_and_outside_points_add_nothing():
    ref = {"val_top1": 10, "latency_ms": 5}
    base = hypervolume([pt(90, 3)], ACC_LAT, ref)
    assert hypervolume([pt(90, 3), pt(80, 4)], ACC_LAT, ref) == pytest.approx(base)  # dominated
    assert hypervolume([pt(90, 3), pt(99, 6), pt(5, 1), pt(50, 5)], ACC_LAT, ref) == pytest.approx(base)  # outside or on the box
    assert hypervolume([pt(90, 3), {"val_top1": 99}, pt(float("nan"), 1)], ACC_LAT, ref) == pytest.approx(base)  # incomplete


def test_no_point_is_zero():
    assert hypervolume([], ACC_LAT, {"val_top1": 10, "latency_ms": 5}) == 0.0
    assert hypervolume([pt(5, 9)], ACC_LAT, {"val_top1": 10, "latency_ms": 5}) == 0.0


def test_reference_must_cover_every_objective():
    with pytest.raises(ValueError, match="latency_ms"):
        hypervolume([pt(90, 3)], ACC_LAT, {"val_top1": 10})
    with pytest.raises(ValueError):
        hypervolume([pt(90, 3)], ACC_LAT, [10])


def _grid_volume(points, objectives, reference):
    """Brute force for integer coordinates: count the unit cells that some point dominates."""
    sign = [1 if mode == "max" else -1 for _, mode in objectives]
    ref = [s * reference[m] for s, (m, _) in zip(sign, objectives)]
    pts = [[s * p[m] for s, (m, _) in zip(sign, objectives)] for p in points]
    tops = [max([r] + [q[k] for q in pts]) for k, r in enumerate(ref)]
    count = 0
    for cell in itertools.product(*[range(int(r), int(t)) for r, t in zip(ref, tops)]):
        # the cell [c, c+1]^d is dominated if some point is >= c+1 in every coordinate (larger is better)
        if any(all(q[k] >= c + 1 for k, c in enumerate(cell)) for q in pts):
            count += 1
    return count


@pytest.mark.parametrize("seed", range(25))
def test_random_points_match_a_grid_count(seed):
    rnd = random.Random(seed)
    n_obj = rnd.choice([1, 2, 3])
    objectives = [(m, rnd.choice(["max", "min"])) for m in ("a", "b", "c")[:n_obj]]
    reference = {m: (0 if mode == "max" else 9) for m, mode in objectives}
    points = [{m: rnd.randint(-1, 10) for m, _ in objectives} for _ in range(rnd.randint(0, 12))]
    assert hypervolume(points, objectives, reference) == pytest.approx(_grid_volume(points, objectives, reference))


def test_default_reference_rule():
    objectives = [("val_top1", "max"), ("latency_ms", "min"), ("gflops", "min"), ("throughput_ips", "max"), ("speedup", "max")]
    dense = {"latency_ms": 4.0, "gflops": 1.5, "throughput_ips": 200.0}
    assert default_reference(objectives, num_classes=10, dense=dense) == {
        "val_top1": 10.0, "latency_ms": 4.0, "gflops": 1.5, "throughput_ips": 200.0, "speedup": 1.0,
    }
    # an unusual direction, or nothing known, has no natural reference
    assert default_reference([("val_top1", "min"), ("latency_ms", "max")], 10, dense) == {}
    assert default_reference(ACC_LAT) == {}


def test_dense_costs_prefer_the_reference_run_then_the_trials_median():
    trials = [{"dense_latency_ms": v, "dense_gflops": 2.0} for v in (3.0, 5.0, 4.0, 100.0)]
    assert dense_costs(None, trials) == {"latency_ms": 4.5, "gflops": 2.0}
    assert dense_costs({"latency_ms": 3.9, "val_top1": 80.0}, trials) == {"latency_ms": 3.9, "gflops": 2.0}
    assert dense_costs(None, []) == {}


def test_reference_point_recorded_values_win():
    point = reference_point(ACC_LAT, recorded={"latency_ms": 7.0, "other": 1.0}, num_classes="100", reference_run={"latency_ms": 4.0})
    assert point == {"val_top1": 1.0, "latency_ms": 7.0}
    assert reference_point(ACC_LAT, num_classes="nope", reference_run={"latency_ms": 4.0}) == {"latency_ms": 4.0}


def test_nadir_is_the_worst_of_each_objective():
    assert nadir([pt(90, 3), pt(70, 1), {"val_top1": 1}], ACC_LAT) == {"val_top1": 70, "latency_ms": 3}
    assert nadir([], ACC_LAT) == {}


# ---- non-dominated sorting and crowding distance ------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_nondominated_ranks_peel_fronts(seed):
    rnd = random.Random(seed)
    dims = rnd.choice([1, 2, 3])
    values = [[rnd.randint(0, 4) for _ in range(dims)] for _ in range(rnd.randint(1, 15))]
    expected, left, front = [None] * len(values), set(range(len(values))), 0
    while left:
        layer = {i for i in left if not any(dominates(values[j], values[i]) for j in left)}
        for i in layer:
            expected[i] = front
        left -= layer
        front += 1
    assert nondominated_ranks(values) == expected


def test_crowding_distance_by_hand():
    # a front of four points (larger is better in both): the extremes are infinite
    values = [[90, -10], [85, -6], [80, -4], [70, -3]]
    d = crowding_distances(values)
    assert math.isinf(d[0]) and math.isinf(d[3])
    assert d[1] == pytest.approx((90 - 80) / 20 + (-4 - -10) / 7)
    assert d[2] == pytest.approx((85 - 70) / 20 + (-3 - -6) / 7)
    assert all(math.isinf(x) for x in crowding_distances([[1, 2], [2, 1]]))
    assert crowding_distances([[1, 1], [1, 1], [1, 1]])[1] == 0.0  # all equal: nothing to spread


# ---- the hypervolume a finalized sweep logs ------------------------------------------------------------


def _sweep(tracker, points, reference_run=None, num_classes=10, dense_latency=None):
    parent = tracker.start_run(
        "s", params={"model.num_classes": num_classes}, tags={ROLE_TAG: "sweep", SEARCHED_TAG: "r", OBJECTIVES_TAG: json.dumps(ACC_LAT)},
    )
    if reference_run:
        rid = tracker.start_run("dense", {}, {ROLE_TAG: REFERENCE_ROLE, "method": "dense"}, parent_id=parent)
        tracker.log_metrics(rid, reference_run)
        tracker.end_run(rid)
    for i, (acc, lat, status) in enumerate(points):
        rid = tracker.start_run(f"t{i}", {"r": i}, {ROLE_TAG: "trial", TRIAL_TAG: f"t{i}"}, parent_id=parent)
        metrics = {"val_top1": acc, "latency_ms": lat}
        if dense_latency:
            metrics["dense_latency_ms"] = dense_latency
        tracker.log_metrics(rid, metrics)
        tracker.end_run(rid, status)
    return parent


def test_finalize_logs_the_front_hypervolume_and_its_reference(mlflow_tmp):
    tracker = Tracker(mlflow_tmp, "hv")
    parent = _sweep(
        tracker, [(90.0, 3.0, "FINISHED"), (70.0, 1.0, "FINISHED"), (60.0, 4.0, "FINISHED"), (99.0, 0.5, "FAILED")],
        reference_run={"val_top1": 91.0, "latency_ms": 5.0},
    )
    tracker.finalize_sweep(parent, ACC_LAT, errored={"t3"})
    client = MlflowClient(mlflow_tmp)
    run = client.get_run(parent)
    assert json.loads(run.data.tags[HV_REFERENCE_TAG]) == {"val_top1": 10.0, "latency_ms": 5.0}
    (hv,) = client.get_metric_history(parent, "hypervolume")
    # the failed trial's unbeatable point is not on the front; the dense run sits on the box's edge
    assert hv.step == 3 and hv.value == pytest.approx(hypervolume([pt(90, 3), pt(70, 1)], ACC_LAT, {"val_top1": 10, "latency_ms": 5}))
    assert hv.value == pytest.approx(80 * 2 + 60 * 4 - 60 * 2)


def test_finalize_without_a_reference_run_takes_the_trials_dense_latency(mlflow_tmp):
    tracker = Tracker(mlflow_tmp, "hv2")
    parent = _sweep(tracker, [(90.0, 3.0, "FINISHED")], num_classes=4, dense_latency=6.0)
    tracker.finalize_sweep(parent, ACC_LAT)
    client = MlflowClient(mlflow_tmp)
    assert json.loads(client.get_run(parent).data.tags[HV_REFERENCE_TAG]) == {"val_top1": 25.0, "latency_ms": 6.0}
    assert client.get_metric_history(parent, "hypervolume")[0].value == pytest.approx((90 - 25) * (6 - 3))


def test_a_recorded_reference_point_is_kept(mlflow_tmp):
    tracker = Tracker(mlflow_tmp, "hv3")
    parent = _sweep(tracker, [(90.0, 3.0, "FINISHED")], reference_run={"val_top1": 91.0, "latency_ms": 5.0})
    tracker.set_tags(parent, {HV_REFERENCE_TAG: json.dumps({"val_top1": 50.0, "latency_ms": 4.0})})
    tracker.finalize_sweep(parent, ACC_LAT)
    assert MlflowClient(mlflow_tmp).get_metric_history(parent, "hypervolume")[0].value == pytest.approx(40 * 1)


def test_no_hypervolume_without_a_reference_value(mlflow_tmp):
    tracker = Tracker(mlflow_tmp, "hv4")
    parent = _sweep(tracker, [(90.0, 3.0, "FINISHED")])  # no dense latency anywhere
    tracker.finalize_sweep(parent, ACC_LAT)
    client = MlflowClient(mlflow_tmp)
    assert client.get_metric_history(parent, "hypervolume") == []
    assert HV_REFERENCE_TAG not in client.get_run(parent).data.tags


def test_infinite_values_neither_crash_nor_count():
    """moocore 0.3 crashes on infinities with three or more objectives: the front falls back to
    pairwise comparison, and the hypervolume ignores such points."""
    from orchestrator.pareto import pareto_mask

    objectives = [("a", "max"), ("b", "max"), ("c", "min")]
    points = [{"a": math.inf, "b": 0, "c": 1}, {"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 2}, {"a": 0, "b": -math.inf, "c": 0}]
    assert pareto_mask(points, objectives) == [True, True, False, True]
    ref = {"a": -1, "b": -1, "c": 3}
    assert hypervolume(points, objectives, ref) == pytest.approx(hypervolume(points[1:3], objectives, ref)) == pytest.approx(2 * 2 * 2)
    with pytest.raises(ValueError, match="finite"):
        nondominated_ranks([[1.0, math.inf]])
