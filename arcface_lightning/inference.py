"""A trained model as an embedding function: its preprocessing contract, the module that applies it, and loading it
from a checkpoint, an ONNX file or a TorchScript file. Used by embed, export, search and verify.

The contract is what a caller must know to feed the model: images as uint8 (batch, channels, size, size), grayscale
(1 channel) or RGB (3), resized on the shorter side and centre-cropped to `image_size` (data/images.decode does
exactly that); the model divides by 255 and normalises with `mean`/`std` itself. It also carries the class names
(where the training data named them) and the verification thresholds chosen on validation pairs at the end of
training (callbacks.VerificationThresholds). It travels as JSON: in the checkpoint (rebuilt from the data module's
hyper-parameters), in ONNX metadata (`arcface_contract`), in a TorchScript file's extra file `contract.json`, and in
every embeddings file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arcface_lightning.heads import normalize

CONTRACT_KEY = "arcface_contract"  # ONNX metadata key; TorchScript: _extra_files["contract.json"]
INPUT_DTYPE_KEY = "arcface_input_dtype"  # uint8 or float32 ([0, 1]); TorchScript: _extra_files["input_dtype"]
THRESHOLDS_KEY = "verification_thresholds"  # in checkpoints, written by callbacks.VerificationThresholds


def far_key(far: float) -> str:
    """The name of the threshold at a false accept rate: far=1e-3."""
    mantissa, exponent = f"{float(far):.0e}".split("e")
    return f"far={mantissa}e{int(exponent)}"


class ModelError(ValueError):
    """A model file or an input that does not fit it: said in one line."""


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


def contract_from_checkpoint(checkpoint: dict[str, Any]) -> Contract:
    """The contract of a Lightning checkpoint of this project (a torch.load'ed dict)."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    model = checkpoint.get("hyper_parameters") or {}
    backbone = model.get("backbone") or {}
    if "image_size" not in data or "embedding_size" not in backbone:
        raise ModelError("the checkpoint has no data or backbone settings: not a checkpoint of arcface-lightning")
    classes = next((s["classes"] for k, s in checkpoint.items() if k.endswith("DataModule") and "classes" in s), None)
    mean, std = data.get("mean"), data.get("std")
    return Contract(
        image_size=int(data["image_size"]),
        in_channels=int(data.get("in_channels", 1)),
        normalize=bool(data.get("normalize", True)),
        mean=[float(v) for v in mean] if mean is not None else None,
        std=[float(v) for v in std] if std is not None else None,
        embedding_size=int(backbone["embedding_size"]),
        classes=list(classes) if classes is not None else None,
        thresholds=dict(checkpoint.get(THRESHOLDS_KEY) or {}),
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
    holds millions of class centres and their optimiser state)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise ModelError(f"{key}={path} does not exist") from None
    except Exception as error:
        raise ModelError(f"{key}={path} is not a readable checkpoint: {str(error).splitlines()[0]}") from error


def embedder_from_checkpoint(path: str | Path, key: str = "ckpt_path") -> tuple[Embedder, Contract]:
    """The eager embedding model of a checkpoint, in eval mode on the CPU."""
    from arcface_lightning.module import ArcFaceModule  # Lightning: only where a checkpoint is read

    contract = contract_from_checkpoint(read_checkpoint(path, key))
    module = ArcFaceModule.load_from_checkpoint(str(path), map_location="cpu")
    return Embedder(module.backbone, contract).eval(), contract


EmbedFn = Callable[[torch.Tensor], np.ndarray]  # uint8 (batch, C, H, W) → float32 unit embeddings (batch, D)


def load_model(path: str | Path, key: str = "ckpt_path", threads: int | None = None) -> tuple[EmbedFn, Contract]:
    """A checkpoint (.ckpt), an ONNX export (.onnx) or a TorchScript export (.pt/.ts): an embedding function of
    uint8 batches and its contract. ONNX needs onnxruntime (pip install "arcface-lightning[onnx]")."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{key}={path} does not exist; give a .ckpt, .onnx or TorchScript (.pt) file")
    if path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError:
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


def index_inputs(path: str | Path, key: str = "input") -> tuple[list[str], list[int], list[str] | None]:
    """(paths, labels, class names) of what a user points at: one image file, a CSV list (`path,label`), a folder
    of class folders (labels from the folder names), or a folder of images (labels -1: unknown)."""
    from arcface_lightning.data import DataError
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


EMBEDDINGS_FORMAT = "arcface-lightning embeddings"


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
    label names (empty where unknown); `contract` (JSON) and `model` (the file that embedded them). Written aside
    and renamed, so a reader never sees half a file."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ModelError(f"output={path}: embeddings are written as .npz; give a file name ending in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(
        tmp,
        embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        sources=np.asarray(sources, dtype=str),
        classes=np.asarray(classes or contract.classes or [], dtype=str),
        contract=np.asarray(contract.to_json()),
        model=np.asarray(str(model)),
        format=np.asarray(EMBEDDINGS_FORMAT),
    )
    tmp.replace(path)
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
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{key}={path} does not exist; make one with python -m arcface_lightning.embed")
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f.get("format", "")) != EMBEDDINGS_FORMAT:
                raise ModelError(f"{key}={path} is not an embeddings file of arcface_lightning.embed")
            return Embeddings(
                embeddings=f["embeddings"],
                labels=f["labels"],
                sources=f["sources"],
                classes=[str(c) for c in f["classes"]],
                contract=Contract.from_json(str(f["contract"])),
                model=str(f["model"]),
            )
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"{key}={path} is not a readable .npz file: {str(error).splitlines()[0]}") from error
