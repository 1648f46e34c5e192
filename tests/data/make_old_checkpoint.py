"""Writes tests/data/old_format.ckpt and old_format.json: a checkpoint in the format before the contract had a key of
its own (contract derived from the hyper-parameters, the data module's state and `verification_thresholds`), made by
the code of that time, and the test metrics it scored. tests/test_checkpoints.py loads it with today's code.

    git worktree add /tmp/old a4173b9        # the last commit that wrote this format
    PYTHONPATH=/tmp/old python tests/data/make_old_checkpoint.py

The data: old_format_images(), a folder of 10 classes × 30 synthetic 28×28 PNGs (a bright square whose position
encodes the class, seeded), the same bytes whenever it is written again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def old_format_images(root: Path) -> Path:
    """10 class folders (`class_0` … `class_9`) of 30 PNGs each: noise plus a bright 6×6 square per class."""
    rng = np.random.default_rng(1234)
    for label in range(10):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        row, col = divmod(label, 4)
        for i in range(30):
            image = rng.integers(0, 60, size=(28, 28), dtype=np.uint8)
            image[row * 7 : row * 7 + 6, col * 7 : col * 7 + 6] = 255
            Image.fromarray(image).save(folder / f"{i:02d}.png")
    return root


OVERRIDES = [
    "~experiment",
    "trainer=cpu",
    "data=image_folder",
    "data.image_size=28",
    "data.in_channels=1",
    "data.mean=[0.5]",
    "data.std=[0.5]",
    "data.val_size=60",
    "data.test_size=60",
    "data.batch_size=32",
    "data.eval_batch_size=100",
    "embedding_size=16",
    "backbone.channels=[4,8]",
    "trainer.max_epochs=8",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "seed=0",
]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        images = old_format_images(Path(tmp) / "images")
        run = Path(tmp) / "run"
        command = [sys.executable, "-m", "arcface_lightning.train", *OVERRIDES, f"data.root={images}",
                   f"hydra.run.dir={run}"]  # fmt: skip
        subprocess.run(command, check=True)
        record = json.loads((run / "metrics.json").read_text())
        shutil.copy(record["best_checkpoint"], HERE / "old_format.ckpt")
        kept = {k: v for k, v in record.items() if k.startswith("test/")}
        (HERE / "old_format.json").write_text(json.dumps({"overrides": OVERRIDES, "test": kept}, indent=1) + "\n")


if __name__ == "__main__":
    main()
