"""Sweep report: a row per job, seeds aggregated, and test accuracy over the s × m grid as a heatmap.

    python -m arcface_lightning.report logs/train/multiruns/<time>_<pid>
    make report DIR=logs/train/multiruns/<time>_<pid>

Reads each job's metrics.json and .hydra/overrides.yaml and writes into the sweep dir: summary.csv and summary.md
(printed too), summary_seeds.csv when seeds are swept (mean ± sample std over seeds, failed jobs left out and
counted), and heatmap.png (one heatmap_<key>=<value>.png per value of any other swept key; scatter.png when s and m
do not form a grid, as in an Optuna search). Rows are sorted by the metric that selected each run's checkpoint:
models are chosen on validation, and the heatmap's ★ marks the cell with the best mean of it, not the best test
score. That is val/acc_best, scored by test/acc; for sweeps with data.val_split=by_class (no closed-set accuracy on
held-out identities) val/precision_at_1_best, scored by test/precision_at_1 (see REPORTED).
SweepReportCallback writes the report when a multirun ends.

A damaged job does not stop the report (sweep_jobs.py: left out, or reported as failed): a warning line names the
job and the file, and summary.md lists them. Each file is written beside its place, then renamed into it.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import re
import signal
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from arcface_lightning.core.checks import OneLineParser, is_number
from arcface_lightning.evaluation.sweep_jobs import Row, read_jobs

log = logging.getLogger(__name__)

# (selects, scores, also shown) per val_split: the selection metric is metrics.SELECTION's, with its _best
REPORTED = {
    "by_sample": ("val/acc_best", "test/acc", "test/acc_margin"),
    "by_class": ("val/precision_at_1_best", "test/precision_at_1", "test/map_at_r"),
}
S, M, SEED = "head.s", "head.m", "seed"


@contextmanager
def written_aside(path: Path) -> Iterator[Path]:
    """A path beside `path` to write to: renamed to `path` when the block ends, removed if it fails or is interrupted,
    so a reader never finds half a file."""
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")  # the suffix tells savefig the format
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def swept_keys(rows: list[Row]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were given."""
    keys = dict.fromkeys(key for row in rows for key in row["overrides"])
    return [k for k in keys if len({repr(row.get(k)) for row in rows}) > 1]


def reported(rows: list[Row]) -> tuple[str, str, str]:
    """The by_class metrics when the finished runs selected on them, else the closed-set ones."""
    finished = [r for r in rows if r.get("status") == "ok"]
    by_class = finished and all("val/acc_best" not in r and REPORTED["by_class"][0] in r for r in finished)
    return REPORTED["by_class" if by_class else "by_sample"]


def sort_best_first(rows: list[Row], select: str) -> list[Row]:
    return sorted(rows, key=lambda r: (r.get("status") != "ok", -(r.get(select) or 0.0)))


def aggregate(rows: list[Row], keys: list[str], metrics: tuple[str, ...]) -> list[Row]:
    """Mean and sample std over seeds of each metric, per point of the other swept keys (ok jobs only)."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    table = []
    for point, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        entry: Row = dict(zip(keys, point, strict=True))
        entry.update(n=len(ok), failed=len(members) - len(ok))
        for metric in metrics:
            values = [r[metric] for r in ok if r.get(metric) is not None]
            entry[f"{metric} mean"] = statistics.fmean(values) if values else math.nan
            entry[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        table.append(entry)
    return sorted(table, key=lambda e: -e[f"{metrics[0]} mean"] if e["n"] else math.inf)


def show(value: Any, column: str = "") -> str:
    """Metrics (stage/name columns) to 4 decimals, times to 0.1 s; swept values as they were given."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and "/" in column:
        return f"{value:.4f}"
    if isinstance(value, float) and column == "wall_time_s":
        return f"{value:.1f}"
    return str(value)


def markdown(rows: list[Row], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(row.get(c), c).replace("|", "/") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[Row], columns: list[str]) -> None:
    with written_aside(path) as partial, partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(
            {c: show(r.get(c)) if isinstance(r.get(c), float) else r.get(c) for c in columns} for r in rows
        )


def cell_label(entry: Row | None, rows_at_cell: list[Row], score: str) -> str:
    if entry is None or entry["n"] == 0:
        return "\n".join(sorted({r.get("status", "failed") for r in rows_at_cell})) or "—"
    text = f"{entry[f'{score} mean']:.4f}"
    if entry["n"] > 1:
        text += f"\n±{entry[f'{score} std']:.4f}"
    return text + (f"\n{entry['failed']} failed" if entry["failed"] else "")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported only when a figure is drawn (not by the Hydra callback)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(path: Path, rows: list[Row], title: str, metrics: tuple[str, str, str]) -> None:
    """The test score over s (rows) × m (columns): mean over seeds, ± std in each cell, ★ = best mean selection."""
    plt = pyplot()
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

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(m_values), 1.2 + 0.9 * len(s_values)), dpi=110)
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
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
        ax.text(j, i, label, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(m_values)), [str(m) for m in m_values])
    ax.set_yticks(range(len(s_values)), [str(s) for s in s_values])
    ax.set_xlabel("margin m (head.m)")
    ax.set_ylabel("scale s (head.s)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with written_aside(path) as partial:
        fig.savefig(partial)
    plt.close(fig)


def plot_scatter(path: Path, rows: list[Row], title: str, metrics: tuple[str, str, str]) -> None:
    """For s, m that do not form a grid (Optuna): each job a point at (s, m), coloured by its test score."""
    plt = pyplot()
    score = metrics[1]

    ok = [r for r in rows if r.get("status") == "ok" and r.get(score) is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
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
    with written_aside(path) as partial:
        fig.savefig(partial)
    plt.close(fig)


def figures(sweep_dir: Path, rows: list[Row], keys: list[str], metrics: tuple[str, str, str]) -> list[Path]:
    """One s × m figure per combination of the other swept keys (seeds are averaged within a figure)."""
    if S not in keys or M not in keys:
        print(f"no heatmap: it needs {S} and {M} both swept (swept: {', '.join(keys) or 'nothing'})")
        return []
    drawn = [r for r in rows if is_number(r.get(S)) and is_number(r.get(M))]  # a job refused head.s=abc has no place
    others = [k for k in keys if k not in (S, M, SEED)]
    written = []
    for point in sorted({tuple(r.get(k) for k in others) for r in drawn}, key=repr):
        subset = [r for r in drawn if tuple(r.get(k) for k in others) == point]
        suffix = re.sub(r"[^\w.,=+-]", "_", ",".join(f"{k}={v}" for k, v in zip(others, point, strict=True)))
        seeds = len({r.get(SEED) for r in subset})
        title = f"{metrics[1]}, mean over {seeds} seed(s){' — ' + suffix if suffix else ''}"
        title += f"\n★ = best mean {metrics[0]}"
        is_grid = len({(r[S], r[M]) for r in subset}) == len({r[S] for r in subset}) * len({r[M] for r in subset})
        name = ("heatmap" if is_grid else "scatter") + (f"_{suffix}" if suffix else "") + ".png"
        (plot_grid if is_grid else plot_scatter)(sweep_dir / name, subset, title, metrics)
        written.append(sweep_dir / name)
    return written


def write_report(sweep_dir: Path) -> dict[str, Any]:
    """Write summary.csv, summary.md, summary_seeds.csv (seeds swept) and the figures; return what was written."""
    sweep_dir = Path(sweep_dir)
    expected = "give a sweep dir: the folder of a multirun, e.g. logs/train/multiruns/<time>_<pid>"
    if not sweep_dir.exists():
        raise SystemExit(f"error: {sweep_dir} does not exist; {expected}")
    if not sweep_dir.is_dir():
        raise SystemExit(f"error: {sweep_dir} is a file, not a folder; {expected}")
    rows, problems = read_jobs(sweep_dir)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not rows and problems:
        raise SystemExit(f"error: {sweep_dir} has no job whose .hydra/overrides.yaml can be read (see the warnings)")
    if not rows:
        raise SystemExit(f"error: {sweep_dir} is not a sweep dir: no <job>/.hydra/overrides.yaml in it")
    if not any(r["finished"] for r in rows):
        raise SystemExit(f"error: {sweep_dir} has no finished jobs: no readable <job>/metrics.json in it")
    try:
        return write_files(sweep_dir, rows, problems)
    except OSError as error:  # os.replace names the file it writes to second
        name = Path(error.filename2 or error.filename or "").name
        raise SystemExit(f"error: cannot write the report into {sweep_dir}: {error.strerror}: {name}") from None


def write_files(sweep_dir: Path, rows: list[Row], problems: list[str]) -> dict[str, Any]:
    """The report of rows that were read, with the damaged jobs (`problems`) listed in summary.md."""
    keys, metrics = swept_keys(rows), reported(rows)
    columns = ["job", *[k for k in keys if k != SEED], SEED, *metrics, "epochs", "wall_time_s", "status", "error"]
    rows = sort_best_first(rows, metrics[0])
    write_csv(sweep_dir / "summary.csv", rows, columns)
    text = f"# Sweep {sweep_dir}\n\n{len(rows)} jobs, sorted by {metrics[0]}.\n\n{markdown(rows, columns)}\n"
    if problems:
        text += "\nDamaged jobs:\n\n" + "".join(f"- {problem}\n" for problem in problems)
    seeds_table = None
    if SEED in keys:
        group_keys = [k for k in keys if k != SEED]
        seeds_table = aggregate(rows, group_keys, metrics)
        seed_columns = [*group_keys, "n", "failed", *[f"{m} {stat}" for m in metrics for stat in ("mean", "std")]]
        write_csv(sweep_dir / "summary_seeds.csv", seeds_table, seed_columns)
        text += f"\n## Over seeds (mean, sample std)\n\n{markdown(seeds_table, seed_columns)}\n"
    with written_aside(sweep_dir / "summary.md") as partial:
        partial.write_text(text)
    print(text)
    written = figures(sweep_dir, rows, keys, metrics)
    for path in written:
        print(f"figure: {path}")
    return {"rows": rows, "swept": keys, "seeds": seeds_table, "figures": written, "problems": problems}


class SweepReportCallback(Callback):
    """Hydra callback: write the report into the sweep dir when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            write_report(Path(config.hydra.sweep.dir))
        except (SystemExit, Exception) as error:  # a report problem must not fail the sweep it describes
            log.warning("sweep report not written: %s", error)


def main(argv: list[str] | None = None) -> None:
    """`python -m arcface_lightning.report <sweep_dir>` (console script: arcface-report)."""
    parser = OneLineParser(
        prog="python -m arcface_lightning.report",
        description=__doc__.split("\n\n")[0],
        epilog="Writes summary.csv, summary.md, summary_seeds.csv and heatmap.png into the sweep dir.",
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder of arcface_lightning.train -m")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stopped)
    write_report(args.sweep_dir)


def stopped(signum: int, frame: Any) -> None:
    """A stop signal as one line: on the way out, the file being written is removed (written_aside)."""
    raise SystemExit(f"error: stopped by {signal.Signals(signum).name}; the report is incomplete")


if __name__ == "__main__":
    main()
