"""Files a user passes never run code: a checkpoint whose settings name a callable is refused in one line by every
path that rebuilds a model from it, and the callable never runs (no marker file appears).

The hostile checkpoints are real checkpoints of the shared tiny run with one setting replaced: the two-file chain
(`torch.load` of a second file whose pickle would create a file) and `builtins.open` (which would create one
itself), in each part of the model and nested inside a part's arguments.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from arcface_lightning.core import registry
from arcface_lightning.core.checks import ModelError
from arcface_lightning.core.registry import TargetNotAllowed, allow, check_part, is_allowed
from arcface_lightning.core.runs import load_checkpoint, run
from arcface_lightning.evaluate import evaluate
from arcface_lightning.serving.inference import load_model
from arcface_lightning.train import train
from arcface_lightning.training.module import ArcFaceModule
from conftest import compose_config, tiny_config


class Payload:
    """Unpickling it creates `marker`: what the second file of the chain would do if torch.load ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def hostile_settings(tmp_path: Path) -> dict[str, tuple[str, dict]]:
    """name → (the part to replace, the setting), each creating its own marker file if anything calls it."""
    payload = tmp_path / "payload.pkl"  # the chain's second file
    payload.write_bytes(pickle.dumps(Payload(tmp_path / "marker_chain")))
    chain = {"_target_": "torch.load", "_args_": [str(payload)], "weights_only": False}
    opener = {"_target_": "builtins.open", "_args_": [str(tmp_path / "marker_open"), "w"]}
    settings = {
        "optimizer=torch.load chain": ("optimizer", chain),
        "optimizer=builtins.open": ("optimizer", opener),
        "backbone=builtins.open": ("backbone", {**opener, "embedding_size": 16}),  # what the contract reads
        "head=torch.load chain": ("head", chain),
        "scheduler=builtins.open": ("scheduler", {"scheduler": opener, "interval": "step"}),
        "nested in backbone": ("backbone.channels", opener),
        "an allowed optimizer with a nested call": ("optimizer.lr", opener),
    }
    assert list(settings) == CASES
    return settings


CASES = [
    "optimizer=torch.load chain",
    "optimizer=builtins.open",
    "backbone=builtins.open",
    "head=torch.load chain",
    "scheduler=builtins.open",
    "nested in backbone",
    "an allowed optimizer with a nested call",
]


@pytest.fixture(scope="module")
def good_checkpoint(trained: tuple[Path, dict]) -> tuple[Path, Path]:
    data, record = trained
    assert record["status"] == "ok", record
    return data, Path(record["best_checkpoint"])


def write_hostile(good: Path, tmp_path: Path, case: str) -> Path:
    part, setting = hostile_settings(tmp_path)[case]
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    node = checkpoint["hyper_parameters"]
    *parents, leaf = part.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = setting
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, path)
    return path


def no_marker(tmp_path: Path) -> bool:
    return not any(tmp_path.glob("marker_*"))


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_naming_a_callable_is_refused_by_every_loader(good_checkpoint, tmp_path: Path, case) -> None:
    data, good = good_checkpoint
    hostile = write_hostile(good, tmp_path, case)
    expected = r"_target_='(torch\.load|builtins\.open)' is not allowed; allowed: "
    # the module itself (what Lightning's load_from_checkpoint, embed, export and verify build)
    with pytest.raises(TargetNotAllowed, match=expected):
        ArcFaceModule.load_from_checkpoint(hostile, map_location="cpu")
    # inference.load_model: verify, search's model=, embed's and export's model
    with pytest.raises(ModelError, match=f"ckpt_path={hostile} could not be loaded: .*{expected}"):
        load_model(hostile)
    # evaluate and embed: the module and data module from the checkpoint, one line naming the file
    cfg = compose_config(f"ckpt_path={hostile}", f"paths.data_dir={data}", "trainer=cpu", config_name="eval")
    with pytest.raises(Exception, match=f"ckpt_path={hostile} could not be loaded: .*{expected}"):
        load_checkpoint(cfg, str(hostile))
    assert no_marker(tmp_path)


def test_evaluate_of_a_hostile_checkpoint_is_one_line_and_runs_nothing(good_checkpoint, tmp_path: Path) -> None:
    data, good = good_checkpoint
    hostile = write_hostile(good, tmp_path, "optimizer=torch.load chain")
    cfg = compose_config(f"ckpt_path={hostile}", f"paths.data_dir={data}", "trainer=cpu", config_name="eval")
    cfg.paths.output_dir = str(tmp_path / "eval")
    with pytest.raises(SystemExit, match=r"^error: ckpt_path=.* could not be loaded: optimizer._target_='torch.load'"):
        run(evaluate, cfg)
    assert no_marker(tmp_path)
    assert '"status": "failed"' in (tmp_path / "eval" / "metrics.json").read_text()


def test_resuming_from_a_hostile_checkpoint_builds_the_model_from_the_config(good_checkpoint, tmp_path: Path) -> None:
    """Resuming rebuilds the model from the command's own config, never from the checkpoint's settings; here the
    weights resume and the hostile setting is never looked at."""
    data, good = good_checkpoint
    hostile = write_hostile(good, tmp_path, "optimizer=builtins.open")
    cfg = tiny_config(data, tmp_path / "run", f"ckpt_path={hostile}", "trainer.max_epochs=3", "logger=csv")
    record = run(train, cfg)
    assert record["status"] == "ok" and record["epochs"] == 3
    assert no_marker(tmp_path)


def test_the_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_user_targets", set())
    assert is_allowed("torch.optim.SGD", "optimizer") and is_allowed("torch.optim.lr_scheduler.OneCycleLR", "scheduler")
    assert not is_allowed("torch.optim.SGD", "scheduler") and not is_allowed(
        "torch.optim.Optimizer.zero_grad", "optimizer"
    )
    assert not is_allowed("torch.optim.lr_scheduler.warnings.warn", "scheduler")  # a module attribute, no class
    assert not is_allowed(
        "arcface_lightning.core.runs.write_metrics", "backbone"
    )  # the package is no blanket allowance
    assert is_allowed("arcface_lightning.models.heads.ArcFaceHead", "head")
    assert not is_allowed("arcface_lightning.models.heads.ArcFaceHead", "backbone")
    with pytest.raises(TargetNotAllowed, match=r"^backbone._target_='tests.MyNet' is not allowed; allowed: the proj"):
        check_part({"_target_": "tests.MyNet"}, "backbone")
    with pytest.raises(TargetNotAllowed, match=r"^head='os.system' is invalid; allowed: the config of a head"):
        check_part("os.system", "head")
    allow(["tests.MyNet"])  # a user's own class, named by the user: allowed_targets=[tests.MyNet]
    check_part({"_target_": "tests.MyNet", "width": 4}, "backbone")
    with pytest.raises(TargetNotAllowed, match=r"allowed_targets: 'os.system\(\)' is invalid"):
        allow(["os.system()"])


def test_a_training_config_naming_another_callable_is_refused_in_one_line(make_cfg, tmp_path: Path) -> None:
    marker = tmp_path / "marker_cfg"
    cfg = make_cfg("optimizer._target_=builtins.print")
    with pytest.raises(SystemExit, match=r"^error: optimizer._target_='builtins.print' is not allowed; allowed: a"):
        run(train, cfg)
    assert not marker.exists()
