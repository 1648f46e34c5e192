"""Compare heads fairly: a small search per head on validation, then seeds at each head's chosen setting.

    python -m arcface_lightning.compare                  # conf/compare.yaml: every head, mnist_openset, 3 seeds
    make compare ARGS="'launcher=[\"hydra/launcher=joblib\",\"hydra.launcher.n_jobs=4\"]'"
    python -m arcface_lightning.compare 'heads=[arcface,softmax]' 'grids.arcface.head.m=[0.3,0.5]' 'seeds=[0,1]'

For each head of `heads`: (1) search — one multirun of the train entry point over the head's grid (`grids.<head>`,
every combination) on `seeds[0]`; the point with the best `select` (a validation metric) is the head's setting; (2)
seeds — one multirun of that setting on the other seeds (all seeds when the head has no grid). The search run at the
chosen point counts as that seed's run: it was chosen on validation, and its test numbers were not looked at. Each
training run tests its best checkpoint once, as every train run does.

Written into the run dir: search/<head>/ and seeds/<head>/ (the multiruns, each with its own sweep report),
comparison.md (printed), comparison.csv, comparison.json and comparison.png. A column's best mean is in bold only
where its mean ± std interval does not overlap the runner-up's; with few seeds that is a rough screen, not a test.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from arcface_lightning.config import CONF_DIR, ConfigError, register_configs
from arcface_lightning.overrides import check_overrides, upgrade_overrides
from arcface_lightning.report import Row, markdown, pyplot, read_jobs, write_csv
from arcface_lightning.runs import run, start


def check(cfg: DictConfig) -> None:
    """Every key before any training: head names, grids, seeds, metrics."""
    known = sorted(p.stem for p in (CONF_DIR / "head").glob("*.yaml"))
    heads = OmegaConf.to_container(cfg.heads) if OmegaConf.is_list(cfg.heads) else cfg.heads
    if not isinstance(heads, list) or not heads or len(set(heads)) != len(heads):
        raise ConfigError(
            f"heads={heads!r} is invalid; allowed: a list of distinct head configs, e.g. heads=[arcface,softmax]"
        )
    for name in heads:
        if name not in known:
            raise ConfigError(f"heads: {name!r} has no conf/head/{name}.yaml; allowed: {', '.join(known)}")
    for name, grid in (cfg.grids or {}).items():
        for key, values in grid_of(grid).items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grids.{name}.{key}={values!r} is invalid; allowed: a non-empty list of values")
    seeds = OmegaConf.to_container(cfg.seeds) if OmegaConf.is_list(cfg.seeds) else cfg.seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds={seeds!r} is invalid; allowed: a non-empty list of integers ≥ 0, e.g. seeds=[0,1,2]")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds!r} repeats a seed; allowed: distinct integers")
    for key in (cfg.select, *cfg.columns):
        if not isinstance(key, str) or "/" not in key:
            raise ConfigError(f"select/columns: {key!r} is not a metric name such as val/acc_best or openset/map_at_r")


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
        sys.executable, "-m", "arcface_lightning.train", "-m", f"experiment={cfg.experiment}", f"head={head}",
        *[f"{key}={','.join(str(v) for v in values)}" for key, values in sweeps.items()],
        f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={cfg.paths.data_dir}",
        *train_overrides(cfg.train), *cfg.launcher,
    ]  # fmt: skip
    print(f"$ {shlex.join(command[1:])}", flush=True)
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = read_jobs(sweep_dir) if sweep_dir.is_dir() else []
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
    fig.savefig(path, dpi=120)
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
        f"# Head comparison: {cfg.experiment}, seeds {seeds}, setting chosen on {select}\n\n"
        f"{table_markdown(table, columns)}\n\nmean ± sample std over seeds; bold: the best mean where its "
        f"interval does not overlap the runner-up's. Wall time {wall / 60:.1f} min.\n"
    )
    (out / "comparison.md").write_text(text)
    write_csv(out / "comparison.csv", table, list(table[0]))
    (out / "comparison.json").write_text(json.dumps({"table": table, "heads": record}, indent=1, default=str))
    plot(out / "comparison.png", table, runs, columns)
    print(text)
    return {"heads": len(table), "runs": sum(len(v) for v in runs.values()), "compare_wall_time_s": round(wall, 1)}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="compare")
def main(cfg: DictConfig) -> None:
    register_configs()
    run(compare, cfg)


def cli() -> None:
    register_configs()
    sys.argv[1:] = upgrade_overrides(sys.argv[1:])  # hydra.main reads sys.argv
    check_overrides(sys.argv[1:], config_name="compare")
    main()


if __name__ == "__main__":
    cli()
