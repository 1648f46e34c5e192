"""A trained model as an embedding function of uint8 image batches (NumPy in, NumPy out), loaded from a checkpoint,
an ONNX file or a TorchScript file, and the image inputs a user points at. Used by embed, export, search and verify.

An ONNX file runs in ONNX Runtime without importing torch; a TorchScript file or a checkpoint brings torch in (and a
checkpoint Lightning: seconds more at start). A TorchScript file (.pt, .ts, .torchscript) is a program: loading it
runs the code it holds, so load only files you trust. Checkpoints, ONNX files and embeddings files are read as data
(torch.load(weights_only=True), ONNX Runtime, np.load(allow_pickle=False)).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from arcface_lightning.core.checks import DataError, ModelError, first_line
from arcface_lightning.serving.contract import CONTRACT_KEY, Contract

log = logging.getLogger(__name__)


def reraise_interruption(error: BaseException) -> None:
    """Re-raise the Ctrl-C or SIGTERM an error wraps: a C extension interrupted while it imports or runs Python
    reports it as its own error (onnxruntime's pybind module: `ImportError: initialization failed`)."""
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if not isinstance(cause, Exception):
            raise cause
        cause = cause.__cause__ or cause.__context__


EmbedFn = Callable[[np.ndarray], np.ndarray]  # uint8 (batch, C, H, W) → float32 unit embeddings (batch, D)


def load_model(path: str | Path, key: str = "ckpt_path", threads: int | None = None) -> tuple[EmbedFn, Contract]:
    """A checkpoint (.ckpt), an ONNX export (.onnx) or a TorchScript export (.pt/.ts): an embedding function of
    uint8 batches (NumPy arrays) and its contract. ONNX needs onnxruntime (pip install "arcface-lightning[onnx]")
    and not torch. TorchScript runs the code in the file: give only files you trust."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise ModelError(f"{key}={path} {problem}; give a .ckpt, .onnx or TorchScript (.pt) file")
    if path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError as error:
            reraise_interruption(error)
            if importlib.util.find_spec("onnxruntime") is not None:
                raise ModelError(
                    f"{key}={path}: onnxruntime is installed but fails to import: {first_line(error)}"
                ) from error
            message = f'{key}={path}: reading ONNX needs onnxruntime: pip install "arcface-lightning[onnx]"'
            raise ModelError(message) from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ModelError(f"{key}={path} is not a readable ONNX model: {str(error).splitlines()[0]}") from error
        meta = session.get_modelmeta().custom_metadata_map
        if CONTRACT_KEY not in meta:
            raise ModelError(f"{key}={path} has no {CONTRACT_KEY} metadata: export it with arcface_lightning.export")
        name = session.get_inputs()[0].name
        dtype = np.uint8 if session.get_inputs()[0].type == "tensor(uint8)" else np.float32
        scale = 1.0 if dtype == np.uint8 else 1 / 255.0

        def run_onnx(images: np.ndarray) -> np.ndarray:
            array = images if dtype == np.uint8 else (images * scale).astype(dtype)
            return session.run(None, {name: array})[0]

        return run_onnx, Contract.from_json(meta[CONTRACT_KEY])
    import torch  # a TorchScript file or a checkpoint: torch's own formats

    if path.suffix in (".pt", ".ts", ".torchscript"):
        extra = {"contract.json": "", "input_dtype": ""}
        try:
            with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; it still loads
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as error:
            raise ModelError(f"{key}={path} is not a TorchScript file: {str(error).splitlines()[0]}") from error
        if not extra["contract.json"]:
            raise ModelError(f"{key}={path} has no contract.json: export it with arcface_lightning.export")
        contract = Contract.from_json(extra["contract.json"])
        float_input = extra["input_dtype"] in ("float32", b"float32")  # torch.jit.load fills in bytes

        def run_script(images: np.ndarray) -> np.ndarray:
            batch = torch.from_numpy(images)
            with torch.inference_mode():
                return scripted(batch.float() / 255 if float_input else batch).numpy()

        return run_script, contract
    from arcface_lightning.serving.checkpoints import embedder_from_checkpoint

    embedder, contract = embedder_from_checkpoint(path, key)

    def run_eager(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return embedder(torch.from_numpy(images)).numpy()

    return run_eager, contract


def with_flip(embed: EmbedFn) -> EmbedFn:
    """`embed` fused with the horizontal mirror: the image's and the mirror's unit embeddings summed and normalised
    (the field's test-time flip; exports output unit embeddings, so every path fuses them the same way)."""

    def fused(images: np.ndarray) -> np.ndarray:
        total = embed(images) + embed(np.ascontiguousarray(images[..., ::-1]))
        return total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)

    return fused


def embed_images(embed: EmbedFn, images: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Embeddings of decoded uint8 images, `batch_size` at a time."""
    parts = [embed(np.stack(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)


def embed_files(embed: EmbedFn, contract: Contract, paths: list[str], batch_size: int = 256) -> np.ndarray:
    """Embeddings (float32 (N, D), unit rows) of image files, decoded to the contract's size and channels
    (data/files.read_image) and embedded `batch_size` at a time: one batch of decoded images in memory. What embed
    does with an export and search with query images; a file that does not decode is one line naming it."""
    from arcface_lightning.data.files import read_image

    size, channels = contract.image_size, contract.in_channels
    parts = [
        embed_images(embed, [read_image(p, channels, size) for p in paths[i : i + batch_size]], batch_size)
        for i in range(0, len(paths), batch_size)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, contract.embedding_size), np.float32)


def index_inputs(path: str | Path, key: str = "input") -> tuple[list[str], list[int], list[str] | None]:
    """(paths, labels, class names) of what a user points at: one image file, a CSV list (`path,label`), a folder
    of class folders (labels from the folder names), or a folder of images (labels -1: unknown)."""
    from arcface_lightning.data.files import is_image, read_list, scan_folder

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        index = read_list(path, key)
        return list(index.paths), list(index.labels), list(index.classes)
    if path.is_file():
        if not is_image(path.name):
            raise DataError(f"{key}={path} is not an image file, a CSV list or a folder")
        return [str(path)], [-1], None
    if not path.is_dir():
        raise DataError(f"{key}={path} does not exist; give an image, a folder of images or a CSV list")
    flat = sorted(str(p) for p in path.iterdir() if p.is_file() and is_image(p.name))
    if flat:
        return flat, [-1] * len(flat), None
    try:
        index = scan_folder(path, key)
    except DataError:
        raise DataError(f"{key}={path} has no images (directly or in class folders)") from None
    return list(index.paths), list(index.labels), list(index.classes)
