"""Does sampling 10% of the centres cost accuracy? The same recipe with head.sample_rate 1.0 and 0.1, several seeds,
on an MNIST-sized set with many identities (MNIST's 10 classes are no test: every batch holds all of them).

    python benchmarks/partial_fc_accuracy.py --seeds 0 1 2 --epochs 3

The set: 1,000 synthetic identities of 28×28 grayscale images, 50 for training and 10 for the test per identity
(60,000 images, MNIST's size). An identity is a random blurred pattern; its images are the pattern shifted by up to
2 pixels, with noise. Written as PNG files with CSV lists into a temporary folder and trained through
`data=image_list data.cache=memory` (the user's-images path); batch 64, so a step samples max(0.1 × 1,000, 64) =
100 centres at rate 0.1 and all 1,000 at rate 1. Validation: 10% of the training images; the test set once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import write_png

ROOT = Path(__file__).resolve().parents[1]
CLASSES, TRAIN, TEST, SIDE = 1000, 50, 10, 28


def write_set(folder: Path, seed: int = 0, patterns: torch.Tensor | None = None) -> tuple[Path, Path]:
    """train.csv and test.csv of PNG files under `folder`: CLASSES identities, each a (1, SIDE + 4, SIDE + 4) pattern
    (random and blurred unless `patterns` are given) seen through shifted windows with noise."""
    g = torch.Generator().manual_seed(seed)
    if patterns is None:
        patterns = F.avg_pool2d(torch.rand(CLASSES, 1, SIDE + 4, SIDE + 4, generator=g), 3, 1, 1)
    patterns = (patterns - patterns.mean((2, 3), keepdim=True)) / patterns.std((2, 3), keepdim=True)
    lists = {}
    for split, count in (("train", TRAIN), ("test", TEST)):
        rows = []
        (folder / split).mkdir(parents=True)
        for c in range(CLASSES):
            for i in range(count):
                dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
                image = patterns[c, :, dy : dy + SIDE, dx : dx + SIDE] + 0.6 * torch.randn(1, SIDE, SIDE, generator=g)
                pixels = (image * 40 + 128).clamp(0, 255).to(torch.uint8)
                name = f"{split}/{c:04d}_{i:02d}.png"
                write_png(pixels, str(folder / name))
                rows.append(f"{name},{c}")
        lists[split] = folder / f"{split}.csv"
        lists[split].write_text("path,label\n" + "\n".join(rows) + "\n")
    return lists["train"], lists["test"]


def train(train_list: Path, test_list: Path, rate: float, seed: int, epochs: int, out: Path, *extra: str) -> dict:
    """The seed recipe on the set at head.sample_rate `rate`, with `extra` overrides; its metrics.json."""
    args = [
        sys.executable, "-m", "arcface_lightning.train", "experiment=seed_mnist", "data=image_list",
        f"data.root={train_list}", f"data.test_root={test_list}", "data.cache=memory", "data.in_channels=1",
        "data.image_size=28", "data.val_size=0.1", "data.normalize=false", f"head.sample_rate={rate}",
        f"trainer.max_epochs={epochs}", f"seed={seed}", "logger=csv", "evaluation.figures=false",
        "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={out}", *extra,
    ]  # fmt: skip
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train_list, test_list = write_set(Path(tmp) / "set")
        table: dict[float, list[dict]] = {1.0: [], 0.1: []}
        for seed in args.seeds:
            for rate in table:  # interleaved, so both rates see the same machine phases
                record = train(train_list, test_list, rate, seed, args.epochs, Path(tmp) / f"run_{rate}_{seed}")
                table[rate].append(record)
                print(f"rate {rate} seed {seed}: test/acc {record['test/acc']:.4f}, fit {record['time/fit_s']:.1f} s")
    print(f"\n| head.sample_rate | test/acc per seed {args.seeds} | mean ± std | val/acc_best mean | fit time mean |")
    print("|---|---|---|---|---|")
    for rate, records in table.items():
        accs = [r["test/acc"] for r in records]
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        val = np.mean([r["val/acc_best"] for r in records])
        fit = np.mean([r["time/fit_s"] for r in records])
        shown = ", ".join(f"{a:.4f}" for a in accs)
        print(f"| {rate} | {shown} | {np.mean(accs):.4f} ± {std:.4f} | {val:.4f} | {fit:.1f} s |")


if __name__ == "__main__":
    main()
