"""Evaluate: test a checkpoint once on the official test set and write metrics.json (margin-free accuracy).

    python -m arcface_lightning.evaluate ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m arcface_lightning.evaluate ckpt_path=<file> paths.data_dir=/data data.download=false

Model and data settings (dataset, normalisation, validation split) are rebuilt from the checkpoint; the command line
sets only where the data is and how it is loaded (`paths.data_dir`, `data.download`, `data.eval_batch_size`, ...;
a user's images: `data.root`, `data.test_root`, kept from the checkpoint when not given).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from arcface_lightning.core.runs import (
    build_trainer,
    check_ckpt_path,
    entry_point,
    final_metrics,
    load_checkpoint,
    start,
)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    checkpoint = check_ckpt_path(cfg.ckpt_path)
    model, datamodule = load_checkpoint(cfg, checkpoint)  # the weights are in the model: test() reads no file
    trainer = build_trainer(cfg)
    metrics: dict[str, float] = {}
    for results in trainer.test(model, datamodule=datamodule):  # one dict per test loader (open set: two)
        metrics.update(final_metrics(results))
    dataset = datamodule.hparams.dataset
    return {**metrics, "checkpoint": str(checkpoint.path), "dataset": dataset, "tags": list(cfg.get("tags") or [])}


main, cli = entry_point("eval", evaluate)


if __name__ == "__main__":
    cli()
