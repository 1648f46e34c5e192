"""Statistics that separate s from m (statistics.py, report.py): the Student t quantile against tables and closed
forms, paired differences against hand-computed values, the sweep report's replicate table (seeds × folds), its
curves, its paired comparisons against report.baseline, and a baseline that names no grid point refused in one line.
Synthetic job folders in tmp_path, as Hydra and train write them; one real multirun, refused before its first job."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from arcface_lightning.evaluation.statistics import (
    interval_text,
    paired,
    paired_groups,
    parse_point,
    t_cdf,
    t_interval,
    t_quantile,
)
from arcface_lightning.report import SweepReportCallback, main, write_report
from conftest import multirun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Student t quantiles as printed in tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2), (p, dof) → t
T_TABLE = {
    (0.975, 1): 12.706,
    (0.975, 2): 4.303,
    (0.975, 3): 3.182,
    (0.975, 5): 2.571,
    (0.975, 10): 2.228,
    (0.975, 30): 2.042,
    (0.975, 100): 1.984,
    (0.95, 4): 2.132,
    (0.95, 20): 1.725,
    (0.995, 5): 4.032,
    (0.995, 20): 2.845,
    (0.90, 7): 1.415,
}


@pytest.mark.parametrize(("p", "dof"), T_TABLE)
def test_the_t_quantile_matches_the_printed_table(p: float, dof: int) -> None:
    assert t_quantile(p, dof) == pytest.approx(T_TABLE[(p, dof)], abs=5e-4)  # the table's 3 decimals
    assert t_quantile(1 - p, dof) == pytest.approx(-T_TABLE[(p, dof)], abs=5e-4)  # symmetric


@pytest.mark.parametrize("p", [0.51, 0.6, 0.75, 0.9, 0.95, 0.975, 0.99, 0.999, 0.3, 0.025])
def test_the_t_quantile_matches_its_closed_forms_at_1_and_2_dof_and_the_normal_in_the_limit(p: float) -> None:
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-4)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), abs=1e-4)
    assert t_quantile(p, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(p), abs=1e-4)
    assert t_cdf(t_quantile(p, 7), 7) == pytest.approx(p, abs=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)


@pytest.mark.parametrize(
    ("p", "dof", "message"),
    [(1.0, 3, "p=1.0 is invalid; allowed: 0 < p < 1"), (0.9, 0, "dof=0 is invalid; allowed: a finite number > 0")],
)
def test_a_t_quantile_outside_its_domain_is_refused(p: float, dof: float, message: str) -> None:
    with pytest.raises(ValueError, match=f"^t_quantile: {message}$"):
        t_quantile(p, dof)


def test_paired_differences_give_the_hand_computed_mean_sd_and_interval() -> None:
    """[0.01, 0.03, 0.02]: mean 0.02, sd 0.01, half-width t(0.975, 2) · 0.01 / √3 = 4.302653 · 0.0057735 = 0.024841."""
    base = {0: 0.90, 1: 0.91, 2: 0.92, 3: 0.95}  # seed 3 has no partner: left out and counted
    other = {0: 0.91, 1: 0.94, 2: 0.94, 4: 0.99}  # seed 4 neither
    entry = paired(base, other)
    assert entry["paired"] == 3 and entry["unpaired"] == 2
    assert entry["diff_mean"] == pytest.approx(0.02) and entry["diff_sd"] == pytest.approx(0.01)
    assert entry["low"] == pytest.approx(0.02 - 0.024841, abs=1e-6)
    assert entry["high"] == pytest.approx(0.02 + 0.024841, abs=1e-6)
    assert entry["note"] == "0 inside" and interval_text(entry) == "+0.0200 [-0.0048, +0.0448] n=3"
    mean, sd, half = t_interval([0.01, 0.03, 0.02])
    assert (mean, sd, half) == pytest.approx((0.02, 0.01, 0.024841), abs=1e-6)
    above = paired({0: 0.5, 1: 0.5, 2: 0.5}, {0: 0.6, 1: 0.61, 2: 0.62})
    assert above["note"] == "above 0" and above["low"] == pytest.approx(0.11 - 0.024841, abs=1e-6)


def test_fewer_than_two_pairs_is_said_in_the_row_instead_of_an_interval() -> None:
    entry = paired({0: 0.9, 1: 0.8}, {1: 0.85})
    assert entry["paired"] == 1 and entry["unpaired"] == 1 and entry["diff_mean"] == pytest.approx(0.05)
    assert math.isnan(entry["low"]) and math.isnan(entry["diff_sd"])
    assert interval_text(entry) == "1 paired replicate(s): fewer than 2, no interval"


@pytest.mark.parametrize(
    ("value", "point"),
    [
        ("head.s=30,head.m=0.3", {"head.s": 30, "head.m": 0.3}),
        (" head.s = 30 , head.m=0.3", {"head.s": 30, "head.m": 0.3}),
        ({"head.s": 30, "head.m": "0.3"}, {"head.s": 30, "head.m": 0.3}),
        (None, None),
        ("", None),
    ],
)
def test_a_baseline_point_is_read_from_its_overrides_or_a_mapping(value, point) -> None:
    assert parse_point(value) == point


@pytest.mark.parametrize("value", ["head.s", "head.s=30,", "=30", "head.s=", "head.s=30,head.s=16", 30, ["head.s=30"]])
def test_a_baseline_that_is_no_point_is_one_line(value) -> None:
    with pytest.raises(ValueError) as refused:
        parse_point(value)
    assert str(refused.value).startswith(f"report.baseline={value!r} is invalid; allowed: a grid point as its ")
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------------------- the sweep report


def write_sweep(root: Path, jobs: list[tuple[dict, float | None]]) -> Path:
    """Job dirs as Hydra and train write them: overrides (key → value) and test/acc (None: the job failed)."""
    for job, (overrides, acc) in enumerate(jobs):
        (root / str(job) / ".hydra").mkdir(parents=True)
        lines = [f"{k}={v}" for k, v in overrides.items()] + ["trainer.max_epochs=1"]
        (root / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(lines))
        record = {"status": "failed", "error": "boom"} if acc is None else {"status": "ok", "test/acc": acc}
        if acc is not None:
            record.update({"val/acc_best": acc + 0.01, "test/acc_margin": acc - 0.1, "epochs": 1, "wall_time_s": 1.0})
        (root / str(job) / "metrics.json").write_text(json.dumps({"seed": overrides.get("seed"), **record}))
    return root


def table(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def acc_of(s: int, m: float, seed: int, fold: int) -> float:
    """Made-up accuracies with a different value for every replicate."""
    return round(0.8 + s / 1000 + m / 10 + seed / 100 + fold / 1000, 6)


def test_folds_and_seeds_are_replicates_counted_apart_with_mean_and_std(tmp_path: Path) -> None:
    grid = [(s, m, seed, fold) for s in (16, 30) for m in (0.3, 0.5) for seed in (0, 1) for fold in (0, 1, 2)]
    jobs = [
        ({"head.s": s, "head.m": m, "seed": seed, "data.fold": fold}, acc_of(s, m, seed, fold))
        for s, m, seed, fold in grid
    ]
    jobs[-1] = (jobs[-1][0], None)  # (30, 0.5, seed 1, fold 2) failed
    sweep = write_sweep(tmp_path / "sweep", jobs)
    report = write_report(sweep)
    assert "data.fold" in table(sweep / "summary.csv")[0] and len(table(sweep / "summary.csv")) == 24
    rows = {(r["head.s"], r["head.m"]): r for r in table(sweep / "summary_seeds.csv")}
    assert len(rows) == 4  # one row per grid point: seeds and folds are replicates, not points
    for s, m in [(16, 0.3), (16, 0.5), (30, 0.3), (30, 0.5)]:
        finished = [acc_of(s, m, seed, fold) for seed in (0, 1) for fold in (0, 1, 2) if (s, m, seed, fold) != grid[-1]]
        row = rows[(str(s), str(m))]
        assert (row["seeds"], row["folds"], row["n"]) == ("2", "3", str(len(finished)))
        assert float(row["test/acc mean"]) == pytest.approx(statistics.fmean(finished))
        assert float(row["test/acc std"]) == pytest.approx(statistics.stdev(finished))
    assert rows[("30", "0.5")]["failed"] == "1" and rows[("30", "0.5")]["n"] == "5"
    assert "## Over seeds and folds (mean, sample std)" in (sweep / "summary.md").read_text()
    assert [p.name for p in report["figures"]] == ["heatmap.png", "curves.png"]  # one figure, not one per fold


def test_the_curves_are_a_table_and_a_figure_with_one_curve_per_s(tmp_path: Path) -> None:
    grid = [(s, m, seed) for s in (4, 16, 30) for m in (0.1, 0.3, 0.5) for seed in (0, 1, 2)]
    jobs = [({"head.s": s, "head.m": m, "seed": seed}, acc_of(s, m, seed, 0)) for s, m, seed in grid]
    sweep = write_sweep(tmp_path / "sweep", jobs)
    report = write_report(sweep)
    curves = table(sweep / "summary_curves.csv")
    assert [(r["head.s"], r["head.m"]) for r in curves] == [
        (str(s), str(m)) for s in (4, 16, 30) for m in (0.1, 0.3, 0.5)
    ]
    for row in curves:
        values = [acc_of(int(row["head.s"]), float(row["head.m"]), seed, 0) for seed in (0, 1, 2)]
        assert float(row["test/acc mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["test/acc std"]) == pytest.approx(statistics.stdev(values))
        assert row["n"] == "3" and row["seeds"] == "3"
    text = (sweep / "summary.md").read_text()
    assert "## test/acc against m, one curve per s" in text and "| head.s | m=0.1 | m=0.3 | m=0.5 |" in text
    mean_4_01 = statistics.fmean(acc_of(4, 0.1, seed, 0) for seed in (0, 1, 2))
    assert f"| 4 | {mean_4_01:.4f} ± 0.0100 |" in text  # seeds 0, 1, 2 add 0, 0.01, 0.02: sample std 0.01
    curve_png = sweep / "curves.png"
    assert curve_png in report["figures"] and curve_png.read_bytes().startswith(PNG_MAGIC)
    assert curve_png.stat().st_size > 10_000


def test_a_single_m_has_no_curves(tmp_path: Path) -> None:
    jobs = [({"head.s": s, "head.m": 0.3, "seed": seed}, acc_of(s, 0.3, seed, 0)) for s in (16, 30) for seed in (0, 1)]
    sweep = write_sweep(tmp_path / "sweep", jobs)
    report = write_report(sweep)
    assert (
        report["curves"] == [] and not (sweep / "summary_curves.csv").exists() and not (sweep / "curves.png").exists()
    )


def baseline_sweep(root: Path) -> Path:
    """s ∈ {16, 30} × m ∈ {0.3, 0.5}, seeds 0–2: at s = 30, m = 0.5 − m = 0.3 is [0.01, 0.03, 0.02] seed by seed;
    (16, 0.5)'s seed 2 failed, (16, 0.3) finished only seed 0."""
    acc = {
        (30, 0.3): [0.90, 0.91, 0.92],
        (30, 0.5): [0.91, 0.94, 0.94],
        (16, 0.5): [0.93, 0.95, None],
        (16, 0.3): [0.80, None, None],
    }
    jobs = [({"head.s": s, "head.m": m, "seed": seed}, v) for (s, m), vs in acc.items() for seed, v in enumerate(vs)]
    return write_sweep(root, jobs)


def test_every_point_is_compared_with_the_baseline_paired_by_seed(tmp_path: Path) -> None:
    sweep = baseline_sweep(tmp_path / "sweep")
    report = write_report(sweep, "head.s=30,head.m=0.3")
    rows = {(r["head.s"], r["head.m"]): r for r in table(sweep / "summary_paired.csv")}
    assert sorted(rows) == [("16", "0.3"), ("16", "0.5"), ("30", "0.5")]  # the baseline is not compared with itself
    m05 = rows[("30", "0.5")]  # "m = 0.5 beats m = 0.3 at s = 30" as a row with an interval
    assert m05["baseline"] == "head.s=30,head.m=0.3" and (m05["paired"], m05["unpaired"]) == ("3", "0")
    assert float(m05["test/acc diff mean"]) == pytest.approx(0.02)
    assert float(m05["test/acc diff sd"]) == pytest.approx(0.01)
    assert float(m05["test/acc 95% low"]) == pytest.approx(0.02 - 0.024841, abs=1e-6)
    assert float(m05["test/acc 95% high"]) == pytest.approx(0.02 + 0.024841, abs=1e-6)
    assert m05["note"] == "0 inside"
    s16 = rows[("16", "0.5")]  # seed 2 failed there: 2 pairs, seed 2's baseline run unpaired
    assert (s16["paired"], s16["unpaired"]) == ("2", "1") and float(s16["test/acc diff mean"]) == pytest.approx(0.035)
    # differences [0.03, 0.04]: sd 0.01/√2, half-width t(0.975, 1) · (0.01/√2)/√2 = 12.706205 · 0.005
    assert float(s16["test/acc 95% low"]) == pytest.approx(0.035 - 12.706205 * 0.005, abs=1e-6)
    one = rows[("16", "0.3")]
    assert (one["paired"], one["unpaired"]) == ("1", "2") and one["test/acc 95% low"] == ""
    assert one["note"] == "1 paired replicate(s): fewer than 2, no interval"
    text = (sweep / "summary.md").read_text()
    assert "## Paired against head.s=30,head.m=0.3: test/acc" in text and "95% interval (Student t)" in text
    assert "| 30 | 0.5 | head.s=30,head.m=0.3 | 3 | 0 | 0.0200 | 0.0100 | -0.0048 | 0.0448 | 0 inside |" in text
    assert len(report["paired"]) == 3


def test_with_another_key_swept_each_of_its_values_has_its_own_baseline(tmp_path: Path) -> None:
    jobs = [
        ({"head.s": 30, "head.m": m, "embedding_size": e, "seed": seed}, 0.9 + (m == 0.5) * 0.01 * (seed + 1) + e / 1e4)
        for e in (32, 64)
        for m in (0.3, 0.5)
        for seed in (0, 1)
    ]
    sweep = write_sweep(tmp_path / "sweep", jobs)
    write_report(sweep, {"head.m": 0.3})
    rows = table(sweep / "summary_paired.csv")
    assert [(r["embedding_size"], r["baseline"]) for r in rows] == [
        ("32", "head.m=0.3,embedding_size=32"),
        ("64", "head.m=0.3,embedding_size=64"),
    ]
    assert all(float(r["test/acc diff mean"]) == pytest.approx(0.015) for r in rows)


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        (
            "head.s=30,head.m=0.4",
            "report.baseline='head.s=30,head.m=0.4' names no grid point; the points: head.s=16,head.m=0.3; "
            "head.s=16,head.m=0.5; head.s=30,head.m=0.3; head.s=30,head.m=0.5",
        ),
        (
            "head.s=30,embedding_size=8",
            "report.baseline='head.s=30,embedding_size=8': embedding_size is not a grid key of this sweep; the grid "
            "keys: head.s, head.m",
        ),
        (
            "head.s=30,seed=0",
            "report.baseline='head.s=30,seed=0': seed is a replicate (runs are paired by seed and fold), not a grid "
            "key; name the point by: head.s, head.m",
        ),
    ],
)
def test_a_baseline_that_names_no_grid_point_is_one_line_and_nothing_is_written(tmp_path, baseline, message) -> None:
    sweep = baseline_sweep(tmp_path / "sweep")
    with pytest.raises(SystemExit) as refused:
        write_report(sweep, baseline)
    assert str(refused.value) == f"error: {message}"
    assert not list(sweep.glob("summary*")) and not list(sweep.glob("*.png"))


def test_the_report_command_takes_report_baseline(tmp_path: Path, capsys) -> None:
    sweep = baseline_sweep(tmp_path / "sweep")
    main([str(sweep), "report.baseline=head.s=30,head.m=0.3"])
    assert len(table(sweep / "summary_paired.csv")) == 3
    with pytest.raises(SystemExit) as refused:
        main([str(sweep), "baseline=head.s=30"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (
        "error: argument report.baseline=POINT: unrecognized argument 'baseline=head.s=30'; allowed after the sweep "
        "dir: report.baseline=<point>, e.g. report.baseline=head.s=30,head.m=0.3; see python -m "
        "arcface_lightning.report --help\n"
    )


def sweep_config(sweep: Path, baseline: str | None, *task: str) -> OmegaConf:
    hydra = {
        "sweep": {"dir": str(sweep)},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": {"seed": "0,1,2"}},
        "overrides": {"task": list(task)},
    }
    return OmegaConf.create({"hydra": hydra, "report": {"baseline": baseline}})


def test_the_sweep_callback_checks_the_baseline_at_start_and_pairs_at_the_end(tmp_path: Path) -> None:
    grid = ["head.s=16,30", "head.m=0.3,0.5", "trainer.max_epochs=1"]
    callback, sweep = SweepReportCallback(), tmp_path / "sweep"
    callback.on_multirun_start(sweep_config(sweep, "head.s=30,head.m=0.3", *grid))  # a point of the grid: accepted
    with pytest.raises(SystemExit) as refused:
        callback.on_multirun_start(sweep_config(sweep, "head.s=30,head.m=0.4", *grid))
    assert str(refused.value) == (
        "error: report.baseline='head.s=30,head.m=0.4' names no grid point; the points: head.s=16,head.m=0.3; "
        "head.s=16,head.m=0.5; head.s=30,head.m=0.3; head.s=30,head.m=0.5"
    )
    with pytest.raises(SystemExit, match="seed is a replicate"):  # seed swept by hydra.sweeper.params
        callback.on_multirun_start(sweep_config(sweep, "seed=1", *grid))
    baseline_sweep(sweep)
    callback.on_multirun_end(sweep_config(sweep, "head.s=30,head.m=0.3", *grid))
    assert len(table(sweep / "summary_paired.csv")) == 3


def test_a_multirun_with_a_baseline_outside_its_grid_stops_before_its_first_job(mnist_root: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = multirun(sweep, mnist_root, "head.s=8,16", "head.m=0.1", 'report.baseline="head.s=30"')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: report.baseline='head.s=30' names no grid point; the points: head.s=8; head.s=16"
    )
    assert not list(sweep.glob("*/metrics.json"))


# ------------------------------------------------------------------------------------------------- compare


def test_heads_are_paired_by_seed_against_the_baseline_head() -> None:
    runs = {
        "softmax": [{"seed": s, "test/acc": v} for s, v in enumerate((0.90, 0.91, 0.92))],
        "arcface": [{"seed": s, "test/acc": v} for s, v in enumerate((0.91, 0.94, 0.94))],
        "cosface": [{"seed": 0, "test/acc": 0.95}],
    }
    rows = {r["head"]: r for r in paired_groups(runs, "softmax", ["test/acc"])}
    assert sorted(rows) == ["arcface", "cosface"]
    assert rows["arcface"]["diff_mean"] == pytest.approx(0.02) and rows["arcface"]["paired"] == 3
    assert rows["arcface"]["high"] == pytest.approx(0.044841, abs=1e-6)
    assert rows["cosface"]["paired"] == 1 and rows["cosface"]["unpaired"] == 2 and math.isnan(rows["cosface"]["low"])
