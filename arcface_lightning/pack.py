"""Pack a folder of class folders (or a CSV list) into a streaming set: data=streaming data.root=<out dir>.

    python -m arcface_lightning.pack /data/casia /data/casia_packed
    python -m arcface_lightning.pack /data/casia /data/casia_packed --val-split by_class --val-size 500 --test-size 500
    python -m arcface_lightning.pack /data/train.csv /data/packed --test-root /data/test.csv --workers 8

The splits are made here, once, exactly as `data=image_folder` makes them (same keys, same seed, same sets), and
each is written as a LitData set (`<out>/train`, `<out>/val`, `<out>/test`) of the original encoded files with
their labels, in a seeded random order (LitData shuffles chunks and samples within them, so chunks must mix
classes). Every image is decoded once while packing: files that cannot be decoded are skipped and listed in
`<out>/skipped.txt` (the count is printed). `<out>/arcface.json` records the format version, the sample counts,
the class names and the split; training checks it and the chunk files before it starts (data/streaming.py).

The set is written into `<out>.partial-<pid>` and renamed to `<out>` at the end: an interrupted run leaves no
half-written set under the name training reads. An existing `<out>` is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchvision.io import decode_image, read_file

from arcface_lightning.checks import first_line
from arcface_lightning.data.datamodule import ImageDataModule
from arcface_lightning.data.datasets import DataError
from arcface_lightning.data.streaming import FORMAT, SPLITS, VERSION
from arcface_lightning.data.tensors import targets, unwrap

# LitData's default outside notebooks is spawn: every worker of every split re-imports torch (seconds each). The
# packing workers only read and decode files, and this process has started no threads that a fork would break
# (it has only listed and split the files), so where fork exists they are forked.
START_METHOD = "fork" if sys.platform.startswith("linux") else None

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # see data/streaming.py


def pack(
    source: Path,
    out: Path,
    *,
    test_root: Path | None = None,
    val_size: int | float = 0.05,
    test_size: int | float | None = None,
    val_split: str = "by_sample",
    split_seed: int = 0,
    workers: int = 1,
    chunk_bytes: str = "64MB",
) -> dict[str, Any]:
    """Write the packed set; return its manifest (also `<out>/arcface.json`)."""
    from litdata import optimize

    if out.exists():
        raise DataError(f"{out} exists; give a new folder (a packed set is never overwritten)")
    data = ImageDataModule(
        dataset="image_list" if source.is_file() else "image_folder",
        root=str(source),
        test_root=str(test_root) if test_root else None,
        num_classes=None,
        val_size=val_size,
        test_size=test_size,
        val_split=val_split,
        split_seed=split_seed,
    )
    data.setup()
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        counts = {}
        for split, subset in zip(SPLITS, (data.train_set, data.val_set, data.test_set), strict=True):
            base, indices = unwrap(subset)
            labels, where = targets(subset).tolist(), str(partial)
            rows = [(os.fsdecode(base.paths[i]), y, where) for i, y in zip(indices.tolist(), labels, strict=True)]
            random.Random(f"{split_seed}-{split}").shuffle(rows)
            if rows:
                optimize(
                    fn=encoded_sample,
                    inputs=rows,
                    output_dir=str(partial / split),
                    chunk_bytes=chunk_bytes,
                    num_workers=max(1, min(workers, len(rows))),
                    verbose=False,
                    start_method=START_METHOD,
                )
            counts[split] = count_samples(partial / split)
        skipped_file = partial / "skipped.txt"
        skipped = sorted(skipped_file.read_text().splitlines()) if skipped_file.exists() else []
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "samples": counts,
            "classes": data.classes,
            "val_split": val_split,
            "split": {"val_size": val_size, "test_size": test_size, "split_seed": split_seed},
            "source": str(source),
            "test_source": str(test_root) if test_root else None,
            "skipped": len(skipped),
        }
        if skipped:
            skipped_file.write_text("\n".join(skipped) + "\n")
        (partial / "arcface.json").write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def encoded_sample(row: tuple[str, int, str]) -> Iterator[dict[str, Any]]:
    """One image file as a packed sample, if it decodes; else its path goes to skipped.txt (LitData workers run
    this in their own processes; one append per line)."""
    path, label, partial = row
    try:
        data = read_file(path)
        decode_image(data)  # the whole file: corrupt data fails here
    except Exception as error:  # unreadable or corrupt: torchvision raises RuntimeError, the OS OSError
        with open(os.path.join(partial, "skipped.txt"), "a") as log:
            log.write(f"{path}\tunreadable image {path}: {first_line(error)}\n")
        return
    yield {"image": data.numpy().tobytes(), "label": label}  # the bytes read once, as they are on disk


def count_samples(folder: Path) -> int:
    index = folder / "index.json"
    if not index.is_file():  # an empty split (no test split when there is a test folder's own)
        folder.mkdir(parents=True, exist_ok=True)
        index.write_text(json.dumps({"chunks": [], "config": None}) + "\n")
        return 0
    return sum(chunk["chunk_size"] for chunk in json.loads(index.read_text())["chunks"])


def size(text: str) -> int | float:
    """--val-size / --test-size: a count, or a fraction below 1."""
    return float(text) if "." in text else int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a folder of class folders, or a CSV list of path,label rows")
    parser.add_argument("out", type=Path, help="the packed set's folder (must not exist)")
    parser.add_argument("--test-root", type=Path, help="a separate test folder or list (else a split is held out)")
    parser.add_argument("--val-size", type=size, default=0.05, help="images (by_class: classes), or a fraction")
    parser.add_argument("--test-size", type=size, default=None, help="as --val-size (default: the same)")
    parser.add_argument("--val-split", choices=("by_sample", "by_class"), default="by_sample")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="packing processes")
    parser.add_argument("--chunk-bytes", default="64MB", help="LitData chunk size")
    args = parser.parse_args(argv)
    try:
        manifest = pack(
            args.source,
            args.out,
            test_root=args.test_root,
            val_size=args.val_size,
            test_size=args.test_size,
            val_split=args.val_split,
            split_seed=args.split_seed,
            workers=args.workers,
            chunk_bytes=args.chunk_bytes,
        )
    except (DataError, ValueError) as error:
        raise SystemExit(f"error: {first_line(error)}") from None
    counts = ", ".join(f"{split} {n}" for split, n in manifest["samples"].items())
    print(f"packed {args.out}: {counts} images, {len(manifest['classes'])} classes; skipped {manifest['skipped']}")
    if manifest["skipped"]:
        print(f"unreadable images skipped: {args.out / 'skipped.txt'}", file=sys.stderr)


if __name__ == "__main__":
    main()
