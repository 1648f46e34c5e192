"""What a caller must know to feed a trained model, and the embeddings files the model writes. NumPy only.

The contract: images as uint8 (batch, channels, size, size), grayscale (1 channel) or RGB (3), resized on the
shorter side and centre-cropped to `image_size` (data/files.read_image does exactly that); the model divides by 255
and normalises with `mean`/`std` itself. It also carries the class names (where the training data named them) and
the verification thresholds chosen on validation pairs at the end of training (callbacks.VerificationThresholds). It
travels as JSON: in the checkpoint (checkpoints.contract_from_checkpoint), in ONNX metadata (`arcface_contract`), in
a TorchScript file's extra file `contract.json`, and in every embeddings file. Its `weights_sha256` names the model
itself (checkpoints.weights_fingerprint): two files of the same preprocessing from two trainings are told apart by it.

An embeddings file (save_embeddings / read_embeddings) is one .npz read with NumPy alone (np.load, no pickle).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from arcface_lightning.core.checks import ModelError, first_line
from arcface_lightning.core.writing import written_aside

log = logging.getLogger(__name__)
CONTRACT_KEY = "arcface_contract"  # in checkpoints (a dict) and ONNX metadata (JSON); TorchScript: contract.json
INPUT_DTYPE_KEY = "arcface_input_dtype"  # uint8 or float32 ([0, 1]); TorchScript: _extra_files["input_dtype"]
THRESHOLDS_KEY = "verification_thresholds"  # in checkpoints written before CONTRACT_KEY: their thresholds
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
