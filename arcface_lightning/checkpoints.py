"""Checkpoints of training as data: opened (memory-mapped, `weights_only=True`), their contract read, the backbone's
weights fingerprinted, and the backbone rebuilt as the embedding model (Embedder) that export writes and the
serving commands run. Opening a checkpoint never runs code from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arcface_lightning.checks import ModelError, first_line
from arcface_lightning.contract import EXPORT_SUFFIXES, THRESHOLDS_KEY, Contract
from arcface_lightning.heads import normalize


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
