"""The sweep report's figures over scale s × margin m (report.py writes them): the heatmap of a grid, the scatter of
points that form none (an Optuna search), and one curve per s of the metric against m with error bars over the
replicates (seeds, folds). Each function returns a matplotlib `Figure` (object API, no pyplot: no backend chosen, no
figure to close); matplotlib is imported only when a figure is drawn, so the Hydra callback does not load it.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from arcface_lightning.core.checks import is_number
from arcface_lightning.evaluation.statistics import REPLICATES, aggregate
from arcface_lightning.evaluation.sweep_jobs import Row

S, M = "head.s", "head.m"


def new_figure(**kwargs: Any) -> Any:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def other_keys(keys: list[str]) -> list[str]:
    """The swept keys a figure is drawn per value of: all but s, m and the replicates (averaged within a figure)."""
    return [k for k in keys if k not in (S, M, *REPLICATES)]


def s_m_subsets(rows: list[Row], keys: list[str]) -> Iterator[tuple[str, list[Row], bool]]:
    """Per combination of the other swept keys: its name (for file names), its jobs with numeric s and m, and
    whether their s and m form a full grid."""
    drawn = [r for r in rows if is_number(r.get(S)) and is_number(r.get(M))]  # a job refused head.s=abc has no place
    others = other_keys(keys)
    for point in sorted({tuple(r.get(k) for k in others) for r in drawn}, key=repr):
        subset = [r for r in drawn if tuple(r.get(k) for k in others) == point]
        suffix = re.sub(r"[^\w.,=+-]", "_", ",".join(f"{k}={v}" for k, v in zip(others, point, strict=True)))
        is_grid = len({(r[S], r[M]) for r in subset}) == len({r[S] for r in subset}) * len({r[M] for r in subset})
        yield suffix, subset, is_grid


def has_curves(subset: list[Row], is_grid: bool) -> bool:
    """Curves need a full grid with at least 2 values of s (the curves) and 2 of m (their points)."""
    return is_grid and len({r[S] for r in subset}) > 1 and len({r[M] for r in subset}) > 1


def curve_table(rows: list[Row], keys: list[str], metrics: tuple[str, ...]) -> list[Row]:
    """The curves' points as rows (the other swept keys, s, m; sorted), for every grid of at least 2 s × 2 m."""
    if S not in keys or M not in keys:
        return []
    table = []
    for _, subset, is_grid in s_m_subsets(rows, keys):
        if has_curves(subset, is_grid):
            entries = aggregate(subset, [*other_keys(keys), S, M], metrics)
            table += sorted(entries, key=lambda e: (e[S], e[M]))
    return table


def cell_label(entry: Row | None, rows_at_cell: list[Row], score: str) -> str:
    if entry is None or entry["n"] == 0:
        return "\n".join(sorted({r.get("status", "failed") for r in rows_at_cell})) or "—"
    text = f"{entry[f'{score} mean']:.4f}"
    if entry["n"] > 1:
        text += f"\n±{entry[f'{score} std']:.4f}"
    return text + (f"\n{entry['failed']} failed" if entry["failed"] else "")


def grid_figure(rows: list[Row], title: str, metrics: tuple[str, str, str]) -> Any:
    """The test score over s (rows) × m (columns): mean over replicates, ± std in each cell, ★ = best mean
    selection metric."""
    from matplotlib.patches import Rectangle

    select, score, _ = metrics
    s_values = sorted({r[S] for r in rows})
    m_values = sorted({r[M] for r in rows})
    cells = {(e[S], e[M]): e for e in aggregate(rows, [S, M], metrics)}
    grid = np.full((len(s_values), len(m_values)), np.nan)
    for (i, s), (j, m) in itertools.product(enumerate(s_values), enumerate(m_values)):
        if (s, m) in cells and cells[(s, m)]["n"]:
            grid[i, j] = cells[(s, m)][f"{score} mean"]
    scored = [e for e in cells.values() if e["n"]]
    best = max(scored, key=lambda e: e[f"{select} mean"]) if scored else None

    fig = new_figure(figsize=(1.6 + 1.5 * len(m_values), 1.2 + 0.9 * len(s_values)), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=score)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, s), (j, m) in itertools.product(enumerate(s_values), enumerate(m_values)):
        at_cell = [r for r in rows if r[S] == s and r[M] == m]
        label = cell_label(cells.get((s, m)), at_cell, score)
        color = "black" if np.isfinite(grid[i, j]) and grid[i, j] > middle else "white"
        if not np.isfinite(grid[i, j]):
            color = "dimgray"
        if best is not None and (best[S], best[M]) == (s, m):
            label = "★ " + label
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
        ax.text(j, i, label, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(m_values)), [str(m) for m in m_values])
    ax.set_yticks(range(len(s_values)), [str(s) for s in s_values])
    ax.set_xlabel("margin m (head.m)")
    ax.set_ylabel("scale s (head.s)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def scatter_figure(rows: list[Row], title: str, metrics: tuple[str, str, str]) -> Any:
    """For s, m that do not form a grid (Optuna): each job a point at (s, m), coloured by its test score."""
    score = metrics[1]
    ok = [r for r in rows if r.get("status") == "ok" and r.get(score) is not None]
    fig = new_figure(figsize=(6, 4.5), dpi=110)
    ax = fig.subplots()
    points = ax.scatter([r[S] for r in ok], [r[M] for r in ok], c=[r[score] for r in ok], cmap="viridis")
    for r in ok:
        ax.annotate(f"{r[score]:.4f}", (r[S], r[M]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    failed = [r for r in rows if r.get("status") != "ok"]
    ax.scatter([r[S] for r in failed], [r[M] for r in failed], marker="x", color="red", label="failed / diverged")
    if failed:
        ax.legend(fontsize=8)
    fig.colorbar(points, ax=ax, label=score)
    ax.set_xscale("log")
    ax.set_xlabel("scale s (head.s)")
    ax.set_ylabel("margin m (head.m)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def curves_figure(rows: list[Row], title: str, metrics: tuple[str, str, str]) -> Any:
    """The test score against m, one line per s: mean over replicates, error bars their sample std (none where a
    point has a single finished run)."""
    score = metrics[1]
    cells = [e for e in aggregate(rows, [S, M], metrics) if e["n"]]
    fig = new_figure(figsize=(6, 4.5), dpi=110)
    ax = fig.subplots()
    for s in sorted({e[S] for e in cells}):
        line = sorted((e for e in cells if e[S] == s), key=lambda e: e[M])
        spread = [0.0 if math.isnan(e[f"{score} std"]) else e[f"{score} std"] for e in line]
        means = [e[f"{score} mean"] for e in line]
        ax.errorbar([e[M] for e in line], means, yerr=spread, marker="o", capsize=3, label=f"s = {s}")
    ax.set_xlabel("margin m (head.m)")
    ax.set_ylabel(score)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="scale (head.s)", title_fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
