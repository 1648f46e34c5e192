"""Resident memory of the streaming path against the packed set's size: a set of N real MNIST digits, upscaled to
112×112 RGB (the face-crop size: 37.6 KB an image decoded) and written as PNG, packed at 1×, 2× and 4× (the same
digits under other names), then one whole training epoch of each read through
`StreamingDataModule.train_dataloader()` (decoded, batched) in a fresh process; its peak resident set size. Beside
it, the in-memory image path (`data=image_folder data.cache=memory`) for the same sets, whose memory grows with the
set by design.

    python benchmarks/streaming_memory.py                    # N = 10,000
    python benchmarks/streaming_memory.py --images 5000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, data_dir, machine, read_mnist
from torchvision.io import write_png

READ_EPOCH = """
import json, resource, sys, time
from arcface_lightning.data import ImageDataModule
from arcface_lightning.data.streaming import StreamingDataModule
kind, root = sys.argv[1], sys.argv[2]
settings = dict(in_channels=3, image_size=112, batch_size=256, num_classes=None, num_workers=0, mean=None, std=None)
if kind == "streaming":
    dm = StreamingDataModule(root=root, **settings)
else:
    dm = ImageDataModule(dataset="image_folder", root=root, cache="memory", val_size=100, **settings)
dm.setup("fit")
start, images = time.perf_counter(), 0
for batch, _ in dm.train_dataloader():
    images += len(batch)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"images": images, "seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mb": int(status["RssAnon"].split()[0]) / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, default=10000)
    args = parser.parse_args()
    images, labels = read_mnist(data_dir(args.data_dir))
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="memory-"))
    try:
        for copies in (1, 2, 4):
            folder = work / f"png{copies}"
            for c in range(copies):
                for i in range(args.images):
                    (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
                    face = torch.from_numpy(images[i].copy())[None, None].float()
                    face = torch.nn.functional.interpolate(face, size=112, mode="bilinear")[0].to(torch.uint8)
                    write_png(face.expand(3, -1, -1).contiguous(), str(folder / str(labels[i]) / f"{c}_{i}.png"))
            packed = work / f"packed{copies}"
            pack = [sys.executable, "-m", "arcface_lightning.pack", str(folder), str(packed), "--val-size", "100"]
            subprocess.run(pack, cwd=ROOT, check=True, capture_output=True)
            size = sum(p.stat().st_size for p in (packed / "train").glob("*.bin")) / 2**20
            for kind, root in (("streaming", packed), ("memory", folder)):
                out = subprocess.run(
                    [sys.executable, "-c", READ_EPOCH, kind, str(root)], cwd=ROOT, capture_output=True, text=True
                )
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-2000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"{copies}× ({copies * args.images} images, packed train split {size:.0f} MB) {kind:9s}: "
                    f"peak RSS {r['peak_mb']:.0f} MB, anonymous {r['anon_mb']:.0f} MB at the end, "
                    f"{r['images']} images in {r['seconds']:.1f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
