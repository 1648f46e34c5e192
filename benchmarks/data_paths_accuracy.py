"""The same recipe through the four data paths on the same real MNIST images: test accuracy, mean ± std over seeds.

All of MNIST is written as PNG files (60,000 training images in class folders, the 10,000 test images beside
them) and listed in CSV files in MNIST's own order; the folder is packed with the official test set as its test
split. Then experiment=seed_mnist (the seed's CNN, batch 64), `--epochs` epochs, for each seed, through
data=mnist (IDX files, the in-memory tensor pipeline), data=image_list (the CSV lists: the same order as the IDX
files, hence the same split and batches), data=image_folder (the class folders: another order, so another random
5,000-image validation split) and data=streaming (the packed set: LitData's own shuffling). Every path validates on
5,000 training images and tests once on the official 10,000.

    python benchmarks/data_paths_accuracy.py                    # seeds 0 1 2, 2 epochs
    python benchmarks/data_paths_accuracy.py --seeds 0 1 --epochs 1
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev

import torch
from common import ROOT, data_dir, machine, read_mnist, run_project
from torchvision.io import write_png


def write_mnist_pngs(mnist: str, out: Path) -> dict[str, Path]:
    paths = {}
    for split in ("train", "test"):
        images, labels = read_mnist(mnist, split)
        rows = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = f"{split}/{label}/{i:05d}.png"
            (out / split / str(label)).mkdir(parents=True, exist_ok=True)
            write_png(torch.from_numpy(image.copy())[None], str(out / name))
            rows.append(f"{name},{label}")
        (out / f"{split}.csv").write_text("\n".join(rows) + "\n")
        paths[split] = out / split
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    mnist = data_dir(args.data_dir)
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="paths-"))
    try:
        folders = write_mnist_pngs(mnist, work)
        packed = work / "packed"
        pack = [sys.executable, "-m", "arcface_lightning.pack", str(folders["train"]), str(packed)]
        pack += ["--test-root", str(folders["test"]), "--val-size", "5000"]
        subprocess.run(pack, cwd=ROOT, check=True, capture_output=True)
        own = ["data.in_channels=1", "data.image_size=28", "data.val_size=5000", "data.num_workers=1"]
        own += ["data.mean=[0.1307]", "data.std=[0.3081]"]
        lists = [f"data.root={work / 'train.csv'}", f"data.test_root={work / 'test.csv'}"]
        trees = [f"data.root={folders['train']}", f"data.test_root={folders['test']}"]
        paths = {
            "data=mnist": [],
            "data=image_list": ["data=image_list", *lists, *own],
            "data=image_folder": ["data=image_folder", *trees, *own],
            "data=streaming": ["data=streaming", f"data.root={packed}", *own],
        }
        results: dict[str, list[float]] = {name: [] for name in paths}
        for seed in args.seeds:
            for name, overrides in paths.items():
                metrics = run_project(
                    "experiment=seed_mnist", f"trainer.max_epochs={args.epochs}", f"seed={seed}", "logger=csv",
                    "callbacks.progress_bar.refresh_rate=0", *overrides, data=mnist,
                )  # fmt: skip
                results[name].append(metrics["test/acc"])
                print(f"seed {seed} {name:18s} test/acc {metrics['test/acc']:.4f}", flush=True)
        for name, values in results.items():
            spread = stdev(values) if len(values) > 1 else 0.0
            print(f"{name:18s} test/acc {mean(values):.4f} ± {spread:.4f} over seeds {args.seeds}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
