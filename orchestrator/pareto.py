"""Pareto fronts over several objectives (pure functions, no MLflow or Ray)."""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

__all__ = ["dominates", "pareto_mask"]


def _values(point: Mapping[str, float], objectives: Sequence[tuple[str, str]]) -> list[float] | None:
    """The point's objective values, each turned into 'larger is better'; None if one is missing/NaN."""
    out = []
    for metric, mode in objectives:
        v = point.get(metric)
        if not isinstance(v, numbers.Real) or math.isnan(v):  # Real: numpy scalars count too
            return None
        out.append(float(v) if mode == "max" else -float(v))
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere (larger is better)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_mask(points: Sequence[Mapping[str, float]], objectives: Sequence[tuple[str, str]]) -> list[bool]:
    """For each point, whether it is on the Pareto front of ``objectives`` (``[(metric, "max"|"min"), ...]``).

    A point lacking any objective (a failed or early-stopped trial) is never on the front. Points with
    identical objective values are all kept.
    """
    values = [_values(p, objectives) for p in points]
    return [
        v is not None and not any(w is not None and dominates(w, v) for w in values)
        for v in values
    ]
