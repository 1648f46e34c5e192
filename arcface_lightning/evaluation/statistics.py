"""Paired comparisons for sweeps and head comparisons: per-replicate differences against a baseline, their mean and a
95% Student t interval (standard library only: scipy is not a dependency, so the t quantile is computed here).

A replicate is what a run repeats with everything else fixed: a seed, and in a k-fold sweep a fold too. Two runs pair
when they share their replicate (same seed, same fold), so a difference cancels what the seed or fold does to both;
runs without a partner are left out and counted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping
from typing import Any

LEVEL = 0.95
METHOD = "Student t"


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, by its continued fraction (modified Lentz), taken on the
    side of x where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * result


def t_cdf(t: float, dof: float) -> float:
    """P(T ≤ t) for Student's t with `dof` degrees of freedom."""
    tail = 0.5 * regularized_beta(dof / (dof + t * t), dof / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T ≤ t) = p, by bisection on t_cdf (to double precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p!r} is invalid; allowed: 0 < p < 1")
    if not (math.isfinite(dof) and dof > 0):
        raise ValueError(f"t_quantile: dof={dof!r} is invalid; allowed: a finite number > 0")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, dof) < p else (low, middle)
    return (low + high) / 2.0


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean, sample standard deviation and the half-width of the `level` Student t interval of the mean; needs 2 or
    more values."""
    if len(values) < 2:
        raise ValueError(f"t_interval needs 2 or more values, got {len(values)}")
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    return mean, sd, t_quantile(0.5 + level / 2.0, len(values) - 1) * sd / math.sqrt(len(values))


def paired(baseline: Mapping[Hashable, float], other: Mapping[Hashable, float]) -> dict[str, Any]:
    """`other` − `baseline`, replicate by replicate (the mappings' keys): how many paired, how many left out (a
    replicate only one side has), the mean difference, its sd and 95% t interval (NaN with fewer than 2 pairs) and a
    note saying which of those it is."""
    shared = [key for key in other if key in baseline]
    differences = [other[key] - baseline[key] for key in shared]
    entry: dict[str, Any] = {"paired": len(shared), "unpaired": len(set(baseline) ^ set(other))}
    entry.update(diff_mean=statistics.fmean(differences) if differences else math.nan)
    entry.update(diff_sd=math.nan, low=math.nan, high=math.nan)
    if len(differences) < 2:
        entry["note"] = f"{len(differences)} paired replicate(s): fewer than 2, no interval"
        return entry
    mean, sd, half = t_interval(differences)
    entry.update(diff_sd=sd, low=mean - half, high=mean + half)
    entry["note"] = "above 0" if mean - half > 0 else "below 0" if mean + half < 0 else "0 inside"
    return entry


def interval_text(entry: Mapping[str, Any]) -> str:
    """A paired entry in one cell: `+0.0200 [-0.0048, +0.0448] n=3`, or the note when there is no interval."""
    if math.isnan(entry["low"]):
        return entry["note"]
    return f"{entry['diff_mean']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}] n={entry['paired']}"


# ---------------------------------------------------------------------------------------- a sweep's grid points

Row = dict[str, Any]
SEED, FOLD = "seed", "data.fold"
REPLICATES = (SEED, FOLD)  # a sweep's keys that repeat a grid point rather than move it
EXAMPLE = "report.baseline=head.s=30,head.m=0.3"


def replicate(row: Row) -> tuple[Any, Any]:
    return row.get(SEED), row.get(FOLD)


def point_text(point: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in point.items())


def parse_point(value: Any, name: str = "report.baseline") -> dict[str, Any] | None:
    """A grid point named by its overrides, `head.s=30,head.m=0.3`, or as a mapping {head.s: 30, head.m: 0.3};
    None (no baseline) for null or an empty string."""
    from arcface_lightning.evaluation.sweep_jobs import number

    if value is None or value == "":
        return None
    allowed = f"a grid point as its overrides, e.g. {EXAMPLE}"
    if isinstance(value, Mapping):
        items = [(str(key), number(v) if isinstance(v, str) else v) for key, v in value.items()]
    elif isinstance(value, str):
        parts = [part.partition("=") for part in value.split(",")]
        if not all(key.strip() and equals and v.strip() for key, equals, v in parts):
            raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")
        items = [(key.strip(), number(v.strip())) for key, _, v in parts]
    else:
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")
    point = dict(items)
    if not point or len(point) < len(items):
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}, each key once")
    return point


def grid_order(point: tuple) -> list[tuple]:
    """Numbers in numeric order (4 before 16), then anything else by its text."""
    return [(0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value)) for value in point]


def paired_points(rows: list[Row], keys: list[str], baseline: dict[str, Any], metric: str) -> list[Row]:
    """Each grid point (values of `keys`) against its baseline point, `metric` paired by replicate (seed, fold) over
    the finished jobs. The baseline names some of the keys; a point's baseline is the point with those replaced, so
    with other keys swept each of their values has its own baseline. Raises ValueError (one line) when the baseline
    names a key that is not a grid key or no point of the grid."""
    points: dict[tuple, list[Row]] = {}
    for row in rows:
        points.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    text = point_text(baseline)
    for key in baseline:
        if key in REPLICATES:
            raise ValueError(f"report.baseline={text!r}: {key} is a replicate (runs are paired by seed and fold), "
                             f"not a grid key; name the point by: {', '.join(keys) or 'nothing is swept'}")  # fmt: skip
        if key not in keys:
            raise ValueError(f"report.baseline={text!r}: {key} is not a grid key of this sweep; the grid keys: "
                             f"{', '.join(keys) or 'none'}")  # fmt: skip
    named = [p for p in points if all(p[keys.index(k)] == v for k, v in baseline.items())]
    if not named:
        listed = "; ".join(point_text(dict(zip(keys, p, strict=True))) for p in sorted(points, key=grid_order))
        raise ValueError(f"report.baseline={text!r} names no grid point; the points: {listed}")

    def values(point: tuple) -> dict[tuple, float]:
        ok = [r for r in points.get(point, []) if r.get("status") == "ok" and isinstance(r.get(metric), (int, float))]
        return {replicate(r): float(r[metric]) for r in ok}

    table = []
    for point in sorted(points, key=grid_order):
        base = tuple(baseline.get(k, v) for k, v in zip(keys, point, strict=True))
        if base == point:
            continue
        entry: Row = {**dict(zip(keys, point, strict=True)), "baseline": point_text(dict(zip(keys, base, strict=True)))}
        if base not in points:
            entry.update(paired=0, unpaired=len(values(point)), note="the grid has no such baseline point")
        else:
            entry.update(paired(values(base), values(point)))
        table.append(entry)
    return table


def aggregate(rows: list[Row], keys: list[str], metrics: tuple[str, ...]) -> list[Row]:
    """Mean and sample std over replicates (seeds, folds) of each metric, per point of `keys` (ok jobs only), with
    how many distinct seeds and folds the finished jobs cover."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    table = []
    for point, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        entry: Row = dict(zip(keys, point, strict=True))
        entry.update(seeds=len({r.get(SEED) for r in ok}), folds=len({r.get(FOLD) for r in ok}))
        entry.update(n=len(ok), failed=len(members) - len(ok))
        for metric in metrics:
            values = [r[metric] for r in ok if r.get(metric) is not None]
            entry[f"{metric} mean"] = statistics.fmean(values) if values else math.nan
            entry[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        table.append(entry)
    return sorted(table, key=lambda e: -e[f"{metrics[0]} mean"] if e["n"] else math.inf)


def paired_groups(runs: Mapping[str, list[Row]], baseline: str, columns: list[str], by: str = SEED) -> list[Row]:
    """Each group of runs (a head's) against the baseline group's, every column paired by `by` (the seed)."""

    def values(group: str, column: str) -> dict[Any, float]:
        return {r.get(by): float(r[column]) for r in runs[group] if isinstance(r.get(column), (int, float))}

    return [
        {"head": name, "baseline": baseline, "metric": column, **paired(values(baseline, column), values(name, column))}
        for name in runs
        if name != baseline
        for column in columns
    ]
