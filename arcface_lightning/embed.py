"""Embed: L2-normalised embeddings of any images, or of a split of the checkpoint's data set, into one .npz file.

    python -m arcface_lightning.embed ckpt_path=<run>/checkpoints/<best>.ckpt input=<folder|list.csv|image> output=q.npz
    python -m arcface_lightning.embed ckpt_path=<ckpt> split=train output=gallery.npz   # the checkpoint's data set
    python -m arcface_lightning.embed ckpt_path=<ckpt> split=test data.root=/data/faces output=test.npz

Images go through Lightning's `Trainer.predict` and the module's `predict_step`, so `trainer.*` (devices, precision,
DDP) works as in training; batches are uint8 and are normalised on the device by the contract in the checkpoint
(inference.Contract), exactly as in training. `input=`: a folder of class folders (labels and class names from the
folder names), a folder of images (labels -1), a CSV list (`path,label`) or one image, decoded to the checkpoint's
image size and channels. Without `input`, `split=train|val|test` of the checkpoint's data set (located by
`data.*` as in evaluate); its sources are `<split>:<index>` in the split's order.

The file (inference.save_embeddings), read with NumPy alone: `np.load(path)` → `embeddings` float32 (N, D), `labels`
int64, `sources`, `classes`, `contract` (JSON, with the SHA-256 of the model's weights: search refuses to compare
embeddings of two models), `model`. `output` is checked before any work (not a folder, in a folder that can be
written) and written aside: a failure, Ctrl-C or SIGTERM leaves neither it nor the ranks' shares behind. Why .npz
rather than Parquet: a float matrix and a few string arrays, read with no extra dependency and no pickle,
memory-mappable by `np.load(..., mmap_mode="r")` once unzipped. Embeddings are collected on the host (N × D × 4
bytes) and written once; under DDP each rank writes its share aside, rank zero merges them in sample order and drops
the distributed sampler's padding repeats.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from arcface_lightning.config import CONF_DIR, ConfigError, instantiate_node, register_configs
from arcface_lightning.data.augment import BatchPreparation
from arcface_lightning.data.images import ImageFiles, ImageIndex
from arcface_lightning.inference import (
    Contract,
    check_output,
    checkpoint_contract,
    index_inputs,
    save_embeddings,
    sigterm_raises,
)
from arcface_lightning.overrides import check_overrides, upgrade_overrides
from arcface_lightning.runs import load_checkpoint, run, start

SPLITS = ("train", "val", "test")


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


def embed(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    for key in ("ckpt_path", "output"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is required: python -m arcface_lightning.embed ckpt_path=<ckpt> output=<x.npz>")
    output = Path(cfg.output)
    if output.suffix != ".npz":
        raise ConfigError(f"output={output}: embeddings are written as .npz; give a file name ending in .npz")
    if cfg.input is None and cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split} is not one of {', '.join(SPLITS)} (or give input=<images>)")
    check_output(output)
    ckpt_path = str(cfg.ckpt_path)
    contract = checkpoint_contract(ckpt_path)  # memory-mapped: only its settings (and the backbone's weights) are read
    model, datamodule = load_checkpoint(cfg, ckpt_path)
    if cfg.input is not None:  # read the list before any work: a missing folder or an empty one is one line
        paths, labels, classes = index_inputs(cfg.input)
        files = ImageFiles(ImageIndex(paths, labels, classes or []), contract.in_channels, contract.image_size)
        datamodule = InputImages(files, contract, cfg.data.eval_batch_size, cfg.data.num_workers)
        sources = paths
    else:
        datamodule.predict_split, classes = cfg.split, datamodule.classes or contract.classes
    writer = EmbeddingWriter(output)
    trainer = instantiate_node(cfg, "trainer", callbacks=[writer], logger=False)
    try:  # Trainer.predict only notes a SIGTERM; sigterm_raises stops it, and nothing half-written is left
        with sigterm_raises():
            trainer.predict(model, datamodule=datamodule, return_predictions=False)
            trainer.strategy.barrier()
            if not trainer.is_global_zero:
                return {}
            shares = [torch.load(part(output, trainer, r), weights_only=True) for r in range(trainer.world_size)]
            indices = torch.cat([s["indices"] for s in shares])
            order, first = np.unique(indices.numpy(), return_index=True)  # sorted; padding repeats dropped once
            embeddings = torch.cat([s["embeddings"] for s in shares])[first].numpy()
            labels = torch.cat([s["labels"] for s in shares])[first].numpy()
            if cfg.input is None:
                sources = [f"{cfg.split}:{i}" for i in order]
            save_embeddings(output, embeddings, labels, sources, contract, ckpt_path, classes)
    except BaseException:  # an error, Ctrl-C or SIGTERM: no share left behind (rank zero: every rank's)
        for r in range(trainer.world_size) if trainer.is_global_zero else [trainer.global_rank]:
            part(output, trainer, r).unlink(missing_ok=True)
        raise
    for r in range(trainer.world_size):
        part(output, trainer, r).unlink()
    print(f"{output}: {len(embeddings)} embeddings of size {embeddings.shape[1]}")
    return {"output": str(output), "embeddings": len(embeddings), "embedding_size": int(embeddings.shape[1])}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="embed")
def main(cfg: DictConfig) -> None:
    register_configs()
    run(embed, cfg)


def cli() -> None:
    register_configs()
    sys.argv[1:] = upgrade_overrides(sys.argv[1:])  # hydra.main reads sys.argv
    check_overrides(sys.argv[1:], config_name="embed")
    main()


if __name__ == "__main__":
    cli()
