"""Evaluate: test a checkpoint once on the official test set and write metrics.json (margin-free accuracy).

    python -m arcface_lightning.evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m arcface_lightning.evaluate ckpt_path=<file> paths.data_dir=/data data.download=false

Model and data settings (dataset, normalisation, validation split) are rebuilt from the checkpoint; the command line
sets only where the data is and how it is loaded (`paths.data_dir`, `data.download`, `data.eval_batch_size`, ...;
a user's images: `data.root`, `data.test_root`, kept from the checkpoint when not given).
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from arcface_lightning.config import (
    CONF_DIR,
    ConfigError,
    instantiate_node,
    register_configs,
)
from arcface_lightning.overrides import check_overrides, upgrade_overrides
from arcface_lightning.runs import check_ckpt_path, final_metrics, load_checkpoint, run, start


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path is required: python -m arcface_lightning.evaluate ckpt_path=<file.ckpt>")
    checkpoint = check_ckpt_path(cfg.ckpt_path)
    model, datamodule = load_checkpoint(cfg, checkpoint)  # the weights are in the model: test() reads no file
    callbacks = [instantiate_node(cfg, f"callbacks.{name}") for name in cfg.get("callbacks") or {}]
    loggers = [instantiate_node(cfg, f"logger.{name}") for name in cfg.get("logger") or {}]
    trainer = instantiate_node(cfg, "trainer", callbacks=callbacks, logger=loggers or False)
    metrics: dict[str, float] = {}
    for results in trainer.test(model, datamodule=datamodule):  # one dict per test loader (open set: two)
        metrics.update(final_metrics(results))
    dataset = datamodule.hparams.dataset
    return {**metrics, "checkpoint": str(checkpoint.path), "dataset": dataset, "tags": list(cfg.get("tags") or [])}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    register_configs()
    run(evaluate, cfg)


def cli() -> None:
    register_configs()
    sys.argv[1:] = upgrade_overrides(sys.argv[1:])  # hydra.main reads sys.argv
    check_overrides(sys.argv[1:], config_name="eval")
    main()


if __name__ == "__main__":
    cli()
