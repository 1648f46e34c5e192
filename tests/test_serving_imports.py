"""The serving commands start without torch: `search` over embeddings files and `embed`/`search`/`verify` with an
ONNX model and PNG images import neither torch, Lightning, timm, LitData nor torchvision (checked in a fresh
interpreter running the real command), while a .ckpt still brings Lightning in. And what makes that possible, each
against its oracle: the Trainer flags read from Lightning's source (config.trainer_flags), the resize and centre-crop
in NumPy (data/files.fit: torchvision's uint8 result), embed with an export (the .ckpt's embeddings), a SIGTERM
caught without Lightning loaded."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import open_dict
from test_images import digits, write_folder
from torchvision.transforms.v2 import functional as TF

from arcface_lightning.core.checks import Terminated
from arcface_lightning.core.config import trainer_flags
from arcface_lightning.core.runs import run
from arcface_lightning.core.writing import written_aside
from arcface_lightning.data.files import fit
from arcface_lightning.embed import embed
from arcface_lightning.export import export_model
from arcface_lightning.serving.checkpoints import embedder_from_checkpoint
from arcface_lightning.serving.contract import read_embeddings, save_embeddings
from arcface_lightning.serving.inference import load_model
from conftest import ROOT, cli, compose_config

# never imported by a command that reads embeddings files or an ONNX model and PNG images (any torchvision submodule
# runs torchvision/__init__, which imports torchvision.models)
HEAVY = ("torch", "lightning", "pytorch_lightning", "timm", "litdata", "torchvision", "torchvision.models")

# runs in a fresh interpreter: the command as `python -m arcface_lightning.<command>` runs it, or only its import;
# writes which HEAVY modules were loaded, and how it exited, to the JSON file named by its third argument
PROBE = f"""
HEAVY = {HEAVY!r}
import importlib, json, sys
command, mode, report, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
code = None
if mode == "import":
    importlib.import_module(f"arcface_lightning.{{command}}")
else:
    sys.argv = [f"arcface_lightning.{{command}}", *args]
    try:
        importlib.import_module(f"arcface_lightning.{{command}}").cli()
    except SystemExit as exit:
        code = exit.code
loaded = [name for name in HEAVY if name in sys.modules]
with open(report, "w") as f:
    json.dump({{"loaded": loaded, "code": code if code is None or isinstance(code, int) else str(code)}}, f)
"""


def probe(tmp_path: Path, name: str, command: str, *args: str, mode: str = "run") -> dict:
    """Run PROBE for `command` (PYTHONPATH: this checkout) and return its report, with the process's output."""
    report = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ARCFACE_DATA_DIR", None)
    run_dir = [f"hydra.run.dir={tmp_path / f'run-{name}'}"] if mode == "run" else []
    argv = [sys.executable, "-c", PROBE, command, mode, str(report), *args, *run_dir]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and report.is_file(), result.stderr[-3000:]
    return {**json.loads(report.read_text()), "output": result.stdout + result.stderr}


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared tiny run's checkpoint, its ONNX export, a folder of PNG digits (class folders), two of them, and a
    gallery and a query embeddings file of the model's contract."""
    _, record = trained
    root = tmp_path_factory.mktemp("served")
    ckpt = Path(record["best_checkpoint"])
    embedder, contract = embedder_from_checkpoint(ckpt)
    onnx = root / "model.onnx"
    export_model(embedder, contract, "onnx", onnx)
    _, contract = load_model(onnx)  # with the fingerprint export adds
    images, labels = digits(2)
    folder = write_folder(root / "images", images, labels)
    pngs = sorted(folder.glob("*/*.png"))
    rows = np.random.default_rng(0).normal(size=(50, contract.embedding_size))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    files = {}
    for name, part in (("gallery", rows[:40]), ("query", rows[40:])):
        sources = [f"{name}:{i}" for i in range(len(part))]
        files[name] = save_embeddings(root / f"{name}.npz", part, np.arange(len(part)) % 5, sources, contract, onnx)
    return {"ckpt": ckpt, "onnx": onnx, "folder": folder, "a": pngs[0], "b": pngs[-1], "root": root, **files}


@pytest.mark.parametrize("command", ["search", "verify", "embed"])
def test_importing_a_serving_command_loads_no_lightning_nor_torchvision(command: str, tmp_path: Path) -> None:
    report = probe(tmp_path, command, command, mode="import")
    assert report["loaded"] == [], report


def test_search_of_embeddings_files_runs_without_lightning(served, tmp_path: Path) -> None:
    hits = tmp_path / "hits.csv"
    report = probe(tmp_path, "search", "search", f"gallery={served['gallery']}", f"query={served['query']}",
                   "k=3", f"output={hits}")  # fmt: skip
    assert report["code"] is None and report["loaded"] == [], report
    assert len(hits.read_text().splitlines()) == 1 + 10 * 3


@pytest.mark.slow
def test_verify_with_an_onnx_model_runs_without_lightning_and_a_ckpt_loads_it(served, tmp_path: Path) -> None:
    pair = [f"a={served['a']}", f"b={served['b']}"]
    report = probe(tmp_path, "verify-onnx", "verify", f"ckpt_path={served['onnx']}", *pair)
    assert report["code"] is None and report["loaded"] == [], report
    control = probe(tmp_path, "verify-ckpt", "verify", f"ckpt_path={served['ckpt']}", *pair)
    assert control["code"] is None and "lightning" in control["loaded"], control  # the check can fail
    # `score 0.1234  threshold@far=1e-3 0.5678  different`: one score (to the 4 decimals printed), threshold, answer
    lines = [r["output"].splitlines() for r in (report, control)]
    onnx, ckpt = (next(line.split() for line in output if line.startswith("score ")) for output in lines)
    assert abs(float(onnx[1]) - float(ckpt[1])) <= 2e-4 and onnx[2:] == ckpt[2:], (onnx, ckpt)


@pytest.mark.slow
def test_embed_with_an_onnx_model_runs_without_lightning_and_gives_the_ckpts_embeddings(served, tmp_path) -> None:
    """embed ckpt_path=<.onnx> input=<PNG folder>: no Lightning, and the embeddings, labels, sources and classes of
    embed with the .ckpt the export was made from (run in this process: the verify test above is the probe's
    control)."""
    with_onnx, with_ckpt = tmp_path / "onnx.npz", tmp_path / "ckpt.npz"
    images = f"input={served['folder']}"
    report = probe(tmp_path, "embed-onnx", "embed", f"ckpt_path={served['onnx']}", images, f"output={with_onnx}",
                   "data.eval_batch_size=7")  # fmt: skip
    assert report["code"] is None and report["loaded"] == [], report
    control = cli("embed", f"ckpt_path={served['ckpt']}", images, f"output={with_ckpt}", "trainer=cpu",
                  f"hydra.run.dir={tmp_path / 'run-embed-ckpt'}")  # fmt: skip
    assert control.returncode == 0, control.stderr[-3000:]
    onnx, ckpt = read_embeddings(with_onnx), read_embeddings(with_ckpt)
    assert len(onnx.embeddings) == 20
    np.testing.assert_allclose(onnx.embeddings, ckpt.embeddings, atol=1e-5)
    assert list(onnx.sources) == list(ckpt.sources) and list(onnx.labels) == list(ckpt.labels)
    assert onnx.classes == ckpt.classes == [f"digit_{d}" for d in range(10)]
    assert onnx.contract == load_model(served["onnx"])[1] and onnx.model == str(served["onnx"])
    assert onnx.contract.weights_sha256 == ckpt.contract.weights_sha256


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("split", "ckpt_path={onnx} is an export; this command needs a .ckpt checkpoint of training to embed split="),
        ("broken image", "unreadable image {root}/broken/x.png: "),
        ("not onnx", "ckpt_path={root}/fake.onnx is not a readable ONNX model: "),
    ],
)
def test_embed_with_an_export_refuses_in_one_line(served, tmp_path: Path, case: str, message: str) -> None:
    root = served["root"]
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (root / "fake.onnx").write_bytes(b"\x08\x07 not onnx")
    overrides = {
        "split": [f"ckpt_path={served['onnx']}", "split=val"],
        "broken image": [f"ckpt_path={served['onnx']}", f"input={root / 'broken'}"],
        "not onnx": [f"ckpt_path={root / 'fake.onnx'}", f"input={served['folder']}"],
    }[case]
    cfg = compose_config(*overrides, f"output={tmp_path / 'e.npz'}", config_name="embed")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run(embed, cfg)
    line = str(exit_info.value)
    assert "\n" not in line and line.startswith("error: " + message.format(onnx=served["onnx"], root=root)), line
    assert not list(tmp_path.glob("e.npz*"))


def test_trainer_flags_read_from_lightnings_source_are_its_signatures() -> None:
    """config.trainer_flags parses lightning/pytorch/trainer/trainer.py; the oracle is the live signature."""
    live = {
        name: p.default
        for name, p in inspect.signature(L.Trainer.__init__).parameters.items()
        if name != "self" and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    }
    assert list(trainer_flags().items()) == list(live.items())
    assert {"max_epochs", "precision", "devices", "accelerator", "max_steps"} <= set(live)


SHAPES = [(28, 28), (27, 31), (31, 27), (1, 1), (1, 64), (64, 1), (5, 200), (113, 50), (200, 201), (224, 224)]


def images_to_fit(channels: int, size: int) -> list[torch.Tensor]:
    """Random uint8 images of every SHAPE, contiguous and channels-last (what decode_image returns for a JPEG)."""
    g = torch.Generator().manual_seed(size * channels)
    images = [torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=g) for h, w in SHAPES]
    images.append(torch.randint(0, 256, (channels, 1500, 2000), dtype=torch.uint8, generator=g))  # 13× down
    return [layout for image in images for layout in (image, image.permute(1, 2, 0).contiguous().permute(2, 0, 1))]


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="ATen's uint8 kernel")
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 112])
def test_fit_is_torchvisions_resize_and_centre_crop_exactly(channels: int, size: int) -> None:
    """Portrait, landscape, odd sides, up- and down-scaling, 1 and 3 channels, contiguous and channels-last: pixel
    for pixel torchvision's resize (bilinear, antialiased, its uint8 kernel on this x86 CPU) + center_crop."""
    for image in images_to_fit(channels, size):
        expected = TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
        assert np.array_equal(fit(image.numpy(), size), expected.numpy()), (image.shape, image.is_contiguous())


@pytest.mark.parametrize("channels", [1, 3])
def test_fit_is_within_one_grey_level_of_torchvisions_float_path(channels: int, monkeypatch) -> None:
    """Where ATen has no uint8 kernel, torchvision resizes through float32 and rounds: fit keeps the uint8 kernel's
    pixels on every CPU, which differ from those by at most one grey level."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # what torchvision asks
    differ = 0
    for image in images_to_fit(channels, 32):
        expected = TF.center_crop(TF.resize(image, 32, antialias=True), [32, 32]).numpy().astype(int)
        difference = np.abs(fit(image.numpy(), 32).astype(int) - expected)
        assert difference.max() <= 1, image.shape
        differ += int((difference > 0).sum())
    assert differ > 0  # the float path is really another one here: the test can tell the two apart


def test_sigterm_without_lightning_loaded_is_recorded_as_interrupted(tmp_path: Path, monkeypatch) -> None:
    """Where Lightning is not loaded, written_aside's SIGTERM raises checks.Terminated; runs.run records it."""
    monkeypatch.delitem(sys.modules, "lightning.pytorch.utilities.exceptions")
    path = tmp_path / "out.csv"

    def task(cfg) -> dict:
        with written_aside(path) as partial:
            partial.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        return {}

    cfg = compose_config("gallery=g.npz", "query=q.npz", config_name="search")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(SystemExit, match=r"^interrupted: SIGTERM") as exit_info:
        run(task, cfg)
    assert isinstance(exit_info.value.__context__, Terminated)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
