"""Checkpoints of training: the one module that opens them. A checkpoint is opened once per command (`Checkpoint`:
memory-mapped, `torch.load(weights_only=True)`, so no code in it runs and its tensors are read only where used), and
everything else is taken from that one dict: the preprocessing contract, the model rebuilt (only from the classes
registry.py allows: the file's settings are data), the data module, the embedding model (`Embedder`) that export
writes and the serving commands run.

The contract is written at training time under one key, `arcface_contract` (callbacks.ContractInCheckpoint and
callbacks.VerificationThresholds): image size, channels, normalisation, embedding size, class names, thresholds and
a format version. Checkpoints written before that key existed are read by `contract_of_old_checkpoint`, which
derives the contract the old way.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from arcface_lightning.core.checks import ModelError, first_line
from arcface_lightning.models.heads import normalize
from arcface_lightning.serving.contract import CONTRACT_KEY, EXPORT_SUFFIXES, THRESHOLDS_KEY, Contract

if TYPE_CHECKING:
    from lightning import LightningDataModule

    from arcface_lightning.training.module import ArcFaceModule

CONTRACT_FORMAT = 1  # the version of the dict under CONTRACT_KEY in a checkpoint
PREPROCESSING = ("image_size", "in_channels", "normalize", "mean", "std")  # of the data module's settings


def contract_entry(data_settings: Mapping[str, Any], embedding_size: int, classes: list[str] | None) -> dict[str, Any]:
    """What training writes under CONTRACT_KEY (thresholds are added by VerificationThresholds): plain data."""
    entry = {key: data_settings.get(key) for key in PREPROCESSING}
    mean, std = entry["mean"], entry["std"]
    entry.update(
        mean=[float(v) for v in mean] if mean is not None else None,
        std=[float(v) for v in std] if std is not None else None,
        embedding_size=int(embedding_size),
        classes=list(classes) if classes is not None else None,
        format=CONTRACT_FORMAT,
    )
    return entry


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


def contract_of_checkpoint(checkpoint: Mapping[str, Any]) -> Contract:
    """The contract of a loaded checkpoint dict: its CONTRACT_KEY entry, or, in a checkpoint written before it,
    the one contract_of_old_checkpoint derives. The weights' fingerprint is computed from the file's backbone."""
    entry = checkpoint.get(CONTRACT_KEY)
    if entry is None:
        return contract_of_old_checkpoint(checkpoint)
    if not isinstance(entry, Mapping) or entry.get("format") != CONTRACT_FORMAT:
        found = entry.get("format") if isinstance(entry, Mapping) else type(entry).__name__
        raise ModelError(f"its {CONTRACT_KEY} has format {found}; this version reads format {CONTRACT_FORMAT}")
    if any(entry.get(key) is None for key in ("image_size", "in_channels", "normalize", "embedding_size")):
        raise ModelError(f"its {CONTRACT_KEY} lacks the image size, channels or embedding size")
    return contract_from_entry(entry, checkpoint)


def contract_of_old_checkpoint(checkpoint: Mapping[str, Any]) -> Contract:
    """Compatibility: the contract of a checkpoint written before CONTRACT_KEY existed, derived from the data
    module's hyper-parameters, the backbone's `embedding_size`, the class names in the data module's state (saved by
    Lightning under the class's name, which ends in "DataModule") and the thresholds under `verification_thresholds`."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    model = checkpoint.get("hyper_parameters") or {}
    backbone = model.get("backbone") or {}
    if "image_size" not in data or "embedding_size" not in backbone:
        raise ModelError("the checkpoint has no data or backbone settings: not a checkpoint of arcface-lightning")
    classes = next((s["classes"] for k, s in checkpoint.items() if k.endswith("DataModule") and "classes" in s), None)
    data = {"in_channels": 1, "normalize": True, **data}  # the defaults of the versions that did not save them
    entry = contract_entry(data, backbone["embedding_size"], classes)
    return contract_from_entry({**entry, "thresholds": checkpoint.get(THRESHOLDS_KEY)}, checkpoint)


def contract_from_entry(entry: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> Contract:
    """A Contract of a CONTRACT_KEY entry (written, or derived from an old checkpoint) and the checkpoint's weights."""
    return Contract(
        image_size=int(entry["image_size"]),
        in_channels=int(entry["in_channels"]),
        normalize=bool(entry["normalize"]),
        mean=entry["mean"],
        std=entry["std"],
        embedding_size=int(entry["embedding_size"]),
        classes=entry["classes"],
        thresholds=dict(entry.get("thresholds") or {}),
        weights_sha256=backbone_fingerprint(checkpoint),
    )


def backbone_fingerprint(checkpoint: Mapping[str, Any]) -> str | None:
    """weights_fingerprint of a checkpoint's `backbone.*` entries (None where it has none)."""
    state = checkpoint.get("state_dict") or {}
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return weights_fingerprint(weights) if weights else None


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


class Checkpoint:
    """A training checkpoint, opened once (read_checkpoint); its contract, model, data module and embedding model
    all come from that one dict. Errors name `key` (the command's argument) and the file."""

    def __init__(self, path: str | Path, key: str = "ckpt_path") -> None:
        self.path, self.key = Path(path), key
        self.data = read_checkpoint(path, key)

    @functools.cached_property
    def contract(self) -> Contract:
        try:
            return contract_of_checkpoint(self.data)
        except ModelError as error:
            raise ModelError(f"{self.key}={self.path}: {error}") from None

    @property
    def data_settings(self) -> dict[str, Any]:
        return dict(self.data.get("datamodule_hyper_parameters") or {})

    def module(self) -> ArcFaceModule:
        """The LightningModule, on the CPU, as `ArcFaceModule.load_from_checkpoint` builds it (settings → init,
        only the arguments it takes; on_load_checkpoint; the weights, strictly) but from the dict already read:
        Lightning's method would open the file again."""
        from arcface_lightning.training.module import (
            ArcFaceModule,  # Lightning: only where a checkpoint's model is built
        )

        try:
            module = build_from_settings(ArcFaceModule, self.data.get("hyper_parameters") or {})
            module.on_load_checkpoint(self.data)
            module.load_state_dict(self.data["state_dict"])
        except Exception as error:  # settings this version cannot build, or weights that do not fit them
            raise ModelError(f"{self.key}={self.path} could not be loaded: {first_line(error)}") from error
        return module

    def data_module(self, **given: Any) -> LightningDataModule:
        """The data module of the checkpoint's settings, `given` (not null) overriding them (where the files are,
        how they are loaded), with its saved state (class names) restored."""
        from arcface_lightning.data.datamodule import ImageDataModule
        from arcface_lightning.data.streaming import StreamingDataModule

        data_class = StreamingDataModule if self.data_settings.get("dataset") == "streaming" else ImageDataModule
        datamodule = build_from_settings(data_class, {**self.data_settings, **given})
        state = self.data.get(data_class.__qualname__)  # Lightning saves a data module's state under its class name
        if state is not None:
            datamodule.load_state_dict(state)
        return datamodule

    def embedder(self) -> Embedder:
        """The eager embedding model (backbone, preprocessing, L2 normalisation), in eval mode on the CPU."""
        return Embedder(self.module().backbone, self.contract).eval()


def build_from_settings(cls: type, settings: Mapping[str, Any]) -> Any:
    """cls(**settings) with only the arguments its __init__ takes, as Lightning's load_from_checkpoint does: a
    setting an older version saved and this one dropped does not stop its checkpoints from loading."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return cls(**settings)
    return cls(**{k: v for k, v in settings.items() if k in parameters})


def checkpoint_contract(path: str | Path, key: str = "ckpt_path") -> Contract:
    """The contract of a checkpoint file, its errors naming `key`."""
    return Checkpoint(path, key).contract


def embedder_from_checkpoint(path: str | Path, key: str = "ckpt_path") -> tuple[Embedder, Contract]:
    """The eager embedding model of a checkpoint file and its contract (one read of the file)."""
    checkpoint = Checkpoint(path, key)
    return checkpoint.embedder(), checkpoint.contract
