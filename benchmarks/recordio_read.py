"""Reading insightface's `.rec` (data=insightface) against a PNG folder (data=image_folder) and the packed set
(data=streaming), the memory of the reader from 1× to 4× the set size, and a `.bin` of 6,000 pairs evaluated inside
a validation (issue 25).

The same N MNIST training digits three ways: a `.rec` written by MXNet's own writer (tests/data/insightface/
write_with_mxnet.py --mnist --limit N, JPEG quality 95; MXNet in a side environment, --mxnet-python), a folder of
PNG class folders, and the packed set `pack` makes of the `.rec` (its JPEG bytes). Each is split with one validation
and one test image, so N − 2 are trained on. Throughput: images/s delivered by the data module's training loader into
a trivial step (the batch summed), the second epoch of each loader (its workers already started), at num_workers
0/1/2, the three sources interleaved within each repeat. Memory: the peak RSS of a process reading a whole epoch of
a `.rec` of N and of 4N digits (the training digits written 4 times) with num_workers=0. The `.bin`: 6,000 pairs of
MNIST test digits (JPEG quality 95, half same-class), `evaluation.pairs=<bin>` on experiment=mnist_default's model,
the seconds of PairVerification's work at the end of a validation (the first decodes the 12,000 images, later ones
reuse them).

    python benchmarks/recordio_read.py                                 # N=10000, 2 repeats
    python benchmarks/recordio_read.py --n 20000 --repeats 3 --mxnet-python /work/mxvenv/bin/python
    python benchmarks/recordio_read.py --parts bin                      # only the .bin's seconds
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch
from common import ROOT, data_dir, machine, read_mnist

WRITER = ROOT / "tests" / "data" / "insightface" / "write_with_mxnet.py"
SOURCES = ("image_folder", "insightface", "streaming")


def write_sets(work: Path, n: int, mnist: str, mxnet_python: str) -> dict[str, Path]:
    from torchvision.io import write_png

    from arcface_lightning.pack import pack

    raw = Path(mnist) / "MNIST" / "raw"
    for name, extra in (("rec1", []), ("rec4", ["--repeat", "4"])):
        args = [mxnet_python, str(WRITER), str(raw), str(work / name), "--mnist", "--limit", str(n), *extra]
        subprocess.run(args, check=True, capture_output=True)
    images, labels = read_mnist(mnist, "train")
    for i, (image, label) in enumerate(zip(images[:n], labels[:n], strict=True)):
        folder = work / "png" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        write_png(torch.from_numpy(image.copy())[None], str(folder / f"{i:05d}.png"))
    pack(work / "rec1" / "train", work / "packed", val_size=1, test_size=1, workers=2, chunk_bytes="4MB")
    return {"image_folder": work / "png", "insightface": work / "rec1" / "train", "streaming": work / "packed"}


def data_module(source: str, root: Path, workers: int):
    from arcface_lightning.data import ImageDataModule
    from arcface_lightning.data.streaming import StreamingDataModule

    shape = {"in_channels": 1, "image_size": 28, "num_classes": None, "batch_size": 256, "num_workers": workers}
    if source == "streaming":
        return StreamingDataModule(root=str(root), shuffle_seed=0, **shape)
    return ImageDataModule(dataset=source, root=str(root), val_size=1, test_size=1, shuffle_seed=0, **shape)


def throughput(source: str, root: Path, workers: int) -> float:
    """Images/s of the training loader's second epoch into a trivial step."""
    dm = data_module(source, root, workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in range(2):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        start, seen, total = time.perf_counter(), 0, torch.zeros(())
        for images, _ in loader:
            total += images.float().sum()
            seen += len(images)
        elapsed = time.perf_counter() - start
    del loader, dm
    return seen / elapsed


def peak_memory(root: Path) -> dict:
    """One epoch of data=insightface at num_workers=0 (the reader is this process): RSS after the index, peak RSS."""
    dm = data_module("insightface", root, 0)
    dm.setup("fit")
    indexed = rss_mb()
    seen = sum(len(images) for images, _ in dm.train_dataloader())
    return {"images": seen, "indexed_mb": indexed, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def rss_mb() -> float:
    fields = Path("/proc/self/status").read_text().split("VmRSS:")[1].split()
    return int(fields[0]) / 1024


def write_bin(path: Path, mnist: str, pairs: int) -> None:
    """`pairs` pairs of MNIST test digits as insightface's .bin (JPEG quality 95), same class for even pairs."""
    from torchvision.io import encode_jpeg

    images, labels = read_mnist(mnist, "test")
    by_class = {c: [i for i in range(len(labels)) if labels[i] == c] for c in range(10)}
    rng, bins, same = random.Random(0), [], []
    for p in range(pairs):
        a = rng.randrange(len(labels))
        pool = (
            by_class[labels[a]]
            if p % 2 == 0
            else [i for i in rng.sample(range(len(labels)), 20) if labels[i] != labels[a]]
        )
        b = rng.choice([i for i in pool if i != a])
        for i in (a, b):
            bins.append(encode_jpeg(torch.from_numpy(images[i].copy())[None], quality=95).numpy().tobytes())
        same.append(p % 2 == 0)
    path.write_bytes(pickle.dumps((bins, same), protocol=4))


def bin_seconds(binary: Path, mnist: str, work: Path) -> list[float]:
    """PairVerification's seconds at the end of each of three validations (experiment=mnist_default's model)."""
    from hydra import compose, initialize_config_dir

    from arcface_lightning.core.config import register_configs
    from arcface_lightning.train import build
    from arcface_lightning.training.callbacks import PairVerification

    register_configs()  # trainer/lightning, which conf/trainer/default.yaml extends, and the resolvers
    overrides = ["experiment=mnist_default", f"paths.data_dir={mnist}", "data.download=false", "logger=csv",
                 f"evaluation.pairs={binary}", "trainer.limit_val_batches=1",
                 f"paths.output_dir={work / 'run'}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    dm, model, trainer = build(cfg)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, PairVerification)]
    seconds, verify = [], callback._verify

    def timed(*args) -> None:
        start = time.perf_counter()
        verify(*args)
        seconds.append(time.perf_counter() - start)

    callback._verify = timed
    for _ in range(3):
        trainer.validate(model, datamodule=dm, verbose=False)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="MNIST training digits per set")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mxnet-python", default="/work/mxvenv/bin/python", help="a Python with mxnet 1.9.1")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--parts", nargs="+", choices=("read", "memory", "bin"), default=["read", "memory", "bin"])
    parser.add_argument("--memory", help=argparse.SUPPRESS)  # internal: one memory measurement in this process
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(peak_memory(Path(args.memory))))
        return
    mnist = data_dir(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roots = write_sets(work, args.n, mnist, args.mxnet_python) if {"read", "memory"} & set(args.parts) else {}
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats if "read" in args.parts else 0):
            for workers in args.workers:
                for source in SOURCES:
                    rates.setdefault((source, workers), []).append(throughput(source, roots[source], workers))
        print(machine())
        if rates:
            print(f"{args.n} MNIST digits ({args.n - 2} trained on), batch 256, {args.repeats} repeats")
        for workers in args.workers if rates else ():
            png = mean(rates["image_folder", workers])
            row = [f"{s} {mean(rates[s, workers]):,.0f}/s ({mean(rates[s, workers]) / png:.2f}×)" for s in SOURCES]
            print(f"num_workers={workers}: " + ", ".join(row), flush=True)
        for name in ("rec1", "rec4") if "memory" in args.parts else ():
            out = subprocess.run([sys.executable, __file__, "--memory", str(work / name / "train")],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            memory = json.loads(out.stdout.strip().splitlines()[-1])
            size = (work / name / "train" / "train.rec").stat().st_size / 2**20
            print(f"memory {name}: train.rec {size:.1f} MB, {memory['images']} images read: RSS after indexing "
                  f"{memory['indexed_mb']:.0f} MB, peak {memory['peak_mb']:.0f} MB")  # fmt: skip
        if "bin" not in args.parts:
            return
        binary = work / "mnist_6000.bin"
        write_bin(binary, mnist, 6000)
        seconds = bin_seconds(binary, mnist, work)
        print(f".bin of 6,000 pairs in a validation: {', '.join(f'{s:.1f}' for s in seconds)} s (first decodes)")


if __name__ == "__main__":
    main()
