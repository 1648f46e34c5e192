"""Evaluate: test a checkpoint once on the official test set and write metrics.json (margin-free accuracy).

    python -m arcface_lightning.evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m arcface_lightning.evaluate ckpt_path=<file> data=fashion_mnist paths.data_dir=/data

The model (backbone, head, optimizer settings) is rebuilt from the checkpoint alone; the data comes from the config,
so pass the `data=` it was trained on.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from arcface_lightning.module import ArcFaceModule
from arcface_lightning.train import ConfigError, check_ckpt_path, final_metrics, one_line, run


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    ckpt_path = check_ckpt_path(cfg.ckpt_path)
    try:
        model = ArcFaceModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    except Exception as error:  # not a checkpoint, truncated, or of another model
        raise ConfigError(f"ckpt_path={ckpt_path} could not be loaded: {one_line(error)}") from error
    try:
        datamodule = instantiate(cfg.data)
        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
        trainer = instantiate(cfg.trainer, logger=loggers or False)
    except Exception as error:
        raise ConfigError(one_line(error)) from error
    if model.head.num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"the checkpoint has {model.head.num_classes} classes but data={cfg.data.dataset} has "
            f"{cfg.data.num_classes}; pass the data=... it was trained on"
        )
    (results,) = trainer.test(model, datamodule=datamodule)
    return {**final_metrics(results), "checkpoint": str(ckpt_path)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    run(evaluate, cfg)


if __name__ == "__main__":
    main()
