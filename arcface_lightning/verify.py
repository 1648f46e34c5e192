"""Verify: are two images of the same identity? The cosine of their embeddings against a threshold.

    python -m arcface_lightning.verify ckpt_path=<run>/checkpoints/<best>.ckpt a=face1.png b=face2.png
    python -m arcface_lightning.verify ckpt_path=model.onnx a=face1.png b=face2.png far=1e-4
    python -m arcface_lightning.verify ckpt_path=model.pt a=face1.png b=face2.png threshold=0.35

`ckpt_path`: a checkpoint, an ONNX export or a TorchScript export (inference.load_model); the images are decoded
to its contract's size and channels. The threshold: `threshold=<cosine>` when given; otherwise the one saved with
the model at `far` (a false accept rate: callbacks.VerificationThresholds chose it on the validation pairs of the
checkpoint's own epoch, and export copies it into the file). A pair is "same" when its score is ≥ the threshold.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from arcface_lightning.config import CONF_DIR, ConfigError, register_configs
from arcface_lightning.data.images import read_image
from arcface_lightning.inference import ModelError, far_key, load_model
from arcface_lightning.overrides import check_overrides, upgrade_overrides
from arcface_lightning.runs import run, start


def verify(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    for key in ("ckpt_path", "a", "b"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(
                f"{key} is required: python -m arcface_lightning.verify ckpt_path=<model> a=<img> b=<img>"
            )
    for key in ("a", "b"):
        if not Path(str(cfg[key])).is_file():
            raise ConfigError(f"{key}={cfg[key]}: no such file; give an image (png, jpg, gif, webp)")
    threshold = cfg.threshold
    if threshold is not None and not (isinstance(threshold, (int, float)) and -1 <= threshold <= 1):
        raise ConfigError(f"threshold={threshold} is not a cosine: give a number in [-1, 1] (or null: the saved one)")
    if threshold is None and not (isinstance(cfg.far, (int, float)) and 0 < cfg.far < 1):
        raise ConfigError(f"far={cfg.far} is not a false accept rate: give a number in (0, 1), e.g. 1e-3")
    embed, contract = load_model(cfg.ckpt_path)
    if threshold is None:
        name = far_key(cfg.far)
        if name not in contract.thresholds:
            saved = ", ".join(sorted(contract.thresholds)) or "none"
            raise ModelError(
                f"far={cfg.far}: {cfg.ckpt_path} has no threshold at {name} (saved: {saved}); pass threshold=<cosine>"
            )
        threshold, source = contract.thresholds[name], f"threshold@{name}"
    else:
        source = "threshold (given)"
    images = [read_image(str(cfg[key]), contract.in_channels, contract.image_size) for key in ("a", "b")]
    x = embed(torch.stack(images))
    score = float((x[0] * x[1]).sum())
    same = score >= threshold
    print(f"score {score:.4f}  {source} {threshold:.4f}  {'same' if same else 'different'}")
    return {"score": score, "threshold": float(threshold), "same": bool(same), "a": str(cfg.a), "b": str(cfg.b)}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="verify")
def main(cfg: DictConfig) -> None:
    register_configs()
    run(verify, cfg)


def cli() -> None:
    register_configs()
    sys.argv[1:] = upgrade_overrides(sys.argv[1:])  # hydra.main reads sys.argv
    check_overrides(sys.argv[1:], config_name="verify")
    main()


if __name__ == "__main__":
    cli()
