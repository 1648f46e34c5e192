"""docs/architecture.md's import rules, enforced: each layer is imported in a fresh interpreter, which then must not
hold what that layer may not import (a module imported by any of them counts against all of them, so each group is a
layer whose members share their rules)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT

ENTRY_POINTS = [f"arcface_lightning.{name}" for name in ("train", "evaluate", "embed", "export", "search", "verify",
                                                          "compare", "pack", "report", "align", "ijb")]  # fmt: skip
LAYERS = {
    "the model's parts (no Lightning, no Hydra)": (
        [f"models.{name}" for name in ("protocol", "heads", "recent_heads", "distributed", "head_memory", "backbones",
                                        "face_backbones", "partial_fc")]
        + ["evaluation.metrics", "evaluation.figures", "serving.checkpoints"],
        ["lightning", "pytorch_lightning", "hydra", "omegaconf", "arcface_lightning.data", "arcface_lightning.training",
         *ENTRY_POINTS],
    ),
    "the data path (no Lightning, no Hydra, not the model)": (
        [f"data.{name}" for name in ("datasets", "splits", "pairs", "settings", "tensors", "augment", "images",
                                     "files", "recordio", "bin_pairs", "landmarks", "pipelines", "sources",
                                     "sources.base", "sources.torchvision_sets", "sources.image_files",
                                     "sources.packed", "sources.insightface")],
        ["lightning", "hydra", "arcface_lightning.models", "arcface_lightning.training", *ENTRY_POINTS],
    ),
    "the serving core and commands (no torch)": (
        [f"core.{name}" for name in ("checks", "config", "overrides", "runs", "registry", "writing")]
        + ["serving.contract", "serving.inference", "data.files", "embed", "search", "verify"],
        ["torch", "lightning", "torchvision", "timm", "litdata", "torchmetrics", "arcface_lightning.training"],
    ),
    "the LightningModule (not the data path, nor the entry points)": (
        ["training.module"],
        ["arcface_lightning.data", "arcface_lightning.data.datamodule", "arcface_lightning.evaluation.figures",
         *ENTRY_POINTS],
    ),
}  # fmt: skip

PROBE = """
import importlib, json, sys
for name in sys.argv[2:]:
    importlib.import_module(f"arcface_lightning.{name}")
print(json.dumps(sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_what_architecture_md_allows(layer: str) -> None:
    modules, forbidden = LAYERS[layer]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", PROBE, json.dumps(forbidden), *modules]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == [], f"{layer}: {result.stdout}"


def test_the_resuming_sweeper_plugin_imports_neither_torch_nor_the_package() -> None:
    """Hydra imports every module under hydra_plugins at the start of each command: it must stay light."""
    probe = (
        "import json, sys, hydra_plugins.arcface_lightning_resume as p; "
        "print(json.dumps([p.ResumingSweeper.__name__, *sorted(m for m in ('torch', 'lightning', "
        "'arcface_lightning') if m in sys.modules)]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == ["ResumingSweeper"]


def test_the_rules_can_fail() -> None:
    """The control: the probe names what a layer imports (the config core: OmegaConf) and only that (no torch)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", PROBE, json.dumps(["omegaconf", "torch"]), "core.config"]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(result.stdout) == ["omegaconf"]


def test_every_command_has_a_console_script() -> None:
    """The commands, each an `arcface-<name>` console script of the installed package naming a callable."""
    from importlib.metadata import distribution

    scripts = {e.name: e for e in distribution("arcface-lightning").entry_points if e.group == "console_scripts"}
    commands = {"train", "evaluate", "embed", "export", "search", "verify", "compare", "pack", "report", "align", "ijb"}
    assert {name.removeprefix("arcface-") for name in scripts} == commands
    for name, entry in scripts.items():
        assert entry.module == f"arcface_lightning.{name.removeprefix('arcface-')}", entry
        assert callable(entry.load()), entry


HYDRA_COMMANDS = {"train": "train", "evaluate": "eval", "embed": "embed", "export": "export", "search": "search",
                  "verify": "verify", "compare": "compare", "ijb": "ijb"}  # fmt: skip


@pytest.mark.parametrize("command", HYDRA_COMMANDS)
def test_each_command_runs_through_the_shared_runner_and_its_help_says_what_it_needs(command: str) -> None:
    """One way to run an entry point (runs.entry_point): the module's cli and main come from it, `--help` opens
    with the usage line of the command's YAML, and a required key (`???` there) is named with that line by
    runs.start, in one place for every command."""
    import importlib

    from arcface_lightning.core.checks import ConfigError
    from arcface_lightning.core.runs import start
    from conftest import cli, compose_config

    module = importlib.import_module(f"arcface_lightning.{command}")
    assert module.cli.__module__ == "arcface_lightning.core.runs" and module.main.__wrapped__.__name__ in (
        command,
        "train",
    )
    cfg = compose_config(config_name=HYDRA_COMMANDS[command])
    usage = cfg.get("usage") or f"python -m arcface_lightning.{command} key=value ..."
    result = cli(command, "--help")
    assert result.returncode == 0 and result.stdout.splitlines()[0] == usage, result.stdout[:300]
    job = cli(command, "--cfg", "hydra", "--package", "hydra.job")  # the job is named after the command, as before:
    assert f"\nname: {command}\n" in job.stdout, job.stdout[:300]  # <run dir>/<command>.log
    required = [key for key in cfg if OmegaConf.is_missing(cfg, key)]
    if required:
        with pytest.raises(ConfigError, match=f"^{re.escape(f'{required[0]} is required: {usage}')}$"):
            start(cfg)


def test_the_package_exports_its_public_classes_without_importing_torch() -> None:
    """`from arcface_lightning import X` for each public class, and the package itself imports nothing heavy."""
    import arcface_lightning

    for name in arcface_lightning.__all__:
        found = getattr(arcface_lightning, name)
        assert found.__name__ == name and found.__module__ == f"arcface_lightning.{arcface_lightning.PUBLIC[name]}"
    with pytest.raises(AttributeError, match="no attribute 'NoSuchHead'"):
        arcface_lightning.NoSuchHead  # noqa: B018
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import arcface_lightning, sys; print([m for m in ('torch', 'lightning', 'hydra') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]
