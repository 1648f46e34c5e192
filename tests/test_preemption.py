"""Sweeps that survive pre-emption: `resume=auto` reruns the same multirun into the same sweep dir, skipping the
finished jobs (their folders untouched), continuing interrupted ones from their checkpoints and rerunning failed
ones; SLURM's requeue signal saves a checkpoint that the requeued job continues from."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from forked import fork_command

from conftest import TINY, cli, multirun, write_mnist

JOB = [*TINY, "data.batch_size=16", "trainer.max_epochs=2", "trainer.deterministic=true", "logger=csv"]
GRID = "head.m=0.1,0.2,0.3"  # killed in job 1: a finished job, an interrupted one, one not started


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and its modification time in nanoseconds."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def comparable(record: dict) -> dict:
    """A job's metrics.json without what differs between two runs of the same job (timings, its folder)."""
    drop = ("wall_time_s", "time/fit_s", "time/test_s", "best_checkpoint")
    return {k: v for k, v in record.items() if k not in drop}


def records(sweep: Path) -> list[dict]:
    return [json.loads((sweep / str(job) / "metrics.json").read_text()) for job in range(3)]


@pytest.mark.slow
def test_a_killed_sweep_rerun_with_resume_auto_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    data = write_mnist(tmp_path / "data", n_train=600, n_test=100)  # 2 epochs of 32 steps: killed inside one
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert multirun(full, data, *JOB, GRID).returncode == 0

    argv = ["-m", f"hydra.sweep.dir={killed}", f"paths.data_dir={data}", *JOB, GRID]
    process = fork_command("train", argv, tmp_path / "logs")
    last, deadline = killed / "1" / "checkpoints" / "last.ckpt", time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:  # the second job's first epoch is on disk: kill the sweep inside its second epoch
            if torch.load(last, weights_only=True)["epoch"] == 0:
                break
        except Exception:
            pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [(killed / str(j) / "metrics.json").is_file() for j in range(3)] == [True, False, False]
    finished = {0: folder_state(killed / "0")}

    rerun = multirun(killed, data, *JOB, GRID, "resume=auto")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [r["status"] for r in records(killed)] == ["ok"] * 3
    assert {0: folder_state(killed / "0")} == finished  # not launched: bytes and mtimes
    assert "resume=auto: continuing from" in (killed / "1" / "train.log").read_text()
    assert "resume=auto: continuing" not in (killed / "2" / "train.log").read_text()  # it had not started
    assert [comparable(r) for r in records(killed)] == [comparable(r) for r in records(full)]  # bit for bit
    assert (killed / "summary.csv").read_text().count("\n") == (full / "summary.csv").read_text().count("\n")


@pytest.mark.slow
def test_resume_auto_reruns_failed_jobs_and_nothing_else(tmp_path: Path, mnist_root: Path) -> None:
    sweep = tmp_path / "sweep"
    assert multirun(sweep, mnist_root, "head.m=0.1,0.3").returncode == 0
    record = json.loads((sweep / "1" / "metrics.json").read_text())
    (sweep / "1" / "metrics.json").write_text(json.dumps({**record, "status": "failed", "error": "out of memory"}))
    untouched = folder_state(sweep / "0")

    assert multirun(sweep, mnist_root, "head.m=0.1,0.3", "resume=auto").returncode == 0
    assert folder_state(sweep / "0") == untouched
    rerun = json.loads((sweep / "1" / "metrics.json").read_text())
    assert rerun["status"] == "ok" and "error" not in rerun
    assert "failed: starting again" in (sweep / "1" / "train.log").read_text()
    assert comparable(rerun) == comparable(record)  # from the start, as the first time

    again = multirun(sweep, mnist_root, "head.m=0.1,0.3", "resume=auto")  # all finished: nothing runs
    assert again.returncode == 0 and folder_state(sweep / "1")["metrics.json"][1] == (
        (sweep / "1" / "metrics.json").stat().st_mtime_ns
    )


def test_resume_auto_into_a_sweep_dir_of_another_grid_is_one_line(tmp_path: Path, mnist_root: Path) -> None:
    sweep = tmp_path / "sweep"
    assert multirun(sweep, mnist_root, "head.m=0.1,0.3").returncode == 0
    result = multirun(sweep, mnist_root, "head.m=0.2,0.3", "resume=auto")
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert "resume=auto" in line and "head.m=0.1" in line and "head.m=0.2" in line and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["resume=always"], "resume='always' is invalid; allowed: auto or null"),
        (["resume=auto", "ckpt_path=x.ckpt"], "ckpt_path=x.ckpt cannot combine with resume=auto"),
    ],
)
def test_bad_resume_is_one_line(tmp_path: Path, mnist_root: Path, overrides: list[str], message: str) -> None:
    result = cli("train", f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={mnist_root}", *TINY, *overrides)
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_auto_on_a_finished_run_does_nothing(tmp_path: Path, mnist_root: Path) -> None:
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"paths.data_dir={mnist_root}", *TINY, "resume=auto"]
    assert cli("train", *args).returncode == 0  # nothing to resume: a plain run
    before = folder_state(run_dir / "checkpoints"), (run_dir / "metrics.json").stat().st_mtime_ns
    result = cli("train", *args)
    assert result.returncode == 0
    assert (folder_state(run_dir / "checkpoints"), (run_dir / "metrics.json").stat().st_mtime_ns) == before
    assert "finished already" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_slurm_requeue_signal_saves_a_checkpoint_the_requeued_job_continues_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's SLURM environment (auto-requeue on SIGUSR1, which conf/hydra/launcher/submitit_slurm.yaml asks
    SLURM to send before the time limit) on a faked SLURM job: the signal saves hpc_ckpt_1.ckpt and calls
    `scontrol requeue <job id>`; the requeued job, started with resume=auto, continues from that checkpoint."""
    data = write_mnist(tmp_path / "data", n_train=1500, n_test=100)
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"paths.data_dir={data}", *JOB, "resume=auto"]
    process = fork_command("train", args, tmp_path / "logs", env={**slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    metrics_csv, deadline = run_dir / "csv" / "metrics.csv", time.monotonic() + 120
    while not metrics_csv.exists() and time.monotonic() < deadline:  # wait until it trains
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGUSR1)
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    while not (calls.exists() and hpc.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # the checkpoint is saved before the requeue call
    process.send_signal(signal.SIGKILL)  # SLURM ends the job it requeued
    process.wait()
    assert calls.read_text().split() == ["requeue", "4242"]
    saved = torch.load(hpc, weights_only=True)
    assert saved["global_step"] > 0 and not (run_dir / "metrics.json").exists()

    for key, value in slurm.items():  # the requeued job: the same command, in this process (no new interpreter)
        monkeypatch.setenv(key, value)
    requeued = cli("train", *args)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resume=auto: continuing from {hpc}" in (run_dir / "train.log").read_text()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == 2
