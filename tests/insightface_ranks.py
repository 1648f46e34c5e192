"""The gloo ranks of tests/test_insightface_data.py, kept apart so that a spawned rank imports only this (the test
module's imports, conftest's, take seconds in every process)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from ranks import join, leave

from arcface_lightning.data import ImageDataModule

FIXTURES = Path(__file__).parent / "data" / "insightface"


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def train_one_rank(rank: int, world: int, port: int, results: str) -> None:
    """One DDP rank (gloo): data=insightface's training loader for two epochs."""
    join(port, rank, world)
    dm = ImageDataModule(dataset="insightface", root=str(FIXTURES / "header"), val_size=4, test_size=4, batch_size=4,
                         num_workers=0, shuffle_seed=3, in_channels=1, image_size=28, num_classes=None)  # fmt: skip
    world_now, rank_now = torch.distributed.get_world_size(), torch.distributed.get_rank()
    dm.trainer = SimpleNamespace(world_size=world_now, global_rank=rank_now)  # what Lightning's DDP trainer gives
    dm.setup("fit")
    loader, epochs = dm.train_dataloader(), []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # as Lightning does before every epoch
        epochs.append([[(digest(x), int(y)) for x, y in zip(*batch, strict=True)] for batch in loader])
    Path(results, f"{rank}.json").write_text(json.dumps(epochs))
    leave()
