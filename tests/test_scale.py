"""Scale-out and fault tolerance, proved on CPU: DDP over gloo, mixed precision, submitit, kill and resume."""

from __future__ import annotations

import io
import json
import signal
import time
from pathlib import Path

import pytest
import torch
from forked import fork_command

from arcface_lightning.train import train
from conftest import TINY, cli, cli_process, multirun, write_mnist


@pytest.mark.slow
def test_ddp_cpu_trains_two_ranks_into_one_run_dir(mnist_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    result = cli_process(  # with the figures: their test embeddings are gathered from both ranks
        "train", f"hydra.run.dir={run_dir}", f"paths.data_dir={mnist_root}", *TINY, "trainer=ddp_cpu",
        "evaluation.figures=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # rank 1's exit is not the launcher's
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok" and record["world_size"] == 2
    assert record["train/samples"] == 500  # 2 ranks × 250: each trained on its own half of the 500 images
    assert list(tmp_path.rglob("metrics.json")) == [run_dir / "metrics.json"]  # one writer
    assert [p.parent for p in tmp_path.rglob("events.out.tfevents.*")] == [run_dir / "tensorboard"] * len(
        list(tmp_path.rglob("events.out.tfevents.*"))
    )
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {".hydra", "checkpoints", "tensorboard"}
    # the synced accuracy equals a single process's test of the same checkpoint
    single = tmp_path / "single"
    result = cli(
        "evaluate",
        f"ckpt_path={record['best_checkpoint']}",
        f"hydra.run.dir={single}",
        f"paths.data_dir={mnist_root}",
        "trainer=cpu",
        "data.download=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((single / "metrics.json").read_text())
    for key in ("test/acc", "test/precision_at_1", "test/map_at_r", "test/verification_auc"):  # gathered from 2 ranks
        assert evaluated[key] == pytest.approx(record[key], abs=1e-6), key


def test_ddp_inside_a_multirun_is_refused_with_what_to_use(mnist_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = multirun(sweep, mnist_root, "head.s=8,16", "trainer=ddp_cpu")
    rows = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert result.returncode == 0 and len(rows) == 2
    for row in rows:
        assert row["status"] == "failed" and "cannot run inside a Hydra multirun" in row["error"]
        assert "trainer.strategy=ddp_spawn" in row["error"]


def test_bf16_mixed_training_stays_finite(make_cfg) -> None:
    metrics = train(make_cfg("trainer.precision=bf16-mixed", "trainer.max_epochs=2", "logger=csv"))
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train/loss", "val/loss", "test/loss"))
    assert metrics["test/acc"] > 0.5


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_multirun(mnist_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = multirun(sweep, mnist_root, "hydra/launcher=submitit_local", "head.m=0.2,0.4", process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert [r["status"] for r in records] == ["ok", "ok"] and (sweep / "summary.csv").is_file()


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    root = write_mnist(tmp_path / "data", n_train=3000, n_test=200)  # epochs long enough to kill inside one
    args = [
        f"paths.data_dir={root}",
        *TINY,
        "data.batch_size=16",
        "trainer.max_epochs=2",  # killed in the last epoch: the resumed run restores it and finishes the run
        "trainer.deterministic=true",
        "logger=csv",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert cli("train", *args, f"hydra.run.dir={full}").returncode == 0

    process = fork_command("train", [*args, f"hydra.run.dir={killed}"], tmp_path / "logs")
    last, deadline = killed / "checkpoints" / "last.ckpt", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:  # wait for the first epoch's checkpoint, complete on disk
            if torch.load(last, weights_only=True)["epoch"] == 0:
                break
        except Exception:
            pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and not (killed / "metrics.json").exists()
    assert torch.load(last, weights_only=True)["epoch"] == 0  # killed during the second epoch

    result = cli("train", *args, f"hydra.run.dir={killed}", "ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((full / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    assert Path(resumed.pop("best_checkpoint")).name == Path(expected.pop("best_checkpoint")).name
    for timing in ("wall_time_s", "time/fit_s", "time/test_s"):
        assert resumed.pop(timing) > 0 and expected.pop(timing) > 0
    assert resumed == expected  # every metric, bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT (Ctrl-C)"])
def test_sigterm_and_sigint_save_a_checkpoint_before_exit(tmp_path: Path, signum: signal.Signals) -> None:
    root = write_mnist(tmp_path / "data", n_train=3000, n_test=200)
    run_dir = tmp_path / "run"
    args = [f"paths.data_dir={root}", *TINY, "data.batch_size=8", "trainer.max_epochs=50", f"hydra.run.dir={run_dir}"]
    process = fork_command("train", [*args, "logger=csv"], tmp_path / "logs")  # SIGINT as in a terminal (forked.py)
    metrics_csv, deadline = run_dir / "csv" / "metrics.csv", time.monotonic() + 120
    while not metrics_csv.exists() and time.monotonic() < deadline:  # wait until it trains
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signum)
    process.wait(timeout=120)
    stderr = process.output()[1]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] > 0 and state["epoch"] < 49  # saved where it stopped, long before the end
    assert process.returncode != 0  # a pre-empted run does not pass for a finished one
    record = json.loads((run_dir / "metrics.json").read_text())
    resume = f"resume: ckpt_path=last hydra.run.dir={run_dir}"
    assert record["status"] == "interrupted" and record["error"] == f"{signum.name}; {resume}"
    assert stderr.strip().splitlines()[-1] == f"interrupted: {signum.name}; {resume}" and "Traceback" not in stderr


def saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"not a checkpoint", "is not a readable checkpoint"),
        (saved(torch.zeros(3)), r"is not a Lightning checkpoint \(it holds a Tensor, no state_dict\)"),
    ],
)
def test_bad_ckpt_path_is_one_line_and_overwrites_nothing(make_cfg, tmp_path: Path, content, message) -> None:
    from arcface_lightning.core.runs import run

    ckpt = tmp_path / "x.ckpt"
    if content is not None:
        ckpt.write_bytes(content)
    record_path = tmp_path / "run" / "metrics.json"
    record_path.parent.mkdir()
    record_path.write_text('{"status": "ok"}')  # an earlier run's record in the dir we resume into
    with pytest.raises(SystemExit, match=f"^error: ckpt_path={ckpt} {message}"):
        run(train, make_cfg(f"ckpt_path={ckpt}"))
    assert record_path.read_text() == '{"status": "ok"}'
    with pytest.raises(SystemExit, match=r"^error: ckpt_path=last: no .*last.ckpt; pass hydra.run.dir="):
        run(train, make_cfg("ckpt_path=last"))


def test_resuming_with_another_model_config_is_one_line(trained, tmp_path: Path) -> None:
    from arcface_lightning.core.runs import run
    from conftest import tiny_config

    data, record = trained
    cfg = tiny_config(data, tmp_path / "run", f"ckpt_path={record['best_checkpoint']}", "embedding_size=32")
    with pytest.raises(SystemExit, match=r"^error: ckpt_path=.* holds backbone\..* of shape \(16, .*\) but this con"):
        run(train, cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
