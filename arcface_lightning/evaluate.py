"""Evaluate: test a checkpoint once on the official test set and write metrics.json (margin-free accuracy).

    python -m arcface_lightning.evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m arcface_lightning.evaluate ckpt_path=<file> paths.data_dir=/data data.download=false

Model and data settings (dataset, normalisation, validation split) are rebuilt from the checkpoint; the command line
sets only where the data is and how it is loaded (`paths.data_dir`, `data.download`, `data.eval_batch_size`, ...).
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from arcface_lightning.data import ImageDataModule
from arcface_lightning.module import ArcFaceModule
from arcface_lightning.train import ConfigError, check_ckpt_path, check_group_choices, final_metrics, one_line, run


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path is required: python -m arcface_lightning.evaluate ckpt_path=<file.ckpt>")
    ckpt_path = check_ckpt_path(cfg.ckpt_path)
    try:  # model and data settings (dataset, normalisation, split) both come from the checkpoint
        model = ArcFaceModule.load_from_checkpoint(ckpt_path, map_location="cpu")
        datamodule = ImageDataModule.load_from_checkpoint(ckpt_path, **OmegaConf.to_container(cfg.data, resolve=True))
    except Exception as error:  # not a checkpoint, truncated, or of another model
        raise ConfigError(f"ckpt_path={ckpt_path} could not be loaded: {one_line(error)}") from error
    try:
        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
        trainer = instantiate(cfg.trainer, logger=loggers or False)
    except Exception as error:
        raise ConfigError(one_line(error)) from error
    (results,) = trainer.test(model, datamodule=datamodule)
    return {**final_metrics(results), "checkpoint": str(ckpt_path), "dataset": datamodule.hparams.dataset}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    run(evaluate, cfg)


def cli() -> None:
    check_group_choices(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
