"""The probe suite: every command driven with the bad inputs a hostile but honest user tries (issue 22's families),
each answered by one line (`error: ...` or `interrupted: ...`), a non-zero exit, no traceback and no file left
behind where the command would have written.

The commands run in this process, as their console scripts would (`cli()`/`main()` with sys.argv), so the suite pays
for its imports once per worker; a traceback here is an exception escaping the command (Hydra prints it and exits
1), which the harness reports as such. Paths in the cases are placeholders filled from one `world` of files per
worker: a trained checkpoint, its embeddings and exports, hostile and malformed files.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    escaped: BaseException | None  # an exception the command did not turn into a line: a traceback for a user


def invoke(command: str, argv: list[str]) -> Outcome:
    """Run `python -m arcface_lightning.<command> *argv` in this process."""
    module = importlib.import_module(f"arcface_lightning.{command}")
    saved_argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = [module.__file__, *argv]
    code, escaped = 0, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main(argv) if command in ("pack", "report") else module.cli()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            err.write(stop.code + "\n")
            code = 1
        else:
            code = stop.code or 0
    except Exception as error:
        escaped, code = error, 1
    finally:
        sys.argv = saved_argv
        for handler in logging.getLogger().handlers[:]:  # Hydra's handlers wrote to our StringIO
            if getattr(handler, "stream", None) in (out, err):
                logging.getLogger().removeHandler(handler)
    return Outcome(code, out.getvalue(), err.getvalue(), escaped)


def error_line(outcome: Outcome) -> str:
    lines = [line for line in outcome.err.splitlines() if line.startswith(("error:", "interrupted:"))]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def world(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files the probes point at (placeholders in the cases): a good checkpoint and others."""
    data, record = trained
    root = tmp_path_factory.mktemp("world")
    ckpt = Path(record["best_checkpoint"])
    tensor_file = root / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor_file)
    text_file = root / "notes.txt"
    text_file.write_text("not a model\n")
    small = torch.load(ckpt, map_location="cpu", weights_only=True)
    small["hyper_parameters"]["optimizer"] = {"_target_": "builtins.open", "_args_": [str(root / "marker"), "w"]}
    torch.save(small, root / "hostile.ckpt")
    np.save(root / "array.npy", np.zeros(3))
    return {
        "data": str(data),
        "ckpt": str(ckpt),
        "tensor": str(tensor_file),
        "text": str(text_file),
        "hostile": str(root / "hostile.ckpt"),
        "folder": str(root),
        "root": str(root),
    }


# (id, command, arguments, the error line's start as a regex). {name} is a path of the world; {run} the probe's run dir.
TRAIN = "train"
CASES = [
    # train: a checkpoint to resume that is not one, and what it holds
    ("train ckpt folder", TRAIN, ["ckpt_path={folder}"], r"ckpt_path=\S+ is a folder; give the path of a \.ckpt"),
    ("train ckpt tensor", TRAIN, ["ckpt_path={tensor}"], r"ckpt_path=\S+ is not a Lightning checkpoint \(it holds"),
    ("train ckpt text", TRAIN, ["ckpt_path={text}"], r"ckpt_path=\S+ is not a readable checkpoint"),
    ("train ckpt onnx name", TRAIN, ["ckpt_path={root}/x.onnx"], r"ckpt_path=\S+ does not exist"),
    ("train resume other size", TRAIN, ["ckpt_path={ckpt}", "embedding_size=32"], r"ckpt_path=\S+ holds backbone"),
    ("train hostile optimizer", TRAIN, ["optimizer._target_=builtins.open"], r"optimizer._target_='builtins.open' is"),
    ("train bad allowed_targets", TRAIN, ["allowed_targets=[a-b]"], r"allowed_targets: 'a-b' is invalid"),
    ("train partial fc accumulate", TRAIN, ["head.sample_rate=0.5", "trainer.accumulate_grad_batches=2"], r"head.sam"),
    ("train sample_rate range", TRAIN, ["head.sample_rate=0"], r"head.sample_rate=0 is invalid; allowed: 0 < sampl"),
    ("train run dir in /proc", TRAIN, ["hydra.run.dir=/proc/nope/run"], r"hydra.run.dir=/proc/nope/run cannot be m"),
    ("train run dir under a file", TRAIN, ["hydra.run.dir={text}/run"], r"hydra.run.dir=\S+ cannot be made: \S+ is a"),
    # evaluate
    ("evaluate no ckpt", "evaluate", [], r"ckpt_path is required"),
    ("evaluate ckpt folder", "evaluate", ["ckpt_path={folder}"], r"ckpt_path=\S+ is a folder"),
    ("evaluate ckpt tensor", "evaluate", ["ckpt_path={tensor}"], r"ckpt_path=\S+ is not a Lightning checkpoint"),
    ("evaluate hostile", "evaluate", ["ckpt_path={hostile}"], r"ckpt_path=\S+ could not be loaded: optimizer._targe"),
    ("evaluate run dir in /proc", "evaluate", ["ckpt_path={ckpt}", "hydra.run.dir=/proc/x"], r"hydra.run.dir=/pro"),
]


@pytest.mark.parametrize("case, command, arguments, expected", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_leaves_nothing(world, tmp_path: Path, case, command, arguments, expected) -> None:
    run_dir = tmp_path / "run"
    argv = [a.format(**world, run=run_dir) for a in arguments]
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={run_dir}")
    if command == TRAIN:
        argv = [f"paths.data_dir={world['data']}", "~experiment", *TINY, *argv]  # the shared tiny run's config
    outcome = invoke(command, argv)
    assert outcome.escaped is None, f"traceback: {outcome.escaped!r}"
    assert outcome.code != 0 and "Traceback" not in outcome.err, outcome.err[-2000:]
    line = error_line(outcome)
    assert re.match(f"(error|interrupted): {expected}", line), (line, outcome.err[-2000:])
    assert "\n" not in line
    assert not (Path(world["root"]) / "marker").exists()
    left = [p for p in tmp_path.rglob("*") if p.is_file() and ("partial" in p.name or "checkpoints" in p.parts)]
    assert not left, left
    record = run_dir / "metrics.json"
    if record.exists():
        assert '"status": "failed"' in record.read_text()
