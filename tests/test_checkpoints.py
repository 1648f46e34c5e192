"""checkpoints.py: the contract written under one key at training time and read from there; a checkpoint of the
format before that key (what a4173b9 and earlier wrote: no `arcface_contract`, thresholds under
`verification_thresholds`, class names only in the data module's state) still loads and evaluates to the same numbers;
each command opens a checkpoint file once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arcface_lightning.core.checks import ModelError
from arcface_lightning.core.runs import run
from arcface_lightning.embed import embed
from arcface_lightning.evaluate import evaluate
from arcface_lightning.export import export
from arcface_lightning.serving.checkpoints import (
    CONTRACT_FORMAT,
    Checkpoint,
    contract_of_checkpoint,
    contract_of_old_checkpoint,
)
from arcface_lightning.serving.contract import CONTRACT_KEY, THRESHOLDS_KEY, read_embeddings
from arcface_lightning.serving.inference import load_model
from arcface_lightning.train import train
from conftest import compose_config

CLASSES = [f"class_{i}" for i in range(10)]


def old_format_images(root: Path) -> Path:
    """10 class folders (`class_0` … `class_9`) of 30 PNGs each: noise plus a bright 6×6 square per class."""
    rng = np.random.default_rng(1234)
    for label in range(10):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        row, col = divmod(label, 4)
        for i in range(30):
            image = rng.integers(0, 60, size=(28, 28), dtype=np.uint8)
            image[row * 7 : row * 7 + 6, col * 7 : col * 7 + 6] = 255
            Image.fromarray(image).save(folder / f"{i:02d}.png")
    return root


OVERRIDES = [
    "~experiment",
    "trainer=cpu",
    "data=image_folder",
    "data.image_size=28",
    "data.in_channels=1",
    "data.mean=[0.5]",
    "data.std=[0.5]",
    "data.val_size=60",
    "data.test_size=60",
    "data.batch_size=32",
    "data.eval_batch_size=100",
    "embedding_size=16",
    "backbone.channels=[4,8]",
    "trainer.max_epochs=2",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "seed=0",
]


def as_old_format(saved: dict) -> dict:
    """A checkpoint dict as the code before the contract key wrote it: the same dict without `arcface_contract`,
    the thresholds under `verification_thresholds` (the class names stay where they always were, in the data
    module's state), and the backbone and head named at their paths before the package was grouped."""
    old = {k: v for k, v in saved.items() if k != CONTRACT_KEY}
    old[THRESHOLDS_KEY] = dict(saved[CONTRACT_KEY]["thresholds"])
    hparams = old["hyper_parameters"] = dict(saved["hyper_parameters"])
    for part in ("backbone", "head"):
        target = hparams[part]["_target_"]
        assert target.startswith("arcface_lightning.models."), target
        hparams[part] = {**hparams[part], "_target_": target.replace("arcface_lightning.models.", "arcface_lightning.")}
    return old


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return old_format_images(tmp_path_factory.mktemp("old_format") / "images")


@pytest.fixture(scope="module")
def new_checkpoint(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny training on the class folders, 2 epochs."""
    cfg = compose_config(*OVERRIDES, f"data.root={images}")
    cfg.paths.output_dir = str(tmp_path_factory.mktemp("new_format") / "run")
    record = run(train, cfg)
    assert record["status"] == "ok", record
    return Path(record["best_checkpoint"])


def test_training_writes_the_contract_under_one_key(new_checkpoint: Path) -> None:
    saved = torch.load(new_checkpoint, map_location="cpu", weights_only=True)
    entry = saved[CONTRACT_KEY]
    assert entry["format"] == CONTRACT_FORMAT and THRESHOLDS_KEY not in saved
    assert {k: entry[k] for k in ("image_size", "in_channels", "normalize", "mean", "std", "embedding_size")} == {
        "image_size": 28, "in_channels": 1, "normalize": True, "mean": [0.5], "std": [0.5], "embedding_size": 16,
    }  # fmt: skip
    assert entry["classes"] == CLASSES and set(entry["thresholds"]) >= {"best_accuracy", "far=1e-3"}
    # read from the key alone: the data module's state (where the old format found the class names) is not needed
    without_state = {k: v for k, v in saved.items() if not k.endswith("DataModule")}
    contract = contract_of_checkpoint(without_state)
    assert contract.classes == CLASSES and contract.thresholds == entry["thresholds"]
    # and the same contract as the old derivation gives, which reads the hyper-parameters and the data module's state
    legacy = contract_of_old_checkpoint({**saved, THRESHOLDS_KEY: entry["thresholds"]})
    assert legacy == contract == Checkpoint(new_checkpoint).contract


def test_a_contract_of_another_format_is_refused_in_one_line(new_checkpoint: Path, tmp_path: Path) -> None:
    saved = torch.load(new_checkpoint, map_location="cpu", weights_only=True)
    saved[CONTRACT_KEY]["format"] = CONTRACT_FORMAT + 1
    torch.save(saved, tmp_path / "future.ckpt")
    message = f"ckpt_path={tmp_path / 'future.ckpt'}: its {CONTRACT_KEY} has format {CONTRACT_FORMAT + 1}; this"
    with pytest.raises(ModelError, match=rf"^{message}"):
        _ = Checkpoint(tmp_path / "future.ckpt").contract


def test_a_checkpoint_of_the_old_format_loads_and_evaluates_to_its_numbers(new_checkpoint, images, tmp_path) -> None:
    saved = torch.load(new_checkpoint, map_location="cpu", weights_only=True)
    torch.save(as_old_format(saved), tmp_path / "old.ckpt")
    old = tmp_path / "old.ckpt"
    contract = Checkpoint(old).contract  # derived by contract_of_old_checkpoint
    assert contract == Checkpoint(new_checkpoint).contract
    assert contract.classes == CLASSES and contract.thresholds == saved[CONTRACT_KEY]["thresholds"]
    records = {}
    for name, path in (("new", new_checkpoint), ("old", old)):
        cfg = compose_config(f"ckpt_path={path}", f"data.root={images}", "trainer=cpu", config_name="eval")
        cfg.paths.output_dir = str(tmp_path / f"eval-{name}")
        records[name] = run(evaluate, cfg)
        assert records[name]["status"] == "ok", records[name]
    scores = {k: v for k, v in records["new"].items() if k.startswith("test/")}
    assert {"test/acc", "test/loss", "test/precision_at_1"} <= set(scores)
    for name, value in scores.items():
        assert records["old"][name] == pytest.approx(value, abs=1e-6), name
    # its embeddings carry the derived contract (thresholds, class names) as a new checkpoint's would
    embed_cfg = compose_config(f"ckpt_path={old}", f"input={images}", f"output={tmp_path / 'e.npz'}", "trainer=cpu",
                               config_name="embed")  # fmt: skip
    embed_cfg.paths.output_dir = str(tmp_path / "embed")
    assert run(embed, embed_cfg)["status"] == "ok"
    embedded = read_embeddings(tmp_path / "e.npz")
    assert embedded.contract == contract and embedded.classes == CLASSES and len(embedded.embeddings) == 300


def count_opens(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[str]:
    """Every torch.load of `path` from now on (checkpoints.py's and Lightning's alike go through torch.load)."""
    opened: list[str] = []
    load = torch.load

    def counting(f, *args, **kwargs):
        if Path(str(f)).resolve() == path.resolve():
            opened.append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return opened


@pytest.mark.parametrize("command", ["evaluate", "embed split", "embed input", "export", "verify"])
def test_each_command_opens_the_checkpoint_once(
    command: str, new_checkpoint: Path, images: Path, tmp_path, monkeypatch
):
    png = str(next((images / "class_3").glob("*.png")))
    ckpt = f"ckpt_path={new_checkpoint}"
    configs = {
        "evaluate": ("eval", [ckpt, f"data.root={images}", "trainer=cpu"]),
        "embed split": ("embed", [ckpt, f"data.root={images}", "split=test", f"output={tmp_path / 'e.npz'}",
                                  "trainer=cpu"]),
        "embed input": ("embed", [ckpt, f"input={images}", f"output={tmp_path / 'e.npz'}", "trainer=cpu"]),
        "export": ("export", [ckpt, f"output={tmp_path / 'm.onnx'}"]),
        "verify": ("verify", [ckpt, f"a={png}", f"b={png}"]),
    }  # fmt: skip
    config_name, overrides = configs[command]
    cfg = compose_config(*overrides, config_name=config_name)
    cfg.paths.output_dir = str(tmp_path / "run")
    task = {"eval": evaluate, "embed": embed, "export": export}.get(config_name)
    if task is None:
        from arcface_lightning.verify import verify as task
    opened = count_opens(monkeypatch, new_checkpoint)
    record = run(task, cfg)
    assert record["status"] == "ok", record
    assert len(opened) == 1, opened


def test_the_export_of_a_new_checkpoint_carries_its_contract(new_checkpoint: Path, images: Path, tmp_path) -> None:
    cfg = compose_config(f"ckpt_path={new_checkpoint}", f"output={tmp_path / 'm.onnx'}", config_name="export")
    cfg.paths.output_dir = str(tmp_path / "run")
    assert run(export, cfg)["status"] == "ok"
    embed_fn, contract = load_model(tmp_path / "m.onnx")
    assert contract == Checkpoint(new_checkpoint).contract
    image = np.zeros((1, 1, 28, 28), np.uint8)
    assert embed_fn(image).shape == (1, 16)
