"""Verify: are two images of the same identity? The cosine of their embeddings against a threshold.

    python -m arcface_lightning.verify ckpt_path=<run>/checkpoints/<best>.ckpt a=face1.png b=face2.png
    python -m arcface_lightning.verify ckpt_path=model.onnx a=face1.png b=face2.png far=1e-4
    python -m arcface_lightning.verify ckpt_path=model.pt a=face1.png b=face2.png threshold=0.35

`ckpt_path`: a checkpoint, an ONNX export or a TorchScript export (inference.load_model); the images are decoded
to its contract's size and channels. The threshold: `threshold=<cosine>` when given; otherwise the one saved with
the model at `far` (a false accept rate: callbacks.VerificationThresholds chose it on the validation pairs of the
checkpoint's own epoch, and export copies it into the file). A pair is "same" when its score is ≥ the threshold.

An image whose shorter side is less than half the model's `image_size` is scored with a warning: resizing it up more
than 2× invents most of the pixels the model sees (a 1×1 image becomes a flat square), so its score says little
about the identity (metrics.json names it under `small_images`). A TorchScript `ckpt_path` (.pt) is a program:
loading it runs the code it holds, so give only files you trust.

With an .onnx or .pt model the command imports neither Lightning nor (for PNG images) torchvision; a .ckpt brings
Lightning in to rebuild its model (seconds more at start).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from arcface_lightning.core.checks import ModelError
from arcface_lightning.core.config import ConfigError
from arcface_lightning.core.runs import entry_point, start
from arcface_lightning.data.files import read_image
from arcface_lightning.serving.contract import far_key
from arcface_lightning.serving.inference import load_model, with_flip

log = logging.getLogger(__name__)
SMALL_IMAGE_FRACTION = 0.5  # of image_size: a shorter side below it is resized up more than 2×


def original_size(path: str) -> tuple[int, int] | None:
    """(height, width) of an image file as stored, or None where it cannot be read (read_image says why). Pillow
    reads the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:
        return None
    return height, width


def warn_if_small(key: str, path: str, image_size: int) -> bool:
    """Warn (one line, in the log) where an image's shorter side is below SMALL_IMAGE_FRACTION of the model's input."""
    size = original_size(path)
    if size is None or min(size) >= SMALL_IMAGE_FRACTION * image_size:
        return False
    log.warning(
        "%s=%s is %d×%d, far smaller than the model's %d×%d input: its score says little about the identity",
        key,
        path,
        size[1],
        size[0],
        image_size,
        image_size,
    )
    return True


def verify(cfg: DictConfig) -> dict[str, Any]:
    start(cfg)
    for key in ("a", "b"):
        path = Path(str(cfg[key]))
        if path.is_dir():
            raise ConfigError(f"{key}={cfg[key]} is a folder; give an image file (png, jpg, gif, webp)")
        if not path.is_file():
            raise ConfigError(f"{key}={cfg[key]}: no such file; give an image (png, jpg, gif, webp)")
    threshold = cfg.threshold
    if threshold is not None and not (isinstance(threshold, (int, float)) and -1 <= threshold <= 1):
        raise ConfigError(f"threshold={threshold} is not a cosine: give a number in [-1, 1] (or null: the saved one)")
    if threshold is None and not (isinstance(cfg.far, (int, float)) and 0 < cfg.far < 1):
        raise ConfigError(f"far={cfg.far} is not a false accept rate: give a number in (0, 1), e.g. 1e-3")
    embed, contract = load_model(cfg.ckpt_path)
    embed = with_flip(embed) if cfg.get("flip") else embed
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
    small = [key for key in ("a", "b") if warn_if_small(key, str(cfg[key]), contract.image_size)]
    x = embed(np.stack(images))
    score = float((x[0] * x[1]).sum())
    same = score >= threshold
    print(f"score {score:.4f}  {source} {threshold:.4f}  {'same' if same else 'different'}")
    record = {"score": score, "threshold": float(threshold), "same": bool(same), "a": str(cfg.a), "b": str(cfg.b)}
    return {**record, "small_images": small} if small else record


main, cli = entry_point("verify", verify)


if __name__ == "__main__":
    cli()
