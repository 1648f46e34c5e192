"""Export: a checkpoint's embedding model as one ONNX or TorchScript file, for serving without this project.

    python -m arcface_lightning.export ckpt_path=<run>/checkpoints/last.ckpt output=model.onnx
    python -m arcface_lightning.export ckpt_path=<file.ckpt> format=torchscript output=model.pt
    python -m arcface_lightning.export ckpt_path=<file.ckpt> output=model.onnx input_dtype=float32 opset=20

The file holds checkpoints.Embedder: the backbone with the preprocessing and the L2 normalisation, in eval mode (batch
norm uses its running statistics), without the margin head (it needs the label: no meaning at inference). It takes
uint8 images (batch, C, H, W), batch dynamic (input_dtype=float32: floats in [0, 1]) and returns float32 unit
embeddings (batch, D). The preprocessing contract (contract.Contract as JSON: image size, channels, mean/std, class
names, verification thresholds) goes in the ONNX metadata (`arcface_contract`, `arcface_input_dtype`) or the
TorchScript extra files (`contract.json`, `input_dtype`); inference.load_model reads both. ONNX is written by torch's
dynamo exporter (the legacy TorchScript-based one only where dynamo fails, said in the log); it needs
`pip install "arcface-lightning[onnx]"`. TorchScript is torch.jit.trace.

The contract carries the SHA-256 of the backbone's weights (checkpoints.weights_fingerprint, the same as embed records
from the checkpoint), so that search can tell embeddings of this file from those of another model.

The output path is checked before the checkpoint is read (a folder, or a folder that cannot be written, is one line).
The file is written aside, read back with inference.load_model and compared with the eager model on a random batch
of 2 (the max abs difference is printed), then renamed over `output`: an existing file is overwritten, and a failed,
interrupted (Ctrl-C) or terminated (SIGTERM) export leaves nothing behind.

A TorchScript file (format=torchscript) is a program: loading it runs the code it holds, so load only files you trust
(an ONNX file is data).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from arcface_lightning.core.checks import ModelError
from arcface_lightning.core.config import ConfigError, one_line
from arcface_lightning.core.runs import entry_point, start
from arcface_lightning.core.writing import check_output, written_aside
from arcface_lightning.serving.checkpoints import Embedder, embedder_from_checkpoint, weights_fingerprint
from arcface_lightning.serving.contract import CONTRACT_KEY, INPUT_DTYPE_KEY, Contract
from arcface_lightning.serving.inference import load_model, reraise_interruption

log = logging.getLogger(__name__)
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript")}  # what inference.load_model reads
INPUT_DTYPES = ("uint8", "float32")
MAX_DIFF = 1e-3  # fp32 exports agree with the eager model to ~1e-6; more than this is a broken export
USAGE = "python -m arcface_lightning.export ckpt_path=<file.ckpt> output=<file.onnx>"


def check_arguments(format: str, output: str | Path, input_dtype: str, opset: int) -> None:
    """One line for a value export_model cannot use, before any work."""
    if format not in SUFFIXES:
        raise ConfigError(f"format={format!r} is invalid; allowed: {', '.join(SUFFIXES)}")
    if Path(str(output)).suffix not in SUFFIXES[format]:
        raise ConfigError(
            f"output={output}: format={format} writes a {SUFFIXES[format][0]} file; give a file name "
            f"ending in {' or '.join(SUFFIXES[format])}"
        )
    if input_dtype not in INPUT_DTYPES:
        raise ConfigError(f"input_dtype={input_dtype!r} is invalid; allowed: {', '.join(INPUT_DTYPES)}")
    if format == "onnx":
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelError(f'format=onnx needs {", ".join(missing)}: pip install "arcface-lightning[onnx]"')
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= newest:
            raise ConfigError(f"opset={opset!r} is invalid; allowed: an integer from 18 to {newest}")


def write_onnx(
    embedder: Embedder, inputs: torch.Tensor, contract: Contract, input_dtype: str, opset: int, path: Path
) -> str:
    """`path` as one ONNX file (weights inside) with the contract in its metadata; which exporter wrote it."""
    import onnx

    names = {"input_names": ["images"], "output_names": ["embeddings"], "opset_version": opset}
    try:
        program = torch.onnx.export(
            embedder, (inputs,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **names
        )
        model, exporter = program.model_proto, "dynamo"
    except Exception as error:  # an operator dynamo cannot trace: the TorchScript-based exporter
        reraise_interruption(error)
        log.warning("dynamo ONNX export failed (%s); using the legacy exporter", one_line(error))
        buffer = io.BytesIO()
        axes = {"images": {0: "batch"}, "embeddings": {0: "batch"}}
        torch.onnx.export(embedder, (inputs,), buffer, dynamo=False, dynamic_axes=axes, **names)
        model, exporter = onnx.load_from_string(buffer.getvalue()), "legacy"
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise ModelError(f"opset={opset}: torch's exporter wrote opset {written}; try another opset (18 always works)")
    for key, value in ((CONTRACT_KEY, contract.to_json()), (INPUT_DTYPE_KEY, input_dtype)):
        for old in [p for p in model.metadata_props if p.key == key]:
            model.metadata_props.remove(old)
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path))
    return exporter


def write_torchscript(
    embedder: Embedder, inputs: torch.Tensor, contract: Contract, input_dtype: str, opset: int, path: Path
) -> str:
    """`path` as a traced TorchScript module with the contract in its extra files (`opset`: unused)."""
    traced = torch.jit.trace(embedder, (inputs,))
    torch.jit.save(traced, str(path), _extra_files={"contract.json": contract.to_json(), "input_dtype": input_dtype})
    return "torch.jit.trace"


def check_export(path: Path, embedder: Embedder, contract: Contract, images: torch.Tensor, output: Path) -> float:
    """The file read back as inference.load_model reads it: its contract, and its max abs difference from the eager
    model on `images` (uint8)."""
    embed, written = load_model(path, key="output")
    if written != contract:
        raise ModelError(f"output={output}: the contract read back differs from the checkpoint's")
    with torch.inference_mode():
        diff = float(np.abs(embed(images.numpy()) - embedder(images).numpy()).max())
    if not diff <= MAX_DIFF:
        raise ModelError(f"output={output}: the export differs from the eager model by {diff:.2e} (> {MAX_DIFF})")
    return diff


def export_model(
    embedder: Embedder, contract: Contract, format: str, output: str | Path, input_dtype: str = "uint8", opset: int = 18
) -> dict[str, Any]:
    """Write `embedder` (put in eval mode) to `output` as `format` (onnx or torchscript), with `contract` and the
    SHA-256 of the backbone's weights in it, read it back with inference.load_model and compare it with the eager
    model on a random uint8 batch of 2. Returns what was written: output, format, input_dtype, exporter,
    max_abs_diff, weights_sha256."""
    check_arguments(format, output, input_dtype, opset)
    output = check_output(output)
    contract = replace(contract, weights_sha256=weights_fingerprint(embedder.backbone.state_dict()))
    shape = (2, contract.in_channels, contract.image_size, contract.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    embedder.eval()
    try:
        # the partial file keeps the output's suffix: load_model reads it by that, to check it
        with written_aside(output) as partial, warnings.catch_warnings():
            # torch 2.14 marks torch.jit deprecated; the format still loads everywhere
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
            embedder.uint8_input = input_dtype == "uint8"
            inputs = images if embedder.uint8_input else images.float() / 255
            with torch.no_grad():
                write = write_onnx if format == "onnx" else write_torchscript
                exporter = write(embedder, inputs, contract, input_dtype, opset, partial)
            embedder.uint8_input = True
            diff = check_export(partial, embedder, contract, images, output)
    finally:
        embedder.uint8_input = True
    return {
        "output": str(output),
        "format": format,
        "input_dtype": input_dtype,
        "exporter": exporter,
        "max_abs_diff": diff,
        "weights_sha256": contract.weights_sha256,
    }


def export(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    check_arguments(cfg.format, cfg.output, cfg.input_dtype, cfg.opset)  # before the checkpoint is read
    check_output(cfg.output)
    for name in ("onnxscript", "onnx_ir"):  # the dynamo exporter's optimiser logs a line per pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    embedder, contract = embedder_from_checkpoint(cfg.ckpt_path)
    written = export_model(embedder, contract, cfg.format, cfg.output, cfg.input_dtype, cfg.opset)
    log.info("wrote %s (%s, %s, %s input)", written["output"], cfg.format, written["exporter"], cfg.input_dtype)
    log.info("contract: %s", contract.to_json())
    log.info("max abs diff vs the eager model on a random batch of 2: %.3g", written["max_abs_diff"])
    return {**written, "checkpoint": str(cfg.ckpt_path), "tags": list(cfg.get("tags") or [])}


main, cli = entry_point("export", export)


if __name__ == "__main__":
    cli()
