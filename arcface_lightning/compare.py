"""Compare heads fairly: a small search per head on validation, then seeds at each head's chosen setting.

    python -m arcface_lightning.compare                  # conf/compare.yaml: every head, mnist_openset, 3 seeds
    make compare ARGS="'launcher=[\"hydra/launcher=joblib\",\"hydra.launcher.n_jobs=4\"]'"
    python -m arcface_lightning.compare 'heads=[arcface,softmax]' 'grids.arcface.head.m=[0.3,0.5]' 'seeds=[0,1]'
    python -m arcface_lightning.compare 'heads=[softmax,arcface]' baseline=softmax 'seeds=[0,1,2,3,4]'

For each head of `heads`: (1) search — one multirun of the train entry point (`experiment=<protocol>`) over the head's
grid (`grids.<head>`, every combination) on `seeds[0]`; the point with the best `select` is the head's setting; (2)
seeds — one multirun of that setting on the other seeds (all seeds when the head has no grid). The search run at the
chosen point counts as that seed's run: it was chosen on validation, and its test numbers were not looked at. Each
training run tests its best checkpoint once, as every train run does.

Written into the run dir: search/<head>/ and seeds/<head>/ (the multiruns, each with its own sweep report),
comparison.md (printed), comparison.csv, comparison.json and comparison.png. A column's best mean is in bold only
where its mean ± std interval does not overlap the runner-up's; with few seeds that is a rough screen, not a test.
The test is `baseline=<head>`: every other head minus the baseline, seed by seed (each at its chosen setting), with
the mean difference's 95% Student t interval per column (comparison.md's paired section, comparison_paired.csv).

Every setting is checked before the first job starts (check): each head's grid keys against that head's train config
and each grid point built into the head, `select` against the protocol's selection metric, `columns` against the
metrics its jobs record.
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from arcface_lightning.core.checks import BadValue
from arcface_lightning.core.config import CONF_DIR, ConfigError, one_line, root_cause, selection_metric
from arcface_lightning.core.runs import entry_point, start
from arcface_lightning.evaluation.metrics import embedding_metrics, pair_metrics
from arcface_lightning.evaluation.statistics import METHOD, interval_text, paired_groups
from arcface_lightning.evaluation.sweep_jobs import Row, read_jobs
from arcface_lightning.report import markdown, write_csv, written_aside
from arcface_lightning.training.module import build_head

LAUNCHER_EXAMPLE = """'launcher=["hydra/launcher=joblib","hydra.launcher.n_jobs=4"]'"""


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check(cfg: DictConfig) -> None:
    """Every key before any training: heads, protocol, seeds, launcher, the grids (each value built into its head),
    and select and columns against the metrics a job of this experiment records."""
    heads, known = plain(cfg.heads), options("head")
    if not isinstance(heads, list) or not heads or len(set(map(str, heads))) != len(heads):
        raise ConfigError(
            f"heads={heads!r} is invalid; allowed: a list of distinct head configs, e.g. heads=[arcface,softmax]"
        )
    for name in heads:
        if name not in known:
            raise ConfigError(f"heads: {name!r} has no conf/head/{name}.yaml; allowed: {', '.join(known)}")
    if cfg.protocol not in options("experiment"):
        raise ConfigError(f"protocol={cfg.protocol!r} is invalid; allowed: {', '.join(options('experiment'))}")
    seeds = plain(cfg.seeds)
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds={seeds!r} is invalid; allowed: a non-empty list of integers ≥ 0, e.g. seeds=[0,1,2]")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds!r} repeats a seed; allowed: distinct integers")
    baseline = cfg.get("baseline")
    if baseline is not None and baseline not in heads:
        raise ConfigError(f"baseline={baseline!r} is invalid; allowed: null or one of heads: {', '.join(heads)}")
    launcher, columns = plain(cfg.launcher), plain(cfg.columns)
    if not isinstance(launcher, list) or not all(isinstance(v, str) for v in launcher):
        raise ConfigError(f"launcher={launcher!r} is invalid; allowed: a list of overrides, e.g. {LAUNCHER_EXAMPLE}")
    if not isinstance(columns, list) or not columns or not all(isinstance(v, str) for v in columns):
        raise ConfigError(f"columns={columns!r} is invalid; allowed: a list of metric names, e.g. columns=[test/acc]")
    if cfg.train is not None and not OmegaConf.is_dict(cfg.train):
        raise ConfigError(f"train={cfg.train!r} is invalid; allowed: train keys, e.g. train.trainer.max_epochs=10")
    grids, example = cfg.grids or {}, "lists of values by key, e.g. grids.arcface.head.s=[16,30]"
    if not OmegaConf.is_dict(grids):
        raise ConfigError(f"grids={plain(grids)!r} is invalid; allowed: {example}")
    for name, grid in grids.items():
        if name not in known:
            raise ConfigError(f"grids.{name}: no conf/head/{name}.yaml; allowed: {', '.join(known)}")
        if not (grid is None or OmegaConf.is_dict(grid)):
            raise ConfigError(f"grids.{name}={plain(grid)!r} is invalid; allowed: {example}")
        for key, values in grid_of(grid).items():
            if not isinstance(values, list) or not values or len({repr(v) for v in values}) < len(values):
                allowed = "a non-empty list of distinct values"
                raise ConfigError(f"grids.{name}.{key}={values!r} is invalid; allowed: {allowed}")
    for index, name in enumerate(heads):
        job = train_config(cfg, name)
        if index == 0:  # the metrics a job records do not depend on its head
            check_metrics(cfg, job)
        check_grid(name, grid_of(grids.get(name)), job)


def train_config(cfg: DictConfig, head: str) -> DictConfig:
    """The config a job of `head` composes, before its grid values: the experiment and `train` as overrides."""
    overrides = [f"experiment={cfg.protocol}", f"head={head}", *train_overrides(cfg.train)]
    try:
        if GlobalHydra.instance().is_initialized():  # inside compare's hydra.main, whose search path is conf/ too
            return compose(config_name="train", overrides=overrides)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"train: the train config does not compose with head={head}: {one_line(error)}") from None


def check_metrics(cfg: DictConfig, job: DictConfig) -> None:
    """`select`: the validation score of the checkpoint each job tests (metrics.SELECTION's, best over epochs);
    `columns`: metrics a job records at test (and that one)."""
    best = f"{selection_metric(job.data.val_split)}_best"
    if cfg.select != best:
        raise ConfigError(
            f"select={cfg.select!r} is invalid; allowed: {best} (the validation score of the checkpoint each job "
            f"tests, with experiment={cfg.protocol}'s data.val_split={job.data.val_split})"
        )
    recorded = [best, *evaluation_metrics(job)]
    for column in cfg.columns:
        if column not in recorded:
            raise ConfigError(f"columns: {column!r} is not recorded by a job of experiment={cfg.protocol}; "
                              f"allowed: {', '.join(recorded)}")  # fmt: skip


def evaluation_metrics(job: DictConfig) -> list[str]:
    """The test-time metrics a train job of this config records: closed-set accuracy and loss where validation holds
    the head's classes (module.py), the embedding metrics of the test set and of the open set, the pair list's."""
    labels = torch.tensor([0, 0, 1, 1])  # metrics.py's names from a call on four points: they cannot drift apart
    embedding = list(embedding_metrics(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]), labels))
    stages = {"test": ([] if job.data.val_split == "by_class" else ["acc", "acc_margin", "loss"]) + embedding}
    if job.data.get("open_classes"):
        stages["openset"] = embedding
    if job.evaluation.get("pairs"):
        stages["pairs"] = list(pair_metrics(torch.tensor([0.9, 0.1, 0.8, 0.2]), labels == 0, labels))
    return [f"{stage}/{name}" for stage, names in stages.items() for name in names]


def check_grid(name: str, grid: dict[str, Any], job: DictConfig) -> None:
    """Every key must be one the job's config has, and the head must build at every point of the grid: its own
    checks say which values it takes."""
    for key in grid:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(job, parent) if parent else job
        if not OmegaConf.is_dict(node) or leaf not in node:
            keys = ", ".join(k for k in node if not str(k).startswith("_")) if OmegaConf.is_dict(node) else "nothing"
            raise ConfigError(f"grids.{name}.{key}: head={name} has no {key}; {parent or 'the config'} has: {keys}")
    head_keys = [key for key in grid if key.startswith("head.")]
    for point in itertools.product(*(grid[key] for key in head_keys)):
        values = {key.removeprefix("head."): value for key, value in zip(head_keys, point, strict=True)}
        try:  # on a small problem: the values are what is checked
            build_head(
                {**OmegaConf.to_container(job.head, resolve=True), "embedding_size": 8, "num_classes": 4, **values}
            )
        except Exception as error:
            cause = root_cause(error)
            if isinstance(cause, BadValue) and cause.name in values:
                where = f"grids.{name}.head.{cause.name}"
                raise ConfigError(
                    f"{where}: {cause.value!r} is invalid; allowed: {cause.allowed} ({cause.owner})"
                ) from None
            raise ConfigError(f"grids.{name}: head={name} does not build with {values}: {one_line(error)}") from None


def grid_of(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested grid as dotted keys: {head: {s: [16, 30]}} → {"head.s": [16, 30]}; leaves as plain values."""
    if not OmegaConf.is_dict(node):
        return {prefix: OmegaConf.to_container(node) if OmegaConf.is_list(node) else node} if prefix else {}
    return {
        k: v for key, child in node.items() for k, v in grid_of(child, f"{prefix}.{key}" if prefix else key).items()
    }


def train_overrides(node: Any) -> list[str]:
    """`train` as override strings: {trainer: {max_epochs: 3}, logger: csv} → trainer.max_epochs=3, logger=csv."""

    def text(value: Any) -> str:
        if isinstance(value, list):
            return json.dumps(value)
        if value is None or isinstance(value, bool):
            return str(value).lower().replace("none", "null")
        return str(value)

    return [f"{key}={text(value)}" for key, value in grid_of(node).items()]


def multirun(cfg: DictConfig, sweep_dir: Path, head: str, sweeps: dict[str, list]) -> list[Row]:
    """One multirun of the train entry point; its jobs' rows (report.read_jobs)."""
    command = [
        sys.executable, "-m", "arcface_lightning.train", "-m", f"experiment={cfg.protocol}", f"head={head}",
        *[f"{key}={','.join(str(v) for v in values)}" for key, values in sweeps.items()],
        f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={cfg.paths.data_dir}",
        *train_overrides(cfg.train), *cfg.launcher,
    ]  # fmt: skip
    print(f"$ {shlex.join(command[1:])}", flush=True)
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows, problems = read_jobs(sweep_dir) if sweep_dir.is_dir() else ([], [])
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if result.returncode != 0 and not rows:  # the command line itself was refused: nothing ran
        raise ConfigError(f"heads.{head}: the train command failed: {result.stderr.strip().splitlines()[-1]}")
    return rows


def choose(rows: list[Row], keys: list[str], select: str) -> tuple[dict[str, Any], Row] | None:
    """The grid point whose finished run has the best `select` (first in grid order on ties); None if none did."""
    ok = [r for r in rows if r.get("status") == "ok" and isinstance(r.get(select), (int, float))]
    if not ok:
        return None
    best = max(ok, key=lambda r: (r[select], -rows.index(r)))
    return {k: best[k] for k in keys}, best


def summarise(name: str, setting: dict[str, Any], runs: list[Row], columns: list[str], failed: int) -> Row:
    entry: Row = {"head": name, "setting": ", ".join(f"{k.removeprefix('head.')}={v}" for k, v in setting.items())}
    entry.update(seeds=",".join(str(r["seed"]) for r in runs), n=len(runs), failed=failed)
    for column in columns:
        values = [r[column] for r in runs if isinstance(r.get(column), (int, float))]
        entry[f"{column} mean"] = statistics.fmean(values) if values else math.nan
        entry[f"{column} std"] = statistics.stdev(values) if len(values) > 1 else math.nan
    return entry


def separated_best(table: list[Row], column: str) -> str | None:
    """The head with the best mean of `column` when its mean ± std does not overlap the runner-up's; else None."""
    ranked = sorted((r for r in table if not math.isnan(r[f"{column} mean"])), key=lambda r: -r[f"{column} mean"])
    if len(ranked) < 2 or any(math.isnan(r[f"{column} std"]) for r in ranked[:2]):
        return None
    first, second = ranked[0], ranked[1]
    gap = first[f"{column} mean"] - second[f"{column} mean"]
    return first["head"] if gap > first[f"{column} std"] + second[f"{column} std"] else None


def table_markdown(table: list[Row], columns: list[str]) -> str:
    best = {c: separated_best(table, c) for c in columns}
    rows = []
    for entry in table:
        row = {"head": entry["head"], "setting": entry["setting"], "seeds": entry["n"]}
        for c in columns:
            mean, std = entry[f"{c} mean"], entry[f"{c} std"]
            cell = "failed" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}"
            row[c] = f"**{cell}**" if best[c] == entry["head"] else cell
        rows.append(row)
    return markdown(rows, ["head", "setting", "seeds", *columns])


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported only when the figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def paired_markdown(pairs: list[Row], table: list[Row], columns: list[str]) -> str:
    """A row per head, a column per metric: head − baseline per seed, mean [95% t interval] n=pairs."""
    cells = {(e["head"], e["metric"]): interval_text(e) for e in pairs}
    rows = [
        {"head": e["head"], "setting": e["setting"], **{c: cells[(e["head"], c)] for c in columns}}
        for e in table
        if (e["head"], columns[0]) in cells
    ]
    return (
        (
            f"\n## Paired against {pairs[0]['baseline']}\n\nPer-seed differences (head − {pairs[0]['baseline']}, each "
            f"at its chosen setting; seeds only one of them finished left out): mean [95% interval ({METHOD})] and the "
            f"number of pairs.\n\n{markdown(rows, ['head', 'setting', *columns])}\n"
        )
        if pairs
        else ""
    )


def plot(path: Path, table: list[Row], runs: dict[str, list[Row]], columns: list[str]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    names = [e["head"] for e in table]
    for ax, column in zip(axes[0], columns, strict=True):
        for x, entry in enumerate(table):
            values = [r[column] for r in runs[entry["head"]] if isinstance(r.get(column), (int, float))]
            ax.scatter([x] * len(values), values, s=10, color="0.6", zorder=1)
            mean, std = entry[f"{column} mean"], entry[f"{column} std"]
            ax.errorbar(x, mean, yerr=0 if math.isnan(std) else std, fmt="o", color="C0", capsize=3, zorder=2)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(column, fontsize=9)
    fig.suptitle("mean ± std over seeds (grey: each seed)", fontsize=9)
    fig.tight_layout()
    with written_aside(path) as partial:
        fig.savefig(partial, dpi=120)
    plt.close(fig)


def compare(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    check(cfg)
    out, columns, select = Path(cfg.paths.output_dir), list(cfg.columns), cfg.select
    seeds = list(cfg.seeds)
    began = time.perf_counter()
    table, runs, record = [], {}, {}
    for name in cfg.heads:
        grid = grid_of((cfg.grids or {}).get(name))
        keys = list(grid)
        chosen: dict[str, Any] = {}
        searched: list[Row] = []
        if math.prod(len(v) for v in grid.values()) > 1:
            searched = multirun(cfg, out / "search" / name, name, {**grid, "seed": seeds[:1]})
            picked = choose(searched, keys, select)
            if picked is None:
                table.append(summarise(name, {}, [], columns, failed=len(searched)))
                runs[name] = []
                continue
            chosen, first = picked
            rest = seeds[1:]
            done = [first]
        else:
            chosen, rest, done = {k: v[0] for k, v in grid.items()}, seeds, []
        point = {k: [v] for k, v in chosen.items()}
        more = multirun(cfg, out / "seeds" / name, name, {**point, "seed": rest}) if rest else []
        finished = done + [r for r in more if r.get("status") == "ok"]
        runs[name] = finished
        table.append(summarise(name, chosen, finished, columns, failed=len(more) + len(done) - len(finished)))
        record[name] = {"setting": chosen, "search": searched, "runs": finished}
    wall = time.perf_counter() - began
    text = (
        f"# Head comparison: {cfg.protocol}, seeds {seeds}, setting chosen on {select}\n\n"
        f"{table_markdown(table, columns)}\n\nmean ± sample std over seeds; bold: the best mean where its "
        f"interval does not overlap the runner-up's. Wall time {wall / 60:.1f} min.\n"
    )
    pairs = paired_groups(runs, cfg.baseline, columns) if cfg.get("baseline") else None
    if pairs is not None:
        text += paired_markdown(pairs, table, columns)
        write_csv(out / "comparison_paired.csv", pairs, list(pairs[0]) if pairs else ["head"])
    with written_aside(out / "comparison.md") as partial:
        partial.write_text(text)
    write_csv(out / "comparison.csv", table, list(table[0]))
    with written_aside(out / "comparison.json") as partial:
        partial.write_text(json.dumps({"table": table, "heads": record, "paired": pairs}, indent=1, default=str))
    plot(out / "comparison.png", table, runs, columns)
    print(text)
    return {"heads": len(table), "runs": sum(len(v) for v in runs.values()), "compare_wall_time_s": round(wall, 1)}


main, cli = entry_point("compare", compare)


if __name__ == "__main__":
    cli()
