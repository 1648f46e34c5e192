"""The entry points end to end: in-process on synthetic data, and as real subprocesses for the CLI contract."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from arcface_lightning.core.config import ConfigError, print_config
from arcface_lightning.core.runs import run
from arcface_lightning.evaluate import evaluate
from arcface_lightning.train import build, train
from arcface_lightning.training.module import DivergedError
from conftest import ROOT, TINY, cifar10_checksums, cli, compose_config, write_cifar10


def test_fast_dev_run(make_cfg) -> None:
    metrics = train(make_cfg("trainer.fast_dev_run=2"))
    assert metrics["epochs"] == 1 and metrics["best_checkpoint"] == ""  # fast_dev_run saves no checkpoint
    assert 0.0 <= metrics["test/acc"] <= 1.0 and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_short_run_writes_metrics_checkpoints_and_tensorboard(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("trainer.max_epochs=2", "evaluation.figures=true")
    record = run(train, cfg)
    run_dir = tmp_path / "run"
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written == record
    assert written["status"] == "ok" and written["seed"] == 0 and written["epochs"] == 2
    assert written["test/acc"] > 0.5  # the synthetic classes are easy: it must have learned (chance is 0.1)
    for key in (
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "val/acc_margin",
        "test/loss",
        "test/acc",
        "test/acc_margin",
        "test/precision_at_1",
        "test/map_at_r",
        "test/verification_auc",
        "test/tar_at_far_1e-3",
        "test/verification_acc",
        "wall_time_s",
    ):
        assert isinstance(written[key], float), key
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2
    assert Path(written["best_checkpoint"]).name in checkpoints
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/acc", "val/acc_best", "train/loss", "train/loss_step", "test/acc", "test/acc_margin"} <= tags
    assert len(events.Scalars("val/acc")) == 2  # one point per epoch
    assert events.PluginTagToContent("hparams")  # the HPARAMS tab has this run
    assert {"val/angles", "test/angles"} <= set(events.Tags()["images"])  # the angle figure, each epoch and at test
    assert {"val/angle_to_own_centre", "val/angle_to_nearest_other_centre"} <= set(events.Tags()["histograms"])
    projector = (run_dir / "tensorboard" / "projector_config.pbtxt").read_text()
    assert "test/embeddings" in projector and "sprite.png" in projector
    (sprite,) = (run_dir / "tensorboard").rglob("sprite.png")
    metadata = (sprite.parent / "metadata.tsv").read_text().split()
    assert len(metadata) == 200 and set(metadata) == {str(c) for c in range(10)}  # all 200 test images, labelled


def test_resume_from_last_checkpoint_continues_at_the_next_epoch(make_cfg, tmp_path: Path) -> None:
    first = run(train, make_cfg("trainer.max_epochs=1", "logger=csv", "trainer.limit_train_batches=4"))
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0
    assert saved["state_dict"]["val_acc_best.max_value"].item() == pytest.approx(first["val/acc_best"])
    # resume in the same run dir: the best checkpoint and val/acc_best carry over
    last = checkpoints / "last.ckpt"
    second = run(
        train, make_cfg("trainer.max_epochs=2", "logger=csv", "trainer.limit_train_batches=4", f"ckpt_path={last}")
    )
    assert second["epochs"] == 2
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 8  # 4 steps restored + 4 new ones
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["val/acc"]]
    assert [row["epoch"] for row in rows] == ["1"]  # the resumed run trained (and validated) epoch 1 only
    resumed_val_acc = float(rows[0]["val/acc"])
    assert second["val/acc_best"] == pytest.approx(max(first["val/acc_best"], resumed_val_acc))
    best = Path(second["best_checkpoint"])
    assert best.parent == checkpoints and f"val_acc_{second['val/acc_best']:.4f}" in best.name
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([best.name, "last.ckpt"])


def test_last_checkpoint_is_written_every_epoch_and_best_only_on_improvement(make_cfg, tmp_path: Path) -> None:
    record = run(train, make_cfg("optimizer.lr=0", "trainer.max_epochs=3", "logger=csv"))  # val/acc never improves
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2
    assert Path(record["best_checkpoint"]).name.startswith("epoch_000-")
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([Path(record["best_checkpoint"]).name, "last.ckpt"])


def test_cifar10_trains(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    root = write_cifar10(tmp_path / "cifar")
    for attribute, value in cifar10_checksums(root).items():
        monkeypatch.setattr(datasets.CIFAR10, attribute, value)
    metrics = train(make_cfg("data=cifar10", f"paths.data_dir={root}", "trainer.max_epochs=3", "data.val_size=100"))
    assert metrics["test/acc"] > 0.5  # 3×32×32 input through the same backbone config, and it learns


def test_both_pipelines_train_to_the_same_metrics(make_cfg, tmp_path: Path) -> None:
    runs = {}
    for name, pipeline in (("tensor", "tensor"), ("torchvision", "torchvision"), ("on_device", "tensor")):
        cfg = make_cfg(
            f"data.pipeline={pipeline}",
            f"data.on_device={name == 'on_device'}",  # the set on the training device (here the CPU)
            "logger=csv",
            "trainer.max_epochs=2",
            "trainer.deterministic=true",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        runs[name] = {k: v for k, v in train(cfg).items() if not k.startswith("time/") and k != "best_checkpoint"}
    # the same batches, hence the same model, bit for bit
    assert runs["tensor"] == runs["torchvision"] == runs["on_device"]


@pytest.mark.parametrize("augment", ["affine", "crop_flip"])
def test_augmented_runs_are_reproducible_and_learn(make_cfg, tmp_path: Path, augment: str) -> None:
    records = []
    for name in ("a", "b"):
        cfg = make_cfg(f"data.augment={augment}", "logger=csv", "trainer.max_epochs=3", "trainer.deterministic=true")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        records.append(train(cfg))
    assert records[0]["train/loss"] == records[1]["train/loss"]  # augmentation draws are seeded
    assert records[0]["test/acc"] > 0.5


def test_cifar10_resnet_recipe_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    root = write_cifar10(tmp_path / "cifar", n_train=1000)
    for attribute, value in cifar10_checksums(root).items():
        monkeypatch.setattr(datasets.CIFAR10, attribute, value)
    tiny = [arg for arg in TINY if not arg.startswith("backbone.")]
    recipe = ["experiment=cifar10_resnet", "backbone.width=8", "backbone.blocks=[1,1]", "trainer.max_epochs=4"]
    cfg = compose_config(f"paths.data_dir={root}", *tiny, *recipe, "logger=csv", f"paths.output_dir={tmp_path / 'run'}")
    metrics = train(cfg)
    assert metrics["epochs"] == 4 and metrics["train/samples"] == 900
    # It learns through crop + flip, SGD and OneCycle. The synthetic classes are square positions, and a flip maps
    # some onto others (at best ~60% here), so the bar is 3× chance.
    assert metrics["test/acc"] > 0.3


def test_fast_dev_run_and_overfit_debug_configs_run(make_cfg, capsys: pytest.CaptureFixture) -> None:
    record = run(train, make_cfg("debug=fdr"))
    assert record["status"] == "ok" and record["best_checkpoint"] == ""  # fast_dev_run writes no checkpoint
    assert "arcface_lightning.models.heads.ArcFaceHead" in capsys.readouterr().out  # debug configs print the config
    overfit = train(make_cfg("debug=overfit", "trainer.max_epochs=15", "logger=csv"))
    assert overfit["train/acc"] == 1.0 and overfit["train/loss"] < 1.0  # 3 batches, learned by heart


def test_print_config_and_tags(make_cfg, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    record = run(train, make_cfg("extras.print_config=true", "tags=[baseline,s16]", "trainer.fast_dev_run=1"))
    shown = capsys.readouterr().out
    assert record["tags"] == ["baseline", "s16"] and "ArcFaceHead" in shown and "baseline" in shown
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tags"] == ["baseline", "s16"]
    monkeypatch.setitem(sys.modules, "rich", None)  # without rich: plain YAML
    print_config(make_cfg())
    assert "  _target_: arcface_lightning.models.heads.ArcFaceHead\n" in capsys.readouterr().out


def test_tags_reach_tensorboards_hparams(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("tags=[baseline,s16]", "trainer.limit_train_batches=2"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert any(b"baseline,s16" in content for content in events.PluginTagToContent("hparams").values())


def test_profile_debug_config_writes_the_profile(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("debug=profile", "logger=csv", "trainer.limit_train_batches=3"))
    report = (tmp_path / "run" / "fit-profile.txt").read_text()
    assert "run_training_batch" in report and "optimizer_step" in report and "train_dataloader_next" in report


def test_cli_train_then_evaluate(mnist_root: Path, tmp_path: Path) -> None:
    """The open-set protocol (two test loaders) through both entry points, loggers chosen with Hydra's list form."""
    run_dir = tmp_path / "cli_run"
    train_args = ["data.normalize=false", "data.val_size=50", "trainer.max_epochs=2"]  # evaluate must reuse these
    train_args += ["experiment=mnist_openset", "logger=[csv,tensorboard]"]
    result = cli("train", f"paths.data_dir={mnist_root}", f"hydra.run.dir={run_dir}", *TINY, *train_args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file() and list((run_dir / "tensorboard").glob("events.out.*"))
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert str(run_dir) in result.stdout + result.stderr  # it says where the run went
    eval_dir = tmp_path / "eval_run"
    result = cli(
        "evaluate",
        f"ckpt_path={trained['best_checkpoint']}",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={eval_dir}",
        "trainer=cpu",
        "data.download=false",
        "data.eval_batch_size=100",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert evaluated["status"] == "ok" and evaluated["dataset"] == "MNIST"
    tested = sorted(k for k in trained if k.startswith(("test/", "openset/")))
    assert "openset/map_at_r" in tested
    assert sorted(k for k in evaluated if k.startswith(("test/", "openset/"))) == tested
    for key in tested:  # the same model on the same data: the same names and numbers as train's own test
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key


@pytest.mark.parametrize("group, name", [("data", "imagenet")])  # every group: test_errors.py, in-process
def test_cli_unknown_names_list_the_choices(tmp_path: Path, group: str, name: str) -> None:
    result = cli("train", f"{group}={name}", f"hydra.run.dir={tmp_path / 'x'}")
    assert result.returncode != 0
    choices = ", ".join(sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")))
    assert result.stderr.strip() == f"error: {group}={name} is not a config in conf/{group}/; allowed: {choices}"
    assert not (tmp_path / "x").exists()  # refused before Hydra made a run dir


def test_evaluate_needs_a_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config(config_name="eval")
    cfg.paths.output_dir = str(tmp_path / "x")
    with pytest.raises(SystemExit) as exit_info:  # the line the command prints (one-line CLI errors: test_errors.py)
        run(evaluate, cfg)
    assert (
        str(exit_info.value)
        == "error: ckpt_path is required: python -m arcface_lightning.evaluate ckpt_path=<file.ckpt>"
    )


@pytest.mark.parametrize(
    "error, status",
    [
        (None, "ok"),
        (DivergedError("diverged: train/loss is nan at epoch 0, step 3"), "diverged"),
        (ConfigError("ArcFaceHead: m=5 is invalid"), "failed"),
        (RuntimeError("out of memory\nsecond line"), "failed"),
    ],
)
def test_run_in_a_sweep_records_every_outcome_and_returns(tmp_path: Path, make_cfg, error, status: str) -> None:
    def task(cfg):
        if error is not None:
            raise error
        return {"test/acc": 0.5}

    record = run(task, make_cfg("seed=3"), in_sweep=True)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record == written and written["status"] == status and written["seed"] == 3 and written["wall_time_s"] >= 0
    if error is not None:
        assert written["error"] == str(error).splitlines()[0]


def test_run_alone_exits_with_one_line_or_keeps_the_traceback(tmp_path: Path, make_cfg) -> None:
    def diverge(cfg):
        raise DivergedError("diverged: train/loss is nan at epoch 0, step 3")

    with pytest.raises(SystemExit, match=r"^error: diverged: train/loss is nan at epoch 0, step 3$"):
        run(diverge, make_cfg())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "diverged"

    def crash(cfg):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: the traceback stays
        run(crash, make_cfg())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["error"] == "a bug"


def test_nan_loss_stops_training_at_once_as_diverged(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("optimizer=sgd", "optimizer.lr=1e30", "trainer.max_epochs=3")
    record = run(train, cfg, in_sweep=True)
    assert record["status"] == "diverged"
    assert record["error"].startswith("diverged: train/loss is nan at epoch 0, step ")
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped within the first epoch: nothing saved


def test_open_set_experiment_reports_unseen_class_retrieval(make_cfg) -> None:
    cfg = make_cfg("experiment=mnist_openset", "data.val_size=50", "trainer.max_epochs=2")
    assert build(cfg)[1].head.num_classes == 5
    metrics = train(cfg)
    for name in ("precision_at_1", "map_at_r", "verification_auc", "tar_at_far_1e-3"):
        assert 0.0 <= metrics[f"openset/{name}"] <= 1.0 and f"test/{name}" in metrics
    assert metrics["openset/precision_at_1"] > 0.5  # unseen digits still cluster (synthetic classes are easy)


@pytest.mark.parametrize("size", [2, 3])
def test_low_dimensional_embeddings_get_the_circle_or_sphere_figure(make_cfg, tmp_path: Path, size: int) -> None:
    overrides = ("head.s=10", "head.m=0.2", "evaluation.figures=true", "evaluation.projector_samples=50")
    run(train, make_cfg(f"embedding_size={size}", *overrides))
    figure = (tmp_path / "run" / "sphere.png").read_bytes()
    assert figure.startswith(b"\x89PNG") and len(figure) > 10_000
    (metadata,) = (tmp_path / "run" / "tensorboard").rglob("metadata.tsv")
    assert len(metadata.read_text().split()) == 50  # the projector keeps evaluation.projector_samples


def test_a_checkpoint_in_the_format_before_issue_11_still_evaluates_to_its_numbers(trained, tmp_path: Path) -> None:
    """Before issue 11 a checkpoint's hyper-parameters were exactly these (read from one that code wrote); the state
    dict is unchanged. Rewritten to that format, a checkpoint must load and evaluate to the numbers its run measured."""
    data, record = trained
    checkpoint = torch.load(record["best_checkpoint"], weights_only=True)
    old_keys = ["backbone", "channels_last", "figures", "head", "max_pairs", "optimizer", "projector_samples"]
    old_keys.append("scheduler")
    checkpoint["hyper_parameters"] = {k: checkpoint["hyper_parameters"][k] for k in old_keys}
    data_hparams = checkpoint["datamodule_hyper_parameters"]  # before issue 12: augmentation as five flat keys
    augment = data_hparams.pop("augment")
    data_hparams.update(augment=augment["kind"], **{k: augment[k] for k in ("degrees", "translate", "crop_padding")})
    data_hparams["scale"] = list(augment["scale"])
    torch.save(checkpoint, old := tmp_path / "old_format.ckpt")
    cfg = compose_config(
        f"ckpt_path={old}",
        f"paths.data_dir={data}",
        "trainer=cpu",
        "logger=csv",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
        config_name="eval",
    )
    cfg.paths.output_dir = str(tmp_path / "eval")
    evaluated = run(evaluate, cfg)
    for key in ("test/loss", "test/acc", "test/acc_margin", "test/map_at_r", "test/verification_auc"):
        assert evaluated[key] == pytest.approx(record[key], abs=1e-5), key


def test_figures_are_a_callback_switched_by_evaluation_figures(make_cfg, tmp_path: Path) -> None:
    train(make_cfg("evaluation.figures=false", "trainer.limit_train_batches=2"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert events.Tags()["images"] == [] and events.Tags()["histograms"] == []  # scalars only
    assert (
        "test/acc" in events.Tags()["scalars"]
        and not (tmp_path / "run" / "tensorboard" / "projector_config.pbtxt").exists()
    )
