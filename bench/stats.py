"""Pure helpers for the benchmark numbers: percentiles, summaries, ratios."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Iterable[float], percentiles: Sequence[float] = (), digits: int = 3) -> dict:
    """n, median, min, max and the asked percentiles (``p50``, ``p99``...), rounded."""
    data = [float(v) for v in values]
    if not data:
        return {"n": 0}
    out = {"n": len(data), "median": percentile(data, 50), "min": min(data), "max": max(data)}
    out.update({f"p{p:g}": percentile(data, p) for p in percentiles})
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in out.items()}


def ratio(value: float | None, baseline: float | None, digits: int = 2) -> float | None:
    """``value / baseline``, None when either is missing or the baseline is 0."""
    if value is None or not baseline:
        return None
    return round(value / baseline, digits)


def spread(stats: dict, unit: str = "", digits: int = 1) -> str:
    """``median (min-max)`` text of a :func:`summary`."""
    if not stats or not stats.get("n"):
        return "n/a"
    fmt = f"{{:.{digits}f}}"
    median = fmt.format(stats["median"]) + unit
    if stats["n"] == 1:
        return median
    return f"{median} ({fmt.format(stats['min'])}\u2013{fmt.format(stats['max'])})"
