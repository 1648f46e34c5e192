"""Embeddings of a checkpoint through Lightning's `Trainer.predict`: what embed does with a .ckpt (any images, or a
split of the checkpoint's data set), so that `trainer.*` (devices, precision, DDP) works as in training. embed
imports this module only for a .ckpt; with an export it embeds in-process (inference.embed_files), without
Lightning.

Batches are uint8 and are normalised on the device by the checkpoint's contract, exactly as in training. Embeddings
are collected on the host (N × D × 4 bytes); under DDP each rank writes its share aside (`<output>.part-<rank>`),
rank zero merges them in sample order and drops the distributed sampler's padding repeats. A failure, Ctrl-C or
SIGTERM leaves no share behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from arcface_lightning.core.runs import build_trainer, load_checkpoint
from arcface_lightning.core.writing import sigterm_raises
from arcface_lightning.data.augment import BatchPreparation
from arcface_lightning.data.images import ImageFiles, ImageIndex
from arcface_lightning.serving.checkpoints import Checkpoint
from arcface_lightning.serving.contract import Contract
from arcface_lightning.serving.inference import index_inputs

Predicted = tuple[np.ndarray, np.ndarray, list[str], list[str] | None]  # embeddings, labels, sources, classes


class InputImages(L.LightningDataModule):
    """A user's images for Trainer.predict: decoded in the loader, prepared on the device by the contract."""

    def __init__(self, files: ImageFiles, contract: Contract, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.files, self.batch_size, self.num_workers = files, batch_size, num_workers
        self.prepare = BatchPreparation({"kind": None}, contract.normalize, contract.mean or [], contract.std or [])

    def predict_dataloader(self) -> DataLoader:
        workers = self.num_workers
        return DataLoader(self.files, batch_size=self.batch_size, num_workers=workers, persistent_workers=workers > 0)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        return self.prepare(images), labels


class EmbeddingWriter(BasePredictionWriter):
    """Each rank's embeddings, labels and sample indices, kept on the host and written to `<output>.part-<rank>`
    at the end of the predict epoch."""

    def __init__(self, output: Path) -> None:
        super().__init__(write_interval="batch")
        self.output, self.parts = output, []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        indices = torch.as_tensor(list(batch_indices))
        self.parts.append((prediction["embeddings"].cpu(), prediction["labels"].cpu(), indices))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        embeddings, labels, indices = (torch.cat(p) for p in zip(*self.parts, strict=True))
        torch.save({"embeddings": embeddings, "labels": labels, "indices": indices}, part(self.output, trainer))
        self.parts = []


def part(output: Path, trainer: L.Trainer, rank: int | None = None) -> Path:
    return output.with_name(f"{output.name}.part-{trainer.global_rank if rank is None else rank}")


def predict(cfg: DictConfig, checkpoint: Checkpoint, output: Path) -> Predicted | None:
    """(embeddings, labels, sources, classes) of `cfg.input` (images) or of `cfg.split` of the checkpoint's data set,
    on rank zero; None on the other ranks. The shares are removed before this returns, whatever happens."""
    model, datamodule = load_checkpoint(cfg, checkpoint)
    model.predict_flip = bool(cfg.get("flip"))
    contract = checkpoint.contract
    if cfg.input is not None:  # read the list before any work: a missing folder or an empty one is one line
        paths, labels, classes = index_inputs(cfg.input)
        files = ImageFiles(ImageIndex(paths, labels, classes or []), contract.in_channels, contract.image_size)
        datamodule = InputImages(files, contract, cfg.data.eval_batch_size, cfg.data.num_workers)
        sources = paths
    else:
        datamodule.predict_split, classes = cfg.split, datamodule.classes or contract.classes
    writer = EmbeddingWriter(output)
    trainer = build_trainer(cfg, writer, configured=False)
    try:  # Trainer.predict only notes a SIGTERM; sigterm_raises stops it, and nothing half-written is left
        with sigterm_raises():
            trainer.predict(model, datamodule=datamodule, return_predictions=False)
            trainer.strategy.barrier()
            if not trainer.is_global_zero:
                return None  # rank zero reads this rank's share, and removes it
            shares = [torch.load(part(output, trainer, r), weights_only=True) for r in range(trainer.world_size)]
    except BaseException:  # an error, Ctrl-C or SIGTERM: no share left behind (rank zero: every rank's)
        for r in range(trainer.world_size) if trainer.is_global_zero else [trainer.global_rank]:
            part(output, trainer, r).unlink(missing_ok=True)
        raise
    for r in range(trainer.world_size):
        part(output, trainer, r).unlink()
    indices = torch.cat([s["indices"] for s in shares])
    order, first = np.unique(indices.numpy(), return_index=True)  # sorted; padding repeats dropped once
    embeddings = torch.cat([s["embeddings"] for s in shares])[first].numpy()
    labels = torch.cat([s["labels"] for s in shares])[first].numpy()
    if cfg.input is None:
        sources = [f"{cfg.split}:{i}" for i in order]
    return embeddings, labels, sources, classes
