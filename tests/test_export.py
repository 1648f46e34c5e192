"""Export: ONNX Runtime and TorchScript agree with the eager model for every backbone, the batch is dynamic, both input
dtypes work, the contract travels in the file, batch norm is in eval mode, and bad input fails in one line leaving no
file behind.

The backbones are conf/backbone/*.yaml composed and instantiated (a new one is tested without editing this file), at
their configured size except ResNet-18 at width=8 and the face networks with fewer repeated blocks (SMALL): these
tests are about the exporter, not the network's size.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hydra.utils import instantiate

from arcface_lightning.core.checks import ModelError
from arcface_lightning.core.runs import run
from arcface_lightning.export import export, export_model
from arcface_lightning.serving.checkpoints import (
    Embedder,
    contract_of_checkpoint,
    embedder_from_checkpoint,
    weights_fingerprint,
)
from arcface_lightning.serving.contract import Contract
from arcface_lightning.serving.inference import load_model
from conftest import CONF, cli, compose_config

# every backbone class (iresnet50 and iresnet100 are iresnet18's class with more blocks: the same operators)
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml") if p.stem not in ("iresnet50", "iresnet100"))
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
# the exporter is under test, not the network's size: fewer repeated blocks (each stage keeps its operators: the
# face networks' stages still hold a block with an identity shortcut), ResNet-18 narrower
SMALL = {
    "resnet18": ["backbone.width=8"],
    "iresnet18": ["backbone.blocks=[2,1,1,1]"],
    "mobilefacenet": ["backbone.blocks=[1,2,2,2]"],
}
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.* is deprecated:FutureWarning")  # torch 2.14


def build(backbone: str) -> tuple[Embedder, Contract]:
    """A randomly initialised Embedder of conf/backbone/<backbone>.yaml (3×32×32 for the ResNet, 1×28×28 otherwise),
    with running statistics moved off their defaults, in train mode as a fresh module is; and a non-trivial contract."""
    channels, size = (3, 32) if backbone == "resnet18" else (1, 28)
    cfg = compose_config(
        f"backbone={backbone}",
        f"data.in_channels={channels}",
        f"data.image_size={size}",
        "embedding_size=16",
        "~experiment",
        *SMALL.get(backbone, []),
    )
    model = instantiate(cfg.backbone)
    mean, std = [0.3 + 0.1 * c for c in range(channels)], [0.2 + 0.05 * c for c in range(channels)]
    contract = Contract(size, channels, True, mean, std, 16, classes=["a", "b"], thresholds={"far=1e-3": 0.42})
    embedder = Embedder(model, contract)
    with torch.no_grad():  # batch norm's running mean/var become the data's: eval and train mode then differ
        for _ in range(3):
            embedder(images(contract, 16))
    return embedder, contract


def images(contract: Contract, batch: int) -> torch.Tensor:
    shape = (batch, contract.in_channels, contract.image_size, contract.image_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def eager(embedder: Embedder, batch: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return embedder.eval()(batch).numpy()


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_export_matches_eager_at_any_batch_with_its_contract(backbone: str, format: str, tmp_path: Path) -> None:
    embedder, contract = build(backbone)
    written = export_model(embedder, contract, format, tmp_path / FORMATS[format])  # traced at batch 2
    assert not embedder.training  # exported in eval mode: batch norm with its running statistics
    assert written["max_abs_diff"] <= 1e-4 and written["input_dtype"] == "uint8"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FORMATS[format]]  # one file: weights inside, no .partial
    embed, read_back = load_model(tmp_path / FORMATS[format], key="output")
    fingerprint = weights_fingerprint(embedder.backbone.state_dict())  # the contract it was given has none
    assert read_back == replace(contract, weights_sha256=fingerprint) and written["weights_sha256"] == fingerprint
    batch = images(contract, 5)
    for part in (batch[:1], batch):  # batch 1 and 5: the batch dimension is dynamic
        out, expected = embed(part.numpy()), eager(embedder, part)
        assert out.dtype == np.float32 and out.shape == (len(part), 16)
        assert np.abs(out - expected).max() <= 1e-4
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert (
        np.abs(embed(batch[:1].numpy())[0] - embed(batch.numpy())[0]).max() <= 1e-5
    )  # eval-mode batch norm: rows independent


@pytest.mark.parametrize("format", FORMATS)
def test_float32_input_takes_floats_in_0_1(format: str, tmp_path: Path) -> None:
    embedder, contract = build("simple_cnn_bn")
    path = tmp_path / FORMATS[format]
    export_model(embedder, contract, format, path, input_dtype="float32")
    batch = images(contract, 3)
    floats = batch.float() / 255
    if format == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == "tensor(float)"
        assert session.get_modelmeta().custom_metadata_map["arcface_input_dtype"] == "float32"
        out = session.run(None, {session.get_inputs()[0].name: floats.numpy()})[0]
    else:
        extra = {"input_dtype": ""}
        with torch.inference_mode():
            out = torch.jit.load(str(path), _extra_files=extra)(floats).numpy()
        assert extra["input_dtype"] == b"float32"  # torch.jit.load fills in bytes
    assert np.abs(out - eager(embedder, batch)).max() <= 1e-4
    assert embedder.uint8_input  # the caller's module is left as it was given
    assert np.abs(load_model(path)[0](batch.numpy()) - out).max() <= 1e-6  # load_model feeds it uint8 / 255


def test_a_failed_check_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    embedder, contract = build("simple_cnn")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")

    def broken(partial: Path, key: str):  # the file written computes something else than the eager model
        assert partial.is_file()
        embed, written = load_model(partial, key)
        return (lambda batch: embed(batch) + 1.0), written

    monkeypatch.setattr("arcface_lightning.export.load_model", broken)
    with pytest.raises(ModelError, match=r"the export differs from the eager model by 1\.00e\+00"):
        export_model(embedder, contract, "onnx", path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"] and path.read_bytes() == b"the previous export"


BAD = [
    (["output={out}/x.onnx"], "ckpt_path is required: python -m arcface_lightning.export ckpt_path=<file.ckpt> output"),
    (["ckpt_path={ckpt}"], "output is required: python -m arcface_lightning.export ckpt_path=<file.ckpt> output="),
    (["ckpt_path={out}/no.ckpt", "output={out}/x.onnx"], "ckpt_path={out}/no.ckpt does not exist; give the path of a"),
    (["ckpt_path={ckpt}", "output={out}/x.onnx", "format=tflite"], "format='tflite' is invalid; allowed: onnx, torch"),
    (["ckpt_path={ckpt}", "output={out}/x.pt"], "output={out}/x.pt: format=onnx writes a .onnx file; give a file name"),
    (["ckpt_path={ckpt}", "output={out}/x.onnx", "format=torchscript"], "output={out}/x.onnx: format=torchscript wr"),
    (["ckpt_path={ckpt}", "output={out}/x.onnx", "input_dtype=int8"], "input_dtype='int8' is invalid; allowed: uint8"),
    (["ckpt_path={ckpt}", "output={out}/x.onnx", "opset=13"], "opset=13 is invalid; allowed: an integer from 18 to "),
]


IDS = ["no ckpt_path", "no output", "no such ckpt", "format", "onnx suffix", "torchscript suffix", "dtype", "opset"]


@pytest.mark.parametrize("overrides, message", BAD, ids=IDS)
def test_bad_values_fail_in_one_line_and_write_nothing(trained, tmp_path: Path, overrides, message: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    paths = {"ckpt": trained[1]["best_checkpoint"], "out": out}
    cfg = compose_config(*(o.format(**paths) for o in overrides), config_name="export")
    cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run(export, cfg)
    line = str(exit_info.value)
    assert line.startswith(f"error: {message.format(**paths)}") and "\n" not in line, line
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    assert list(out.iterdir()) == []


def test_onnx_without_its_packages_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxscript" else find_spec(name))
    embedder, contract = build("simple_cnn")
    with pytest.raises(ModelError, match=r'^format=onnx needs onnxscript: pip install "arcface-lightning\[onnx\]"$'):
        export_model(embedder, contract, "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_checkpoint_in_process_and_through_the_cli(trained, tmp_path: Path) -> None:
    ckpt = trained[1]["best_checkpoint"]
    contract = contract_of_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=True))
    embedder, _ = embedder_from_checkpoint(ckpt)
    batch = images(contract, 4)
    cfg = compose_config(f"ckpt_path={ckpt}", f"output={tmp_path / 'm.pt'}", "format=torchscript", config_name="export")
    cfg.paths.output_dir = str(tmp_path / "run")
    record = run(export, cfg)
    assert record["status"] == "ok" and record["max_abs_diff"] <= 1e-4 and record["checkpoint"] == ckpt, record
    # the checkpoint's backbone entries and the eager module's state: one fingerprint, in the file and the record
    assert contract.weights_sha256 is not None and record["weights_sha256"] == contract.weights_sha256
    embed, read_back = load_model(tmp_path / "m.pt")
    assert read_back == contract
    assert np.abs(embed(batch.numpy()) - eager(embedder, batch)).max() <= 1e-4

    result = cli("export", f"ckpt_path={ckpt}", f"output={tmp_path / 'm.onnx'}", f"hydra.run.dir={tmp_path / 'cli'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert contract.to_json() in result.stdout and "max abs diff" in result.stdout, result.stdout
    written = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert written["status"] == "ok" and written["exporter"] == "dynamo" and written["max_abs_diff"] <= 1e-4
    embed, read_back = load_model(tmp_path / "m.onnx")
    assert read_back == contract
    assert np.abs(embed(batch.numpy()) - eager(embedder, batch)).max() <= 1e-4

    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["m.onnx", "m.pt"]
