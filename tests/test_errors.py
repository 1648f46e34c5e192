"""Bad input at every entry point: one line that names the key, the value and what is allowed, before any work.

The lists below are the bad inputs tried, one per config group and key family; each must fail with exactly the
line shown (the start of it where Lightning's or torch's wording follows), record it in metrics.json, and leave no
checkpoint behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arcface_lightning.core.config import ConfigError
from arcface_lightning.core.overrides import check_overrides, upgrade_overrides
from arcface_lightning.core.runs import run
from arcface_lightning.evaluate import evaluate
from arcface_lightning.train import train
from conftest import CONF, cli, compose_config, tiny_config

BAD_TRAIN = [
    # head
    (["head.s=-1"], "head.s=-1 is invalid; allowed: a finite number > 0 (ArcFaceHead)"),
    (["head.s=abc"], "head.s='abc' is invalid; allowed: a finite number > 0 (ArcFaceHead)"),
    (["head.m=4"], "head.m=4 is invalid; allowed: 0 ≤ m < π (ArcFaceHead)"),
    (["head=cosface", "head.m=2"], "head.m=2 is invalid; allowed: 0 ≤ m ≤ 1 (CosFaceHead)"),
    (["head=sphereface", "head.m=0.5"], "head.m=0.5 is invalid; allowed: 1 ≤ m ≤ 10 (SphereFaceHead)"),
    (["head=combined", "head.m3=2"], "head.m3=2 is invalid; allowed: 0 ≤ m3 ≤ 1 (CombinedMarginHead)"),
    # top-level keys, and the keys interpolated from them
    (["embedding_size=abc"], "embedding_size='abc' is invalid; allowed: an integer ≥ 2"),
    (["embedding_size=1"], "embedding_size=1 is invalid; allowed: an integer ≥ 2"),
    (["seed=abc"], "seed='abc' is invalid; allowed: null or an integer ≥ 0"),
    (["matmul_precision=low"], "matmul_precision='low' is invalid; allowed: highest, high, medium"),
    (["channels_last=maybe"], "channels_last='maybe' is invalid; allowed: true or false"),
    (["tags=abc"], "tags='abc' is invalid; allowed: a list of strings, e.g. tags=[baseline,s16]"),
    (["extras.print_config=2"], "extras.print_config=2 is invalid; allowed: true or false"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt does not exist; give the path of a .ckpt file"),
    (["ckpt_path=/tmp"], "ckpt_path=/tmp is a folder; give the path of a .ckpt file"),
    # Partial FC keys: the head's, named as typed; and what it cannot combine with
    (["head.sample_rate=2"], "head.sample_rate=2 is invalid; allowed: 0 < sample_rate ≤ 1 (PartialFC)"),
    (["head.sharded=maybe"], "head.sharded='maybe' is invalid; allowed: True, False, auto (PartialFC)"),
    (
        ["head.sample_rate=0.5", "trainer.accumulate_grad_batches=2"],
        "head.sample_rate=0.5 cannot combine with trainer.accumulate_grad_batches=2: Partial FC steps its sampled ",
    ),
    (["allowed_targets=[my-net]"], "allowed_targets: 'my-net' is invalid; allowed: dotted class names"),
    # backbone
    (["backbone.channels=[]"], "backbone.channels=[] is invalid; allowed: a non-empty list of integers ≥ 1 (Simple"),
    (["backbone.channels=[4,8,8,8,8]"], "data.image_size=28 is invalid; allowed: an integer ≥ 32 (SimpleCNN)"),
    (["backbone.convs_per_block=0"], "backbone.convs_per_block=0 is invalid; allowed: an integer ≥ 1 (SimpleCNN)"),
    (["backbone=resnet18", "backbone.width=0"], "backbone.width=0 is invalid; allowed: an integer ≥ 1 (ResNet)"),
    (["backbone=resnet18", "backbone.blocks=[2,0]"], "backbone.blocks=[2, 0] is invalid; allowed: a non-empty "),
    # data
    (["data.dataset=SVHN"], "data.dataset='SVHN' is invalid; allowed: MNIST, FashionMNIST, KMNIST, CIFAR10, image_fo"),
    (["data=image_folder"], "data.root is required (the config has ???); set data.root=..."),
    (
        ["data=image_folder", "data.root=/no/such"],
        "data.root=/no/such is not a folder; give a folder with one sub-folder",
    ),
    (
        ["data=image_list", "data.root=/no/such.csv"],
        "data.root=/no/such.csv is not a file; give a CSV list of path,label",
    ),
    (["data.batch_size=0"], "data.batch_size=0 is invalid; allowed: an integer ≥ 1 (ImageDataModule)"),
    (["data.val_size=60000"], "data.val_size=60000 leaves no training data; allowed: 1 ≤ val_size < 600"),
    (["data.num_workers=-1"], "data.num_workers=-1 is invalid; allowed: an integer ≥ 0 (ImageDataModule)"),
    (["data.pipeline=dali"], "data.pipeline='dali' is invalid; allowed: tensor, torchvision (ImageDataModule)"),
    (["data.augment=rotate"], "data.augment='rotate' is invalid; allowed: null, affine, crop_flip (ImageDataModule)"),
    (["data.augment.degrees=500"], "data.augment.degrees=500 is invalid; allowed: 0 ≤ degrees ≤ 180 (ImageDataMo"),
    (["data.augment.kind=rotate"], "data.augment.kind='rotate' is invalid; allowed: null, affine, crop_flip (Image"),
    (["data.augment.scale=[2,1]"], "data.augment.scale=[2, 1] is invalid; allowed: [low, high] with 0 < low ≤ high"),
    (["data.mean=[0.1,0.2]"], "data.mean=[0.1, 0.2] is invalid; allowed: 1 numbers (one per input channel) ("),
    (["data.std=[0]"], "data.std=[0] is invalid; allowed: numbers > 0 (ImageDataModule)"),
    (["seed=null", "data.shuffle_seed=-3"], "data.shuffle_seed=-3 is invalid; allowed: null or an integer ≥ 0 ("),
    (["data.num_classes=5"], "data.num_classes=5 but MNIST has 10"),
    (["data.train_classes=[0,1]", "data.open_classes=[1,2]", "data.num_classes=2"], "data.train_classes and "),
    (["paths.data_dir=/no/data"], "MNIST train set not found in /no/data/MNIST/raw; set paths.data_dir="),
    # optimizer and scheduler
    (["optimizer.lr=-1"], "optimizer.lr=-1 is invalid; allowed: a number ≥ 0"),
    (["optimizer.lr=abc"], "optimizer.lr='abc' is invalid; allowed: a number ≥ 0"),
    (["optimizer=sgd", "optimizer.momentum=-0.5"], "optimizer.momentum=-0.5 is invalid; allowed: a number ≥ 0"),
    (["+optimizer.betas=[2,0.9]"], "optimizer: Invalid beta parameter at index 0: 2"),
    (["+optimizer.eps=tiny"], "optimizer.eps='tiny' is invalid; allowed: a number"),
    (["scheduler=onecycle", "scheduler.interval=batch"], "scheduler.interval='batch' is invalid; allowed: epoch, step"),
    (["scheduler=onecycle", "+scheduler.scheduler.pct_start=2"], "scheduler.scheduler: Expected float between 0 "),
    (["scheduler=cosine", "scheduler.scheduler.T_max=x"], "scheduler.scheduler.T_max='x' is invalid; allowed: an "),
    # trainer, callbacks, loggers (Lightning's wording after the key)
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc' is invalid; allowed: an integer or null"),
    (["trainer.max_epochs=-5"], "trainer: `max_epochs` must be a non-negative integer or -1. You passed in -5."),
    (["trainer.precision=bogus"], "trainer.precision='bogus' is invalid; allowed: 64, 32, 16, transformer-engine"),
    (["trainer.accelerator=tpu9"], "trainer: You selected an invalid accelerator name: `accelerator='tpu9'`."),
    (["trainer.devices=0"], "trainer: `Trainer(devices=0)` value is not a valid input using cpu accelerator."),
    (["trainer.log_every_n_steps=x"], "trainer.log_every_n_steps='x' is invalid; allowed: an integer or null"),
    (["callbacks.model_checkpoint.mode=best"], "callbacks.model_checkpoint: `mode` can be min, max but got best"),
    (["callbacks.model_checkpoint.save_top_k=x"], "callbacks.model_checkpoint.save_top_k='x' is invalid; allowed: "),
    (["logger=tensorboard", "+logger.tensorboard.log_graph=maybe"], "logger.tensorboard.log_graph='maybe' is inv"),
    # evaluation
    # the trainer (its callbacks) is built before the model now, so the stricter of the two users of the key speaks
    (["evaluation.max_pairs=0"], "evaluation.max_pairs=0 is invalid; allowed: an integer ≥ 2 (VerificationThresholds)"),
    (
        ["evaluation.projector_samples=-1"],
        "evaluation.projector_samples=-1 is invalid; allowed: an integer ≥ 0 (Embedd",
    ),
]


@pytest.mark.parametrize("overrides, message", BAD_TRAIN, ids=[" ".join(o) for o, _ in BAD_TRAIN])
def test_bad_train_values_fail_in_one_line_before_any_work(
    mnist_root: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = tiny_config(mnist_root, tmp_path / "run", *overrides)
    with pytest.raises(SystemExit) as exit_info:
        run(train, cfg)
    line = str(exit_info.value)
    assert line.startswith(f"error: {message}") and "\n" not in line, line
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and f"error: {record['error']}" == line
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing half-written


def test_notebook_helpers_raise_the_same_line_as_an_exception(mnist_root: Path, tmp_path: Path) -> None:
    """In a notebook, train(cfg) raises (no exit): a ConfigError carrying the same one line."""
    with pytest.raises(ConfigError, match=r"^head.s=-1 is invalid; allowed: a finite number > 0 \(ArcFaceHead\)$"):
        train(tiny_config(mnist_root, tmp_path / "run", "head.s=-1"))


def eval_config(tmp_path: Path, *overrides: str):
    return compose_config(
        "trainer=cpu", "logger=csv", f"hydra.run.dir={tmp_path / 'eval'}", *overrides, config_name="eval"
    )


BAD_EVAL = [
    ([], "ckpt_path is required: python -m arcface_lightning.evaluate ckpt_path=<file.ckpt>"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt does not exist; give the path of a .ckpt file"),
    (["ckpt_path={not_a_checkpoint}"], "ckpt_path={not_a_checkpoint} is not a readable checkpoint: "),
    (["ckpt_path={ckpt}", "data.eval_batch_size=0"], "data.eval_batch_size=0 is invalid; allowed: an integer ≥ 1 ("),
    (["ckpt_path={ckpt}", "data.num_workers=x"], "data.num_workers='x' is invalid; allowed: an integer ≥ 0 ("),
    (["ckpt_path={ckpt}", "trainer.max_epochs=x"], "trainer.max_epochs='x' is invalid; allowed: an integer or null"),
    (["ckpt_path={ckpt}", "trainer.precision=8"], "trainer.precision=8 is invalid; allowed: 64, 32, 16, "),
    (["ckpt_path={ckpt}", "matmul_precision=max"], "matmul_precision='max' is invalid; allowed: highest, high, "),
]


@pytest.mark.parametrize("overrides, message", BAD_EVAL, ids=[" ".join(o) or "no ckpt" for o, _ in BAD_EVAL])
def test_bad_evaluate_values_fail_in_one_line(trained, tmp_path: Path, overrides: list[str], message: str) -> None:
    data, record = trained
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    paths = {"ckpt": record["best_checkpoint"], "not_a_checkpoint": junk}
    cfg = eval_config(tmp_path, f"paths.data_dir={data}", *(o.format(**paths) for o in overrides))
    cfg.paths.output_dir = str(tmp_path / "eval")
    with pytest.raises(SystemExit) as exit_info:
        run(evaluate, cfg)
    line = str(exit_info.value)
    assert line.startswith(f"error: {message.format(**paths)}") and "\n" not in line, line
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["status"] == "failed"


GROUP_OVERRIDES_ACCEPTED = [
    "logger=[csv,tensorboard]",  # multi-select: a list of configs of one group
    "logger=many_loggers",
    "~logger",
    "head=arcface,cosface",  # a sweep
    "head=choice(arcface,cosface)",
    "head=glob(*)",
    "head=glob(*,exclude=soft*)",
    "+debug=fdr",
    "++debug=fdr",
    "head@head=cosface",  # group@package
    "hydra/launcher=joblib",  # a plugin's group: left to Hydra
    "head.s=1,2",
    "seed=range(3)",
    "head.m=interval(0.1,0.5)",
    "data=${oc.env:DATA,mnist}",  # resolved by Hydra later
]
GROUP_OVERRIDES_REFUSED = [
    ("logger=[csv,nope]", "error: logger=nope is not a config in conf/logger/; allowed: csv, many_loggers, tensorbo"),
    ("head=nope", "error: head=nope is not a config in conf/head/; allowed: adaface, arcface, combined, cosface, "),
    ("head=arcface,nope", "error: head=nope is not a config in conf/head/"),
    ("head=choice(arcface,nope)", "error: head=nope is not a config in conf/head/"),
    ("+debug=nope", "error: debug=nope is not a config in conf/debug/; allowed: fdr, limit, overfit, profile"),
    ("head@head=nope", "error: head=nope is not a config in conf/head/"),
    ("head=glob(zz*)", "error: head=glob(zz*) matches no config in conf/head/; allowed: adaface, arcface, "),
    ("data=range(2)", "error: data=range(2) is not a config in conf/data/; allowed: cifar10, fashion_mnist, "),
    ("logger=null", "error: logger=null: a config group is deselected with ~logger, not logger=null"),
    ("logger=[csv", "error: cannot parse the override 'logger=[csv': no viable alternative at input '[csv'"),
]


@pytest.mark.parametrize("override", GROUP_OVERRIDES_ACCEPTED)
def test_hydra_override_grammar_is_understood(override: str) -> None:
    check_overrides(["-m", override], config_name="train")  # -m: membership only, no composition


@pytest.mark.parametrize("override, message", GROUP_OVERRIDES_REFUSED, ids=[o for o, _ in GROUP_OVERRIDES_REFUSED])
def test_unknown_configs_are_refused_in_one_line(override: str, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_overrides(["-m", override], config_name="train")
    assert str(exit_info.value).startswith(message) and "\n" not in str(exit_info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("head.nope=3", "error: head.nope: no such key; head has: embedding_size, num_classes, s, m, margin_warmup_"),
        ("backbone=resnet18 backbone.channels=[1]", "error: backbone.channels: no such key; backbone has: embedding_s"),
    ],
)
def test_keys_a_config_does_not_have_are_refused_in_one_line(override: str, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_overrides(override.split(), config_name="train")
    assert str(exit_info.value).startswith(message)


def test_a_sweep_config_runs_its_sweep_without_dash_m_and_a_single_run_refuses_one() -> None:
    """conf/sweep/s_m.yaml sets hydra.mode=MULTIRUN, so `make sweep ARGS="seed=0,1,2"` is a sweep: its first job's
    config is composed (a bad key inside it is still caught). Without such a config a sweep value is one line."""
    check_overrides(["sweep=s_m", "seed=0,1,2", "trainer.max_epochs=3", "head.s=2,8,32"], config_name="train")
    with pytest.raises(SystemExit, match=r"^error: head\.nope: no such key; head has: "):
        check_overrides(["sweep=s_m", "head.nope=1,2"], config_name="train")
    with pytest.raises(SystemExit, match=r"^error: seed=0,1,2 is a sweep, and this is a single run; allowed: -m "):
        check_overrides(["seed=0,1,2"], config_name="train")


def test_plugins_that_are_not_installed_name_their_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "optuna" in name else real(name, *a))
    with pytest.raises(SystemExit, match=r"^error: hparams_search=optuna needs the 'optuna' extra: pip install"):
        check_overrides(["hparams_search=optuna"], config_name="train")


def test_every_group_option_composes_through_the_check() -> None:
    for folder in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        for option in sorted(folder.glob("*.yaml")):
            check_overrides(["-m", f"{folder.name}={option.stem}"], config_name="train")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.val_size=60000"], "error: data.val_size=60000 leaves no training data; allowed: 1 ≤ val_size < 600"),
        (["data.degrees=500"], "error: data.augment.degrees=500 is invalid; allowed: 0 ≤ degrees ≤ 180 (ImageData"),
    ],
    # through the command line: a data check at setup and a moved key. Every other message (optimizer.lr,
    # embedding_size, an unknown key, ...) goes through the same run() and is checked in-process above
    ids=["val_size", "deprecated key"],
)
def test_cli_prints_one_line_and_no_traceback(mnist_root: Path, tmp_path: Path, overrides, message: str) -> None:
    run_dir = tmp_path / "bad_run"
    result = cli("train", f"paths.data_dir={mnist_root}", f"hydra.run.dir={run_dir}", "data.download=false", *overrides)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert not (run_dir / "checkpoints").exists()


def test_moved_keys_are_upgraded_with_a_deprecation_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-m", "data.degrees=5,10", "+data.scale=[1,1]", "~data.crop_padding", "data.translate", "head.s=3"]
    argv += ["hydra.run.dir=data.degrees=1", "data.degreesx=1"]  # not the key, or another key
    assert upgrade_overrides(argv) == [
        "-m",
        "data.augment.degrees=5,10",
        "+data.augment.scale=[1,1]",
        "~data.augment.crop_padding",
        "data.augment.translate",
        "head.s=3",
        "hydra.run.dir=data.degrees=1",
        "data.degreesx=1",
    ]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "warning: data.degrees is deprecated; it is now data.augment.degrees" and len(lines) == 4
