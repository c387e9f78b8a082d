"""Pareto fronts over several objectives, their hypervolume, and the non-dominated sorting MO-ASHA
promotes by (pure functions, no MLflow or Ray; moocore does the hypervolume and the sorting)."""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

__all__ = [
    "dominates", "pareto_mask", "hypervolume", "default_reference", "dense_costs", "reference_point", "nadir", "nondominated_ranks",
    "crowding_distances", "survives_halving", "DENSE_METRIC", "METRIC_MODES",
]


def _values(point: Mapping[str, float], objectives: Sequence[tuple[str, str]]) -> list[float] | None:
    """The point's objective values, each turned into 'larger is better'; None if one is missing/NaN."""
    out = []
    for metric, mode in objectives:
        v = point.get(metric)
        if (type(v) is not float and not isinstance(v, numbers.Real)) or math.isnan(v):  # Real: numpy scalars too (floats: no ABC check)
            return None
        out.append(float(v) if mode == "max" else -float(v))
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere (larger is better)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_mask(points: Sequence[Mapping[str, float]], objectives: Sequence[tuple[str, str]]) -> list[bool]:
    """For each point, whether it is on the Pareto front of ``objectives`` (``[(metric, "max"|"min"), ...]``).

    A point lacking any objective (a failed or early-stopped trial) is never on the front. Points with
    identical objective values are all kept. moocore's dimension sweep: O(n log n) for up to three
    objectives (10,000 points in milliseconds, where comparing every pair took minutes).
    """
    import numpy as np
    import moocore

    values = [_values(p, objectives) for p in points]
    complete = [i for i, v in enumerate(values) if v is not None]
    if any(not math.isfinite(x) for i in complete for x in values[i]):  # moocore 0.3 crashes on infinities (3+ objectives)
        return [v is not None and not any(w is not None and dominates(w, v) for w in values) for v in values]
    mask = [False] * len(values)
    if complete:
        keep = moocore.is_nondominated(np.asarray([values[i] for i in complete], dtype=float), maximise=True, keep_weakly=True)
        for i, on in zip(complete, keep):
            mask[i] = bool(on)
    return mask


# ---- hypervolume -----------------------------------------------------------------------------------

#: The dense model's own measurement of each cost metric, as a trial records it beside its own.
DENSE_METRIC: dict[str, str] = {"latency_ms": "dense_latency_ms", "throughput_ips": "dense_throughput_ips", "gflops": "dense_gflops"}
_CHANCE = ("val_top1", "val_top5")  # percent: chance is 100 / num_classes
_RATIO = ("speedup", "throughput_ratio")  # relative to the dense model: 1.0 is the dense model itself
#: The better direction of each metric a trial reports (a mirror of ``orchestrator.config.METRICS``, which needs torch).
METRIC_MODES = {
    "val_top1": "max", "val_top5": "max", "latency_ms": "min", "throughput_ips": "max", "speedup": "max",
    "throughput_ratio": "max", "gflops": "min",
}


def hypervolume(
    points: Sequence[Mapping[str, float]], objectives: Sequence[tuple[str, str]], reference: Mapping[str, float] | Sequence[float],
) -> float:
    """The hypervolume dominated by ``points`` on ``objectives`` and bounded by ``reference``.

    Computed by moocore (exact; O(n log n) for 2 and 3 objectives) as a minimisation problem: values
    of ``max`` objectives (and their reference) are negated first. Points missing an objective (or
    with an infinite one) or not strictly better than the reference in every objective add nothing;
    no point gives 0.0.

    Args:
        points: metrics per point, e.g. ``{"val_top1": 91.0, "latency_ms": 3.2}``.
        objectives: ``[(metric, "max"|"min"), ...]``.
        reference: a value per objective (a mapping by metric, or a sequence in objectives' order).
    """
    import numpy as np
    import moocore

    if isinstance(reference, Mapping):
        missing = [m for m, _ in objectives if not _finite(reference.get(m))]
        if missing:
            raise ValueError(f"hypervolume reference point lacks {', '.join(missing)}")
        reference = [reference[m] for m, _ in objectives]
    if len(reference) != len(objectives) or not all(_finite(r) for r in reference):
        raise ValueError(f"hypervolume reference point {list(reference)} does not match objectives {list(objectives)}")
    sign = [-1.0 if mode == "max" else 1.0 for _, mode in objectives]
    ref = [s * float(r) for s, r in zip(sign, reference)]
    rows = [[s * v for s, v in zip(sign, (float(p[m]) for m, _ in objectives))] for p in points if _values(p, objectives) is not None]
    # only finite points inside the box add volume (an infinite one would make it infinite; moocore 0.3 crashes on them)
    rows = [r for r in rows if all(math.isfinite(x) and x < y for x, y in zip(r, ref))]
    if not rows:
        return 0.0
    return float(moocore.hypervolume(np.asarray(rows, dtype=float), ref=ref))


def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and math.isfinite(v)


def default_reference(
    objectives: Sequence[tuple[str, str]], num_classes: int | None = None, dense: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The natural hypervolume reference value of each objective that has one.

    Accuracy (``val_top1``/``val_top5``, max) at chance, ``100 / num_classes``; a cost metric
    (``latency_ms``/``gflops`` min, ``throughput_ips`` max) at the dense model's own value
    (``dense``, keyed by the cost metric's name); ``speedup``/``throughput_ratio`` (max) at 1.0, the
    dense model. So the hypervolume is the objective space a sweep won over "as good as chance and no
    cheaper than dense". An objective is left out when it has no such value (its mode is the
    unusual one, or ``num_classes``/``dense`` is not known).
    """
    out: dict[str, float] = {}
    dense = dense or {}
    for metric, mode in objectives:
        if METRIC_MODES.get(metric) != mode:
            continue
        if metric in _CHANCE and num_classes:
            out[metric] = 100.0 / int(num_classes)
        elif metric in _RATIO:
            out[metric] = 1.0
        elif metric in DENSE_METRIC and _finite(dense.get(metric)):
            out[metric] = float(dense[metric])
    return out


def dense_costs(reference_run: Mapping[str, float] | None = None, trials: Sequence[Mapping[str, float]] = ()) -> dict[str, float]:
    """The dense model's cost metrics: the sweep's reference run's own (``latency_ms``, ...) where
    measured, else the median of what trials recorded beside their own (``dense_latency_ms``, ...)."""
    out: dict[str, float] = {}
    for metric, dense_key in DENSE_METRIC.items():
        if reference_run and _finite(reference_run.get(metric)):
            out[metric] = float(reference_run[metric])
            continue
        values = sorted(float(t[dense_key]) for t in trials if _finite(t.get(dense_key)))
        if values:
            n = len(values)
            out[metric] = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    return out


def reference_point(
    objectives: Sequence[tuple[str, str]], recorded: Mapping[str, float] | None = None, num_classes: int | str | None = None,
    reference_run: Mapping[str, float] | None = None, trials: Sequence[Mapping[str, float]] = (),
) -> dict[str, float]:
    """A sweep's hypervolume reference point, by the rule of ``default_reference`` with the dense
    cost of ``dense_costs(reference_run, trials)``; values already ``recorded`` for the sweep win.
    Objectives without a value are left out (the caller decides: skip, or fall back to ``nadir``)."""
    try:
        classes = int(float(num_classes)) if num_classes not in (None, "") else None
    except (TypeError, ValueError):
        classes = None
    out = default_reference(objectives, classes if classes and classes > 0 else None, dense_costs(reference_run, trials))
    wanted = {m for m, _ in objectives}
    out.update({m: float(v) for m, v in (recorded or {}).items() if m in wanted and _finite(v)})
    return {m: out[m] for m, _ in objectives if m in out}


def nadir(points: Sequence[Mapping[str, float]], objectives: Sequence[tuple[str, str]]) -> dict[str, float]:
    """The worst value of each objective over the points that have them all (a fallback reference)."""
    values = [v for v in (_values(p, objectives) for p in points) if v is not None]
    if not values:
        return {}
    worst = [min(col) for col in zip(*values)]  # larger is better in _values
    return {m: (w if mode == "max" else -w) for (m, mode), w in zip(objectives, worst)}


# ---- non-dominated sorting (MO-ASHA's ranking) -------------------------------------------------------


def nondominated_ranks(values: Sequence[Sequence[float]]) -> list[int]:
    """Front index of each point (0: not dominated by any; 1: only by front 0, ...), larger is better
    in every coordinate. Equal points share a front."""
    import numpy as np
    import moocore

    if len(values) == 0:
        return []
    if any(not math.isfinite(x) for v in values for x in v):
        raise ValueError("nondominated_ranks needs finite values")  # moocore 0.3 crashes on infinities
    return [int(r) for r in moocore.pareto_rank(np.asarray(values, dtype=float), maximise=True)]


def crowding_distances(values: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II crowding distance of each point within one front (larger: more isolated, preferred).

    Per coordinate the points are sorted (stable: equal values keep their order); the two extremes
    get infinity and every other point the normalised gap between its two neighbours, summed over
    coordinates. A coordinate where all points are equal adds nothing; fronts of one or two points
    are all infinite.
    """
    n = len(values)
    dist = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for k in range(len(values[0])):
        order = sorted(range(n), key=lambda i: values[i][k])
        lo, hi = values[order[0]][k], values[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for pos in range(1, n - 1):
            i = order[pos]
            dist[i] += (values[order[pos + 1]][k] - values[order[pos - 1]][k]) / (hi - lo)
    return dist


def survives_halving(
    rung: Mapping[str, Mapping[str, float]], objectives: Sequence[tuple[str, str]], reduction_factor: float, candidate: str,
) -> bool:
    """Multi-objective successive halving at one rung: does ``candidate`` stay in the top
    ``ceil(n / reduction_factor)`` of the rung's ``n`` trials?

    The rung's trials (``rung``: trial id -> its objective values, the candidate's included) are
    ranked by non-dominated sorting (front 0 first), and within a front by crowding distance (most
    isolated first), as NSGA-II does. The candidate survives if fewer than ``ceil(n / rf)`` trials
    rank strictly ahead of it: exact ties are resolved in its favour, as ASHA keeps a trial equal to
    its cutoff. Only the objectives every trial of the rung reported are compared (the cost metrics
    may be missing from per-epoch reports); with none in common the candidate survives.
    """
    common = [(m, mode) for m, mode in objectives if all(_finite(v.get(m)) for v in rung.values())]
    if not common or candidate not in rung:
        return True
    ids = list(rung)
    values = [[float(rung[t][m]) if mode == "max" else -float(rung[t][m]) for m, mode in common] for t in ids]
    ranks = nondominated_ranks(values)
    crowd = [0.0] * len(ids)
    for front in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == front]
        for i, d in zip(members, crowding_distances([values[i] for i in members])):
            crowd[i] = d
    c = ids.index(candidate)
    ahead = sum(1 for i in range(len(ids)) if i != c and (ranks[i], -crowd[i]) < (ranks[c], -crowd[c]))
    return ahead < math.ceil(len(ids) / reduction_factor)
