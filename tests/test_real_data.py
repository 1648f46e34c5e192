"""Real MNIST (marked `real_data`; runs where ARCFACE_DATA_DIR holds MNIST/raw, as in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import open_dict

from arcface_lightning.train import train
from conftest import compose_config

DATA_DIR = os.environ.get("ARCFACE_DATA_DIR", "")
HAS_MNIST = bool(DATA_DIR) and (Path(DATA_DIR) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


@pytest.mark.real_data
@pytest.mark.skipif(not HAS_MNIST, reason="ARCFACE_DATA_DIR has no MNIST/raw")
def test_one_epoch_of_the_seed_recipe_reaches_98_percent(tmp_path: Path) -> None:
    cfg = compose_config(
        "experiment=seed_mnist",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "data.download=false",
        f"paths.data_dir={DATA_DIR}",
        "callbacks.progress_bar.refresh_rate=0",
        "logger=csv",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    metrics = train(cfg)
    assert metrics["test/acc"] >= 0.98, metrics
    assert metrics["test/acc_margin"] < metrics["test/acc"]  # the seed's metric understates the same model
