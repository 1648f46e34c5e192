"""A trained model as an embedding function: its preprocessing contract, the module that applies it, and loading it
from a checkpoint, an ONNX file or a TorchScript file. Used by embed, export, search and verify.

The contract is what a caller must know to feed the model: images as uint8 (batch, channels, size, size), grayscale
(1 channel) or RGB (3), resized on the shorter side and centre-cropped to `image_size` (data/images.decode does
exactly that); the model divides by 255 and normalises with `mean`/`std` itself. It also carries the class names
(where the training data named them) and the verification thresholds chosen on validation pairs at the end of
training (callbacks.VerificationThresholds). It travels as JSON: in the checkpoint (rebuilt from the data module's
hyper-parameters), in ONNX metadata (`arcface_contract`), in a TorchScript file's extra file `contract.json`, and in
every embeddings file. Its `weights_sha256` names the model itself (weights_fingerprint): two files of the same
preprocessing from two trainings are told apart by it.

A TorchScript file (.pt, .ts, .torchscript) is a program: loading it runs the code it holds, so load only files you
trust. Checkpoints, ONNX files and embeddings files are read as data (torch.load(weights_only=True), ONNX Runtime,
np.load(allow_pickle=False)).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arcface_lightning.checks import DataError, ModelError, first_line, sigterm_exception
from arcface_lightning.heads import normalize

log = logging.getLogger(__name__)
CONTRACT_KEY = "arcface_contract"  # ONNX metadata key; TorchScript: _extra_files["contract.json"]
INPUT_DTYPE_KEY = "arcface_input_dtype"  # uint8 or float32 ([0, 1]); TorchScript: _extra_files["input_dtype"]
THRESHOLDS_KEY = "verification_thresholds"  # in checkpoints, written by callbacks.VerificationThresholds
EXPORT_SUFFIXES = (".onnx", ".pt", ".ts", ".torchscript")  # what load_model reads as an export, not a checkpoint


def far_key(far: float) -> str:
    """The name of the threshold at a false accept rate: far=1e-3."""
    mantissa, exponent = f"{float(far):.0e}".split("e")
    return f"far={mantissa}e{int(exponent)}"


@dataclass(frozen=True)
class Contract:
    image_size: int
    in_channels: int
    normalize: bool
    mean: list[float] | None
    std: list[float] | None
    embedding_size: int
    classes: list[str] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # "far=1e-3" → cosine threshold (accept ≥ it)
    weights_sha256: str | None = None  # weights_fingerprint of the backbone; None in files written before it existed

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Contract:
        return cls(**json.loads(text))

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What must agree between two models for their embeddings or inputs to be interchangeable."""
        keys = ("image_size", "in_channels", "normalize", "mean", "std", "embedding_size")
        return {k: getattr(self, k) for k in keys}

    def check_same(self, other: Contract, what: str, other_what: str) -> None:
        """One line naming the first difference between two contracts' preprocessing."""
        mine, theirs = self.preprocessing, other.preprocessing
        for key in mine:
            if mine[key] != theirs[key]:
                raise ModelError(
                    f"{what} has {key}={mine[key]} but {other_what} has {key}={theirs[key]}: "
                    "they come from models with another preprocessing contract"
                )

    def check_same_model(self, other: Contract, what: str, other_what: str) -> None:
        """One line where two contracts name different weights; a warning where either names none (a file written
        before fingerprints existed): then nothing can tell whether they come from one model."""
        mine, theirs = self.weights_sha256, other.weights_sha256
        if mine is None or theirs is None:
            unnamed, named = (what, other_what) if mine is None else (other_what, what)
            log.warning("%s does not record the model that made it: cannot check it against %s", unnamed, named)
        elif mine != theirs:
            raise ModelError(
                f"{what} and {other_what} come from two different models (weights sha256 {mine[:12]}… and "
                f"{theirs[:12]}…): their embeddings are not comparable; use one model for both"
            )


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a backbone's state (its state_dict, or a checkpoint's `backbone.*` entries without the prefix):
    names, dtypes, shapes and values, in name order. The values are hashed in logical order (reshape copies a
    channels_last tensor into it), so a layout does not change the fingerprint; the export stores the eager model's,
    so a .ckpt and its ONNX or TorchScript export carry one fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def contract_from_checkpoint(checkpoint: dict[str, Any]) -> Contract:
    """The contract of a Lightning checkpoint of this project (a torch.load'ed dict)."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    model = checkpoint.get("hyper_parameters") or {}
    backbone = model.get("backbone") or {}
    if "image_size" not in data or "embedding_size" not in backbone:
        raise ModelError("the checkpoint has no data or backbone settings: not a checkpoint of arcface-lightning")
    classes = next((s["classes"] for k, s in checkpoint.items() if k.endswith("DataModule") and "classes" in s), None)
    mean, std = data.get("mean"), data.get("std")
    state = checkpoint.get("state_dict") or {}
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return Contract(
        image_size=int(data["image_size"]),
        in_channels=int(data.get("in_channels", 1)),
        normalize=bool(data.get("normalize", True)),
        mean=[float(v) for v in mean] if mean is not None else None,
        std=[float(v) for v in std] if std is not None else None,
        embedding_size=int(backbone["embedding_size"]),
        classes=list(classes) if classes is not None else None,
        thresholds=dict(checkpoint.get(THRESHOLDS_KEY) or {}),
        weights_sha256=weights_fingerprint(weights) if weights else None,
    )


class Embedder(nn.Module):
    """Backbone with the contract's preprocessing and L2 normalisation: uint8 images (or floats already in [0, 1])
    of (batch, C, H, W) → unit embeddings (batch, D), float32. What export writes; no margin head (it has no meaning
    at inference: it needs the label)."""

    def __init__(self, backbone: nn.Module, contract: Contract) -> None:
        super().__init__()
        self.backbone = backbone
        channels = contract.in_channels
        mean = contract.mean if contract.normalize else [0.0] * channels
        std = contract.std if contract.normalize else [1.0] * channels
        # scale 1/(255·std) and shift mean/std folded into one multiply-add on the uint8 → float input
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1))
        self.uint8_input = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = x * self.scale - self.shift if self.uint8_input else (x * 255.0) * self.scale - self.shift
        return normalize(self.backbone(x).float())


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A checkpoint's dict, memory-mapped: reading its settings does not load its tensors (a Partial FC checkpoint
    holds millions of class centres and their optimiser state). One line for a folder, an export, a file torch
    cannot read as weights, and one that holds something else than a Lightning checkpoint (a bare tensor)."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{key}={path} is a folder; give the path of a .ckpt file")
    if not path.is_file():
        raise ModelError(f"{key}={path} does not exist; give the path of a .ckpt file")
    if path.suffix in EXPORT_SUFFIXES:
        raise ModelError(f"{key}={path} is an export; this command needs a .ckpt checkpoint of training")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ModelError(f"{key}={path} is not a readable checkpoint: {first_line(error)}") from error
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)):
        what = type(checkpoint).__name__
        raise ModelError(f"{key}={path} is not a Lightning checkpoint (it holds a {what}, no state_dict)")
    return checkpoint


def checkpoint_contract(path: str | Path, key: str = "ckpt_path") -> Contract:
    """The contract of a checkpoint file (read_checkpoint, then contract_from_checkpoint), its errors naming `key`."""
    checkpoint = read_checkpoint(path, key)
    try:
        return contract_from_checkpoint(checkpoint)
    except ModelError as error:
        raise ModelError(f"{key}={path}: {error}") from None


def embedder_from_checkpoint(path: str | Path, key: str = "ckpt_path") -> tuple[Embedder, Contract]:
    """The eager embedding model of a checkpoint, in eval mode on the CPU."""
    from arcface_lightning.module import ArcFaceModule  # Lightning: only where a checkpoint is read

    contract = checkpoint_contract(path, key)
    try:
        module = ArcFaceModule.load_from_checkpoint(str(path), map_location="cpu")
    except Exception as error:  # settings this version cannot build, or weights that do not fit them
        raise ModelError(f"{key}={path} could not be loaded: {first_line(error)}") from error
    return Embedder(module.backbone, contract).eval(), contract


def reraise_interruption(error: BaseException) -> None:
    """Re-raise the Ctrl-C or SIGTERM an error wraps: a C extension interrupted while it imports or runs Python
    reports it as its own error (onnxruntime's pybind module: `ImportError: initialization failed`)."""
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if not isinstance(cause, Exception):
            raise cause
        cause = cause.__cause__ or cause.__context__


EmbedFn = Callable[[torch.Tensor], np.ndarray]  # uint8 (batch, C, H, W) → float32 unit embeddings (batch, D)


def load_model(path: str | Path, key: str = "ckpt_path", threads: int | None = None) -> tuple[EmbedFn, Contract]:
    """A checkpoint (.ckpt), an ONNX export (.onnx) or a TorchScript export (.pt/.ts): an embedding function of
    uint8 batches and its contract. ONNX needs onnxruntime (pip install "arcface-lightning[onnx]"). TorchScript
    runs the code in the file: give only files you trust."""
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

        def run_onnx(images: torch.Tensor) -> np.ndarray:
            array = images.numpy() if dtype == np.uint8 else (images.numpy() * scale).astype(dtype)
            return session.run(None, {name: array})[0]

        return run_onnx, Contract.from_json(meta[CONTRACT_KEY])
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

        def run_script(images: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return scripted(images.float() / 255 if float_input else images).numpy()

        return run_script, contract
    embedder, contract = embedder_from_checkpoint(path, key)

    def run_eager(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return embedder(images).numpy()

    return run_eager, contract


def embed_images(embed: EmbedFn, images: list[torch.Tensor], batch_size: int = 256) -> np.ndarray:
    """Embeddings of decoded uint8 images, `batch_size` at a time."""
    parts = [embed(torch.stack(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)


def embed_files(embed: EmbedFn, contract: Contract, paths: list[str], batch_size: int = 256) -> np.ndarray:
    """Embeddings (float32 (N, D), unit rows) of image files, decoded to the contract's size and channels
    (data/images.read_image) and embedded `batch_size` at a time: one batch of decoded images in memory. What embed
    does with an export and search with query images; a file that does not decode is one line naming it."""
    from arcface_lightning.data.images import read_image

    size, channels = contract.image_size, contract.in_channels
    parts = [
        embed_images(embed, [read_image(p, channels, size) for p in paths[i : i + batch_size]], batch_size)
        for i in range(0, len(paths), batch_size)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, contract.embedding_size), np.float32)


def index_inputs(path: str | Path, key: str = "input") -> tuple[list[str], list[int], list[str] | None]:
    """(paths, labels, class names) of what a user points at: one image file, a CSV list (`path,label`), a folder
    of class folders (labels from the folder names), or a folder of images (labels -1: unknown)."""
    from arcface_lightning.data.images import is_image, read_list, scan_folder

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


def check_output(path: str | Path, key: str = "output") -> Path:
    """An output file that can be written, checked before any work: not a folder, and in a folder that exists (made
    here, with its parents, where missing) and takes a new file."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{key}={path} is a folder; give the path of a file to write")
    folder = path.parent
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ModelError(f"{key}={path}: {blocking} is a file, not a folder; give a path in a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # permissions alone do not say it (root, read-only mounts, /proc)
            pass
    except OSError as error:
        raise ModelError(f"{key}={path}: cannot write in {folder} ({error.strerror or first_line(error)})") from None
    return path


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises an exception that runs.run records as interrupted: its default ends the
    process on the spot, and no `finally` runs to remove what is half-written. Lightning's SIGTERMException where
    Lightning is loaded (its loops and callbacks know it), else checks.Terminated: a command that never loads
    Lightning does not import it for this. Main thread only (Python sets handlers there); Lightning's own handler,
    set inside the block, calls this one too."""

    def stop(signum: int, frame: Any) -> None:
        raise sigterm_exception()(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def written_aside(path: Path) -> Iterator[Path]:
    """Yields `<name>.partial<suffix>` beside `path` to write, renamed over `path` when the block ends: a reader never
    sees half a file and an existing file is only replaced by a whole one. On any error, Ctrl-C or SIGTERM
    (sigterm_raises) the partial file is removed."""
    partial = path.with_name(f"{path.name}.partial{path.suffix}")
    with sigterm_raises():
        try:
            yield partial
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


EMBEDDINGS_FORMAT = "arcface-lightning embeddings"
EMBEDDINGS_KEYS = ("embeddings", "labels", "sources", "classes", "contract", "model")
# |norm - 1| allowed for a row to count as unit length. A row normalised in float32 is within about 1e-7·√D of 1
# (1e-5 at D = 10⁴), one normalised in float16 within 1e-3 of it; a row that was never normalised is further off,
# and its dot products are no cosines (a score of 100).
UNIT_TOLERANCE = 1e-3


def save_embeddings(
    path: str | Path,
    embeddings: np.ndarray,
    labels: np.ndarray,
    sources: list[str],
    contract: Contract,
    model: str,
    classes: list[str] | None = None,
) -> Path:
    """One .npz a user reads with NumPy alone (np.load, no pickle): `embeddings` float32 (N, D), unit rows;
    `labels` int64 (N,), -1 where unknown; `sources` (N,) the image paths or `<split>:<index>`; `classes` the
    label names (empty where unknown); `contract` (JSON, with the model's weights_sha256) and `model` (the file
    that embedded them). Written aside and renamed, so a reader never sees half a file."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ModelError(f"output={path}: embeddings are written as .npz; give a file name ending in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_aside(path) as partial:
        np.savez(
            partial,
            embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
            labels=np.asarray(labels, dtype=np.int64),
            sources=np.asarray(sources, dtype=str),
            classes=np.asarray(classes or contract.classes or [], dtype=str),
            contract=np.asarray(contract.to_json()),
            model=np.asarray(str(model)),
            format=np.asarray(EMBEDDINGS_FORMAT),
        )
    return path


@dataclass
class Embeddings:
    embeddings: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    classes: list[str]
    contract: Contract
    model: str


def read_embeddings(path: str | Path, key: str = "gallery") -> Embeddings:
    """An embeddings file of save_embeddings (or made by hand in its format), checked: one line naming `key` and
    what is wrong with an array (its shape, type, length, non-finite values, rows that are not unit length)."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ModelError(f"{key}={path} is a folder; give an embeddings .npz of python -m arcface_lightning.embed")
        raise ModelError(f"{key}={path} does not exist; make one with python -m arcface_lightning.embed")
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f.get("format", "")) != EMBEDDINGS_FORMAT:
                raise ModelError(f"{key}={path} is not an embeddings file of arcface_lightning.embed")
            missing = [name for name in EMBEDDINGS_KEYS if name not in f.files]
            if missing:
                raise ModelError(f"{key}={path} has no {missing[0]} array; allowed: {', '.join(EMBEDDINGS_KEYS)}")
            arrays = {name: f[name] for name in EMBEDDINGS_KEYS}
        contract = Contract.from_json(str(arrays["contract"]))
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"{key}={path} is not a readable embeddings file: {first_line(error)}") from error
    read = Embeddings(
        embeddings=arrays["embeddings"],
        labels=arrays["labels"],
        sources=arrays["sources"],
        classes=[str(c) for c in arrays["classes"].reshape(-1)],
        contract=contract,
        model=str(arrays["model"]),
    )
    problem = embeddings_problem(read)
    if problem:
        raise ModelError(f"{key}={path}: {problem}")
    return read


def embeddings_problem(e: Embeddings) -> str | None:
    """What is wrong with an embeddings file's arrays, or None."""
    x, labels, sources = e.embeddings, e.labels, e.sources
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        return f"embeddings is {x.dtype} of shape {x.shape}; allowed: a 2-D float array, one row per item"
    if x.shape[1] != e.contract.embedding_size:
        return f"embeddings has {x.shape[1]} columns but its contract has embedding_size={e.contract.embedding_size}"
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        kind = "strings" if labels.dtype.kind in "US" else f"{labels.dtype} of shape {labels.shape}"
        return f"labels holds {kind}; allowed: one integer per row, -1 where unknown (names go in classes)"
    for name, array in (("labels", labels), ("sources", sources)):
        if array.ndim != 1 or len(array) != len(x):
            return f"{name} has shape {array.shape} but embeddings has {len(x)} rows; allowed: one entry per row"
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        return f"embeddings row {int(np.argmin(finite))} holds NaN or infinite values"
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    # an all-zero row is what heads.normalize makes of a degenerate embedding: cosine 0 with everything
    unit = (np.abs(norms - 1) <= UNIT_TOLERANCE) | (norms == 0)
    if not unit.all():
        row = int(np.argmin(unit))
        return (
            f"embeddings row {row} has norm {norms[row]:.6g}; allowed: L2-normalised rows (norm 1 ± "
            f"{UNIT_TOLERANCE:g}), whose dot products are cosines"
        )
    return None
