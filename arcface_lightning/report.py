"""Sweep report: a row per job, replicates (seeds, folds) aggregated, the test score over the s × m grid as a
heatmap and as one curve per s against m, and paired comparisons against a baseline point.

    python -m arcface_lightning.report logs/train/multiruns/<time>_<pid>
    python -m arcface_lightning.report logs/train/multiruns/<time>_<pid> report.baseline=head.s=30,head.m=0.3
    make report DIR=logs/train/multiruns/<time>_<pid>

Reads each job's metrics.json and .hydra/overrides.yaml and writes into the sweep dir: summary.csv and summary.md
(printed too); summary_seeds.csv when seeds or folds (data.fold) are swept: per grid point the mean ± sample std over
its replicates, how many seeds and folds they cover, failed jobs left out and counted; heatmap.png (one
heatmap_<key>=<value>.png per value of any other swept key; scatter.png when s and m do not form a grid, as in an
Optuna search); with at least 2 values of both s and m, curves.png and summary_curves.csv (the metric against m, one
curve per s, error bars the std over replicates); with report.baseline, summary_paired.csv (statistics.py: every other
point minus the baseline, paired by seed and fold, mean and 95% Student t interval). Rows are sorted by the metric
that selected each run's checkpoint: models are chosen on validation, and the heatmap's ★ marks the cell with the
best mean of it, not the best test score. That is val/acc_best, scored by test/acc; for sweeps with
data.val_split=by_class (no closed-set accuracy on held-out identities) val/precision_at_1_best, scored by
test/precision_at_1 (see sweep_jobs.REPORTED). SweepReportCallback writes the report when a multirun ends, with the
sweep config's report.baseline, which it checks against the grid when the multirun starts.

A damaged job does not stop the report (sweep_jobs.py: left out, or reported as failed): a warning line names the
job and the file, and summary.md lists them. Each file is written beside its place, then renamed into it.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from arcface_lightning.core.checks import OneLineParser
from arcface_lightning.evaluation.statistics import (
    EXAMPLE,
    FOLD,
    METHOD,
    REPLICATES,
    SEED,
    aggregate,
    paired_points,
    parse_point,
)
from arcface_lightning.evaluation.sweep_figures import (
    M,
    S,
    curve_table,
    curves_figure,
    grid_figure,
    has_curves,
    other_keys,
    s_m_subsets,
    scatter_figure,
)
from arcface_lightning.evaluation.sweep_jobs import Row, number, read_jobs, reported, swept_keys

log = logging.getLogger(__name__)


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


def sort_best_first(rows: list[Row], select: str) -> list[Row]:
    return sorted(rows, key=lambda r: (r.get("status") != "ok", -(r.get(select) or 0.0)))


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


def figures(sweep_dir: Path, rows: list[Row], keys: list[str], metrics: tuple[str, str, str]) -> list[Path]:
    """One s × m figure per combination of the other swept keys (replicates are averaged within a figure), and
    beside each heatmap of at least 2 s × 2 m its curves (curves.png)."""
    if S not in keys or M not in keys:
        print(f"no heatmap: it needs {S} and {M} both swept (swept: {', '.join(keys) or 'nothing'})")
        return []
    written = []
    for suffix, subset, is_grid in s_m_subsets(rows, keys):
        counts = [f"{len({r.get(SEED) for r in subset})} seed(s)"]
        counts += [f"{len({r.get(FOLD) for r in subset})} fold(s)"] if FOLD in keys else []
        title = f"{metrics[1]}, mean over {' × '.join(counts)}{' — ' + suffix if suffix else ''}"
        name = ("heatmap" if is_grid else "scatter") + (f"_{suffix}" if suffix else "") + ".png"
        drawn = (grid_figure if is_grid else scatter_figure)(subset, f"{title}\n★ = best mean {metrics[0]}", metrics)
        written.append(save(drawn, sweep_dir / name))
        if has_curves(subset, is_grid):
            curves = curves_figure(subset, f"{title}\nerror bars: sample std over replicates", metrics)
            written.append(save(curves, sweep_dir / ("curves" + (f"_{suffix}" if suffix else "") + ".png")))
    return written


def save(figure: Any, path: Path) -> Path:
    with written_aside(path) as partial:
        figure.savefig(partial)
    return path


def curve_markdown(table: list[Row], keys: list[str], score: str) -> str:
    """The curves as a table: a row per curve (s, with the other swept keys), a column per m, mean ± std."""
    line_keys, m_values = [*other_keys(keys), S], sorted({e[M] for e in table})
    lines: dict[tuple, Row] = {}
    for e in table:
        cell = show(e[f"{score} mean"], score) + (f" ± {e[f'{score} std']:.4f}" if e["n"] > 1 else "")
        lines.setdefault(tuple(e[k] for k in line_keys), dict(zip(line_keys, (e[k] for k in line_keys), strict=True)))
        lines[tuple(e[k] for k in line_keys)][f"m={e[M]}"] = cell
    return markdown(list(lines.values()), [*line_keys, *(f"m={m}" for m in m_values)])


def write_report(sweep_dir: Path, baseline: Any = None) -> dict[str, Any]:
    """Write summary.csv, summary.md, summary_seeds.csv (replicates swept), summary_curves.csv (a grid of at least
    2 s × 2 m), summary_paired.csv (a baseline point given) and the figures; return what was written."""
    sweep_dir = Path(sweep_dir)
    expected = "give a sweep dir: the folder of a multirun, e.g. logs/train/multiruns/<time>_<pid>"
    try:
        baseline = parse_point(baseline)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
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
    pairs = None
    if baseline is not None:  # checked against the grid before anything is written
        try:
            pairs = paired_points(rows, grid_keys(swept_keys(rows)), baseline, reported(rows)[1])
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    try:
        return write_files(sweep_dir, rows, problems, pairs)
    except OSError as error:  # os.replace names the file it writes to second
        name = Path(error.filename2 or error.filename or "").name
        raise SystemExit(f"error: cannot write the report into {sweep_dir}: {error.strerror}: {name}") from None


def grid_keys(keys: list[str]) -> list[str]:
    """The swept keys that place a job in the grid: all but the replicates (seed, data.fold)."""
    return [k for k in keys if k not in REPLICATES]


def paired_markdown(pairs: list[Row], keys: list[str], score: str) -> tuple[str, list[Row], list[str]]:
    """The paired comparisons as a section of summary.md, and as rows and columns for summary_paired.csv."""
    stats = {"diff_mean": "diff mean", "diff_sd": "diff sd", "low": "95% low", "high": "95% high"}
    rows = [
        {k: v for k, v in e.items() if k not in stats} | {f"{score} {stats[k]}": e.get(k) for k in stats} for e in pairs
    ]
    columns = [*keys, "baseline", "paired", "unpaired", *(f"{score} {name}" for name in stats.values()), "note"]
    baselines = sorted({e["baseline"] for e in pairs})
    text = (
        f"\n## Paired against {'; '.join(baselines) if len(baselines) < 4 else 'the baseline point'}: {score}\n\n"
        f"Per-replicate differences (point − baseline; same seed and fold at both points, the others left out and "
        f"counted as unpaired), their mean and sample sd, and the mean's 95% interval ({METHOD}). note: where the "
        f"interval lies against 0.\n\n{markdown(rows, columns)}\n"
    )
    return text, rows, columns


def write_files(
    sweep_dir: Path, rows: list[Row], problems: list[str], pairs: list[Row] | None = None
) -> dict[str, Any]:
    """The report of rows that were read, with the damaged jobs (`problems`) listed in summary.md and the paired
    comparisons (`pairs`, paired_points') in their own section."""
    keys, metrics = swept_keys(rows), reported(rows)
    replicates = [k for k in REPLICATES if k in keys]
    columns = ["job", *grid_keys(keys), *REPLICATES[: 1 + (FOLD in keys)], *metrics, "epochs", "wall_time_s"]
    columns += ["status", "error"]
    rows = sort_best_first(rows, metrics[0])
    write_csv(sweep_dir / "summary.csv", rows, columns)
    text = f"# Sweep {sweep_dir}\n\n{len(rows)} jobs, sorted by {metrics[0]}.\n\n{markdown(rows, columns)}\n"
    if problems:
        text += "\nDamaged jobs:\n\n" + "".join(f"- {problem}\n" for problem in problems)
    seeds_table = None
    if replicates:
        group_keys = grid_keys(keys)
        seeds_table = aggregate(rows, group_keys, metrics)
        counts = ["seeds", *(["folds"] if FOLD in keys else []), "n", "failed"]
        seed_columns = [*group_keys, *counts, *[f"{m} {stat}" for m in metrics for stat in ("mean", "std")]]
        write_csv(sweep_dir / "summary_seeds.csv", seeds_table, seed_columns)
        over = " and ".join(k.replace("data.fold", "folds").replace("seed", "seeds") for k in replicates)
        text += f"\n## Over {over} (mean, sample std)\n\n{markdown(seeds_table, seed_columns)}\n"
    curves = curve_table(rows, keys, metrics)
    if curves:
        counts = ["seeds", *(["folds"] if FOLD in keys else []), "n"]
        curve_columns = [*other_keys(keys), S, M, *counts, f"{metrics[1]} mean", f"{metrics[1]} std"]
        write_csv(sweep_dir / "summary_curves.csv", curves, curve_columns)
        text += (
            f"\n## {metrics[1]} against m, one curve per s (mean ± sample std over replicates)\n\n"
            f"{curve_markdown(curves, keys, metrics[1])}\n"
        )
    if pairs is not None:
        section, pair_rows, pair_columns = paired_markdown(pairs, grid_keys(keys), metrics[1])
        write_csv(sweep_dir / "summary_paired.csv", pair_rows, pair_columns)
        text += section
    with written_aside(sweep_dir / "summary.md") as partial:
        partial.write_text(text)
    print(text)
    written = figures(sweep_dir, rows, keys, metrics)
    for path in written:
        print(f"figure: {path}")
    return {
        "rows": rows, "swept": keys, "seeds": seeds_table, "curves": curves, "paired": pairs, "figures": written,
        "problems": problems,
    }  # fmt: skip


class SweepReportCallback(Callback):
    """Hydra callback: the baseline point (report.baseline) checked against the grid when a multirun starts, the
    report written into the sweep dir when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        baseline = OmegaConf.select(config, "report.baseline", default=None)
        try:
            point = parse_point(OmegaConf.to_container(baseline) if OmegaConf.is_config(baseline) else baseline)
            grid = sweep_grid(config)
            if point is not None and grid is not None:
                keys = [k for k, values in grid.items() if len(values) > 1 and k not in REPLICATES]
                jobs = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
                paired_points(jobs, keys, point, "")
        except ValueError as error:  # before any job: a baseline the report could not use is a bad command line
            raise SystemExit(f"error: {error}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        baseline = OmegaConf.select(config, "report.baseline", default=None)
        try:
            write_report(
                Path(config.hydra.sweep.dir),
                OmegaConf.to_container(baseline) if OmegaConf.is_config(baseline) else baseline,
            )
        except (SystemExit, Exception) as error:  # a report problem must not fail the sweep it describes
            log.warning("sweep report not written: %s", error)


def sweep_grid(config: DictConfig) -> dict[str, list[Any]] | None:
    """The values of each key a basic-sweeper multirun sweeps (command line and hydra.sweeper.params), as the job
    folders will hold them; None for other sweepers (Optuna's points are not known before it runs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if not sweeper.endswith(("BasicSweeper", "ResumingSweeper")):  # ResumingSweeper: the grid sweeper, resumable
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    texts = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    grid = {}
    for override in OverridesParser.create().parse_overrides(texts):
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override():
            grid[key] = [number(v) for v in override.sweep_string_iterator()]
        else:
            grid[key] = [number(override.get_value_element_as_str())]
    return grid


def setting(text: str) -> Any:
    """An argument after the sweep dir: report.baseline=<point>."""
    key, equals, value = text.partition("=")
    if key != "report.baseline" or not equals:
        raise argparse.ArgumentTypeError(
            f"unrecognized argument {text!r}; allowed after the sweep dir: report.baseline=<point>, e.g. {EXAMPLE}"
        )
    try:
        return parse_point(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    """`python -m arcface_lightning.report <sweep_dir> [report.baseline=<point>]` (console script: arcface-report)."""
    parser = OneLineParser(
        prog="python -m arcface_lightning.report",
        usage="%(prog)s [-h] sweep_dir [report.baseline=POINT]",
        description=__doc__.split("\n\n")[0],
        epilog="Writes summary.csv, summary.md, summary_seeds.csv, heatmap.png and curves.png into the sweep dir "
        "(summary_paired.csv with report.baseline).",
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder of arcface_lightning.train -m")
    parser.add_argument(
        "baseline", nargs="?", type=setting, metavar="report.baseline=POINT",
        help=f"the grid point every other point is compared with, paired by seed and fold: {EXAMPLE}",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stopped)
    write_report(args.sweep_dir, args.baseline)


def stopped(signum: int, frame: Any) -> None:
    """A stop signal as one line: on the way out, the file being written is removed (written_aside)."""
    raise SystemExit(f"error: stopped by {signal.Signals(signum).name}; the report is incomplete")


if __name__ == "__main__":
    main()
