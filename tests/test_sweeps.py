"""Sweeps end to end: real multiruns (basic, joblib, Optuna) on synthetic data, failures, and the report."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from forked import fork_command
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from arcface_lightning.report import write_report
from conftest import ROOT, multirun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def summary(sweep_dir: Path, name: str = "summary.csv") -> list[dict[str, str]]:
    with open(sweep_dir / name) as f:
        return list(csv.DictReader(f))


def tensorboard_hparams(log_dir: Path) -> dict:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = HParamsPluginData.FromString(content).session_start_info
    return {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in info.hparams.items()}


@pytest.mark.slow
def test_grid_multirun_writes_every_job_and_the_report(mnist_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = multirun(sweep, mnist_root, "head.s=8,16", "head.m=0.1,0.3")
    assert result.returncode == 0, result.stderr[-3000:]
    for job in range(4):
        record = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert record["status"] == "ok" and (sweep / str(job) / "tensorboard").is_dir()
    rows = summary(sweep)  # written by the callback when the multirun ended
    assert sorted((r["head.s"], r["head.m"]) for r in rows) == [
        ("16", "0.1"),
        ("16", "0.3"),
        ("8", "0.1"),
        ("8", "0.3"),
    ]
    for row in rows:  # each row carries its own job's numbers
        record = json.loads((sweep / row["job"] / "metrics.json").read_text())
        overrides = yaml.safe_load((sweep / row["job"] / ".hydra" / "overrides.yaml").read_text())
        assert f"head.s={row['head.s']}" in overrides and float(row["test/acc"]) == record["test/acc"]
    val = [float(r["val/acc_best"]) for r in rows]
    assert val == sorted(val, reverse=True)  # best first
    for row in rows:  # TensorBoard's HPARAMS tab: each job's s, m, ... against its metrics
        assert tensorboard_hparams(sweep / row["job"] / "tensorboard")["head/s"] == float(row["head.s"])
    heatmap = (sweep / "heatmap.png").read_bytes()
    assert heatmap.startswith(PNG_MAGIC) and len(heatmap) > 10_000
    assert "| job | head.s | head.m | seed |" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_processes_and_a_bad_grid_point_fails_alone(mnist_root, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    result = multirun(sweep, mnist_root, *launcher, "head.m=0.3,5", process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    rows = {r["head.m"]: r for r in summary(sweep)}
    assert sorted(rows) == ["0.3", "5"]
    assert rows["0.3"]["status"] == "ok" and float(rows["0.3"]["test/acc"]) > 0
    assert rows["5"]["status"] == "failed"
    assert rows["5"]["error"] == "head.m=5 is invalid; allowed: 0 ≤ m < π (ArcFaceHead)"


@pytest.mark.slow
def test_optuna_search_runs_trials_and_returns_the_metric(mnist_root: Path, tmp_path: Path) -> None:
    """Two trials kept in a SQLite study, then the study resumed for one more (the README's storage command)."""
    sweep, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'optuna.db'}"
    study = ["hparams_search=optuna", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=resumable"]
    result = multirun(sweep, mnist_root, *study, "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    result = multirun(tmp_path / "resumed", mnist_root, *study, "hydra.sweeper.n_trials=1")
    assert result.returncode == 0, result.stderr[-3000:]
    import optuna

    trials = optuna.load_study(study_name="resumable", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # 2 written, then 1 more in the resumed study
    rows = summary(sweep)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for row in rows:  # Optuna's suggestions stay inside the search space
        assert 1 <= float(row["head.s"]) <= 128 and 0 <= float(row["head.m"]) <= 0.8
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(float(r["val/acc_best"]) for r in rows))
    assert (sweep / "scatter.png").read_bytes().startswith(PNG_MAGIC)  # s, m are not a grid here


def fake_sweep(root: Path, results: dict[tuple[float, float, int], float | None]) -> Path:
    """Job dirs as Hydra and train write them, with chosen numbers (None: the job failed)."""
    for job, ((s, m, seed), acc) in enumerate(results.items()):
        job_dir = root / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        overrides = [f"head.s={s}", f"head.m={m}", f"seed={seed}", "trainer.max_epochs=1"]
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        record = (
            {"seed": seed, "status": "failed", "error": "boom"}
            if acc is None
            else {
                "seed": seed,
                "status": "ok",
                "val/acc_best": acc + 0.001,
                "test/acc": acc,
                "test/acc_margin": acc - 0.05,
                "epochs": 1,
                "wall_time_s": 1.0,
            }
        )
        (job_dir / "metrics.json").write_text(json.dumps(record))
    return root


def test_seeds_are_aggregated_with_mean_and_sample_std(tmp_path: Path) -> None:
    results = {
        (8, 0.1, 0): 0.91,
        (8, 0.1, 1): 0.93,
        (8, 0.1, 2): 0.96,
        (16, 0.1, 0): 0.97,
        (16, 0.1, 1): 0.99,
        (16, 0.1, 2): None,
        (8, 0.3, 0): 0.90,
        (8, 0.3, 1): 0.92,
        (16, 0.3, 0): 0.95,
        (16, 0.3, 1): 0.94,
    }
    sweep = fake_sweep(tmp_path / "sweep", results)
    write_report(sweep)
    rows = summary(sweep)
    assert len(rows) == 10 and rows[-1]["status"] == "failed" and rows[-1]["error"] == "boom"
    table = {(r["head.s"], r["head.m"]): r for r in summary(sweep, "summary_seeds.csv")}
    assert len(table) == 4
    for (s, m), entry in table.items():
        accs = [float(r["test/acc"]) for r in rows if (r["head.s"], r["head.m"]) == (s, m) and r["status"] == "ok"]
        assert int(entry["n"]) == len(accs)
        assert float(entry["test/acc mean"]) == pytest.approx(statistics.mean(accs))
        assert float(entry["test/acc std"]) == pytest.approx(statistics.stdev(accs))
    assert table[("16", "0.1")]["failed"] == "1" and table[("16", "0.1")]["n"] == "2"  # failed jobs are not averaged
    best = max(table.values(), key=lambda e: float(e["val/acc_best mean"]))
    assert (best["head.s"], best["head.m"]) == ("16", "0.1")
    assert (sweep / "heatmap.png").read_bytes().startswith(PNG_MAGIC)


def test_a_by_class_sweep_is_ranked_and_drawn_by_retrieval_not_closed_set_accuracy(tmp_path: Path) -> None:
    """Runs with data.val_split=by_class select on val/precision_at_1 and have no test/acc: the report follows."""
    sweep = tmp_path / "sweep"
    points = {(8, 0.1): (0.70, 0.66), (8, 0.3): (0.80, 0.71), (16, 0.1): (0.75, 0.79), (16, 0.3): (0.60, 0.55)}
    for job, ((s, m), (val_p1, test_p1)) in enumerate(points.items()):
        job_dir = sweep / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"head.s={s}", f"head.m={m}"]))
        record = {"status": "ok", "val/precision_at_1_best": val_p1, "test/precision_at_1": test_p1}
        (job_dir / "metrics.json").write_text(json.dumps({**record, "test/map_at_r": test_p1 / 2}))
    report = write_report(sweep)
    rows = summary(sweep)
    assert [float(r["val/precision_at_1_best"]) for r in rows] == [0.80, 0.75, 0.70, 0.60]  # best first
    assert "test/acc" not in rows[0] and float(rows[0]["test/precision_at_1"]) == 0.71
    assert (sweep / "summary.md").read_text().count("sorted by val/precision_at_1_best") == 1
    assert [p.name for p in report["figures"]] == ["heatmap.png", "curves.png"]


def test_other_swept_keys_get_one_heatmap_per_value(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job, (s, m, size) in enumerate(
        [
            (8, 0.1, 32),
            (8, 0.3, 32),
            (16, 0.1, 32),
            (16, 0.3, 32),
            (8, 0.1, 64),
            (8, 0.3, 64),
            (16, 0.1, 64),
            (16, 0.3, 64),
        ]
    ):
        job_dir = sweep / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        overrides = [f"head.s={s}", f"head.m={m}", f"embedding_size={size}"]
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (job_dir / "metrics.json").write_text(json.dumps({"status": "ok", "test/acc": 0.9, "val/acc_best": 0.9}))
    report = write_report(sweep)
    assert sorted(p.name for p in report["figures"]) == [
        "curves_embedding_size=32.png",
        "curves_embedding_size=64.png",
        "heatmap_embedding_size=32.png",
        "heatmap_embedding_size=64.png",
    ]


def test_two_sweeps_started_together_get_their_own_folders(tmp_path: Path) -> None:
    argv = ["--cfg", "all", "--resolve", "-p", "hydra.sweep.dir"]
    processes = [fork_command("train", argv, tmp_path / "logs") for _ in range(2)]  # two processes in the same second
    assert [p.wait() for p in processes] == [0, 0]
    dirs = [p.output()[0].strip() for p in processes]
    assert all(d.startswith(str(ROOT / "logs" / "train" / "multiruns")) for d in dirs)
    assert dirs[0] != dirs[1]
