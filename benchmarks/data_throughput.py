"""Training throughput of the seed recipe (experiment=seed_mnist: the seed's CNN, batch 64) through each data path,
on the same real MNIST digits: the in-memory tensor pipeline (data=mnist), PNG class folders decoded by
torchvision.io in 0, 1 and 2 loader workers (data=image_folder), and the packed set streamed by LitData
(data=streaming) with 0, 1 and 2 workers. Each variant is a fresh `python -m arcface_lightning.train` process
training --steps steps without validation; images/s = steps × 64 / `time/fit_s`, and each path's ratio to the
in-memory pipeline measured in the same run. Then where a decoding path's time goes, in this process: decoding one
PNG, collating a batch, and the model's own training step.

    python benchmarks/data_throughput.py                        # real MNIST from ARCFACE_DATA_DIR
    python benchmarks/data_throughput.py --images 20000 --steps 300 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from common import ROOT, data_dir, machine, read_mnist, run_project
from torchvision.io import write_png

COMMON = ["experiment=seed_mnist", "trainer.limit_val_batches=0", "trainer.limit_test_batches=1", "logger=csv"]
OWN = ["data.in_channels=1", "data.image_size=28", "data.val_size=100", "callbacks.progress_bar.refresh_rate=0"]


def write_digits(root: Path, mnist: str, n: int) -> Path:
    images, labels = read_mnist(mnist)
    for i, (image, label) in enumerate(zip(images[:n], labels[:n], strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        write_png(torch.from_numpy(image.copy())[None], str(folder / f"{i:05d}.png"))
    return root


def where_time_goes(folder: Path) -> str:
    """Per image, in this process, one thread: decode (Pillow for PNG), collate, and the seed network's step."""
    from arcface_lightning.data.files import read_image
    from arcface_lightning.models.backbones import SimpleCNN

    torch.set_num_threads(1)
    files = sorted(str(p) for p in folder.rglob("*.png"))[:2000]
    start = time.perf_counter()
    decoded = [torch.from_numpy(read_image(f, 1, 28)) for f in files]  # as ImageFiles serves them
    decode = (time.perf_counter() - start) / len(files)
    start = time.perf_counter()
    for k in range(0, len(decoded) - 64, 64):
        torch.utils.data.default_collate([(x, 0) for x in decoded[k : k + 64]])
    collate = (time.perf_counter() - start) / (len(decoded) // 64 * 64)
    model = SimpleCNN(embedding_size=128)
    optimizer = torch.optim.Adam(model.parameters())
    batch = torch.rand(64, 1, 28, 28)
    for _ in range(3):
        model(batch).square().mean().backward()
    start = time.perf_counter()
    for _ in range(20):
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()
    step = (time.perf_counter() - start) / (20 * 64)
    return (
        f"per image, one thread: decode {decode * 1e6:.0f} µs, collate {collate * 1e6:.1f} µs, "
        f"training step of the network {step * 1e6:.0f} µs (decode ÷ step {decode / step:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, default=20000, help="MNIST training images written as PNG and packed")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    mnist = data_dir(args.data_dir)
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    try:
        folder = write_digits(work / "png", mnist, args.images)
        packed = work / "packed"
        subprocess.run(
            [sys.executable, "-m", "arcface_lightning.pack", str(folder), str(packed), "--val-size", "100"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        steps = [f"trainer.max_steps={args.steps}", "trainer.max_epochs=100"]
        variants = {"in-memory tensor pipeline (data=mnist)": [*COMMON, *steps]}
        for workers in (0, 1, 2):
            variants[f"PNG folder, {workers} workers"] = [
                *COMMON, *steps, *OWN, "data=image_folder", f"data.root={folder}", f"data.num_workers={workers}"
            ]  # fmt: skip
        for workers in (0, 1, 2):
            variants[f"packed (LitData), {workers} workers"] = [
                *COMMON, *steps, *OWN, "data=streaming", f"data.root={packed}", f"data.num_workers={workers}"
            ]  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, overrides in variants.items():
                metrics = run_project(*overrides, data=mnist)
                rates[name].append(args.steps * 64 / metrics["time/fit_s"])
        base = median(rates["in-memory tensor pipeline (data=mnist)"])
        for name, values in rates.items():
            print(f"{name:40s} {median(values):8.0f} images/s  ({median(values) / base:.2f}× in-memory)", flush=True)
        print(where_time_goes(folder))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
