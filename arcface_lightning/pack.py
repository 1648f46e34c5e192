"""Pack a folder of class folders, a CSV list or an insightface folder into a streaming set: data=streaming
data.root=<output>.

    python -m arcface_lightning.pack /data/casia /data/casia_packed
    python -m arcface_lightning.pack /data/casia /data/casia_packed --val-split by_class --val-size 500 --test-size 500
    python -m arcface_lightning.pack /data/train.csv /data/packed --test-root /data/test.csv --workers 8
    python -m arcface_lightning.pack /data/ms1m-retinaface /data/ms1m_packed --val-size 0.01

The source's kind follows from what it is: a file is a CSV list (`data=image_list`), a folder holding `train.rec` or
`train.idx` is insightface's RecordIO layout (`data=insightface`), any other folder a folder of class folders
(`data=image_folder`); --test-root is one of the same kind. The splits are made here, once, exactly as that
`data=` makes them (same keys, same seed, same sets), and each is written as a LitData set (`<output>/train`,
`<output>/val`, `<output>/test`) of the original encoded images with their labels, in a seeded random order
(LitData shuffles chunks and samples within them, so chunks must mix classes). Every image is decoded once: a
folder's or list's files while indexing (data/images.py, in --workers processes), an insightface record in the
packing worker that writes it; images that cannot be decoded are skipped and listed in `<output>/skipped.txt` (the
count is printed). `<output>/arcface.json` records the format version, the sample counts, the class names (an
insightface set's: its class ids as text) and the split; training checks it and the chunk files before it starts
(data/sources/packed.py).

The set is written into `<output>.partial-<pid>` and renamed to `<output>` at the end: a failed or interrupted run
(SIGINT, SIGTERM) removes it, stops its worker processes and exits non-zero. An existing `<output>` is never
overwritten; an output that cannot be created is refused before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.io import read_file

from arcface_lightning.core.checks import OneLineParser, first_line
from arcface_lightning.data.datamodule import ImageDataModule
from arcface_lightning.data.datasets import DataError
from arcface_lightning.data.files import pixels
from arcface_lightning.data.recordio import RecordFile, unpack
from arcface_lightning.data.sources.insightface import RecordImages
from arcface_lightning.data.sources.packed import FORMAT, SPLITS, VERSION
from arcface_lightning.data.splits import is_size
from arcface_lightning.data.tensors import targets, unwrap

# LitData's default outside notebooks is spawn: every worker of every split re-imports torch (seconds each). The
# packing workers only read files, and this process has started no threads that a fork would break (it has listed
# and split the files; the images were decoded in loader worker processes), so where fork exists they are forked.
START_METHOD = "fork" if sys.platform.startswith("linux") else None

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # see data/sources/packed.py


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while packing."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in this process, so that `pack` removes its partial set and stops its
    workers. LitData's `optimize` installs its own SIGINT handler, which stops the workers and calls `os._exit(0)`
    (DataProcessor._signal_handler, litdata 0.2.76): exit status 0, no clean-up, the partial set left behind; here
    that handler is this one. Workers forked from this process inherit it: they leave SIGINT (Ctrl-C reaches the
    whole process group) to this process, which stops them, and exit at once on SIGTERM. A second signal (Ctrl-C
    pressed twice) does not interrupt the clean-up. Signal handlers belong to the main thread: elsewhere (`pack`
    called from another thread) this does nothing."""
    from litdata.processing.data_processor import DataProcessor

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main, received = os.getpid(), []

    def handler(signum: int, frame: Any = None) -> None:
        if os.getpid() != main:
            if signum == signal.SIGTERM:
                os._exit(128 + signum)
            return
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    litdata_handler = DataProcessor._signal_handler
    DataProcessor._signal_handler = lambda self, signum, frame: handler(signum, frame)
    try:
        yield
    finally:
        DataProcessor._signal_handler = litdata_handler
        for signum, action in previous.items():
            signal.signal(signum, action)


def stop_workers(running: set[multiprocessing.process.BaseProcess]) -> None:
    """Stop the worker processes started since `running` was taken (LitData's, the decoding loader's)."""
    children = [child for child in multiprocessing.active_children() if child not in running]
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
            child.join()


def make_partial(out: Path, partial: Path) -> None:
    """Create the partial set's folder (and the missing ones above it); one line if it cannot be."""
    above = next(folder for folder in out.parents if folder.exists())
    if not above.is_dir():
        raise DataError(f"output={out} is inside {above}, which is a file; give a new folder's path")
    try:
        partial.mkdir(parents=True)
    except OSError as error:
        raise DataError(
            f"output={out} cannot be created ({error.strerror}: {error.filename}); give a new folder's path in a "
            "writable folder"
        ) from None


def remove(partial: Path, created: list[Path]) -> None:
    """The partial set and the folders made for it, if empty."""
    shutil.rmtree(partial, ignore_errors=True)
    for folder in created:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


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

    for name, path in (("source", source), ("--test-root", test_root)):
        if path is not None and not path.exists():
            raise DataError(
                f"{name}={path} does not exist; give a folder of class folders, a CSV list of path,label or an "
                "insightface folder (train.rec, train.idx, property)"
            )
    if out.exists():
        raise DataError(f"output={out} exists; give a new folder (a packed set is never overwritten)")
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    created = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]
    running = set(multiprocessing.active_children())
    with interruptible():
        try:
            make_partial(out, partial)
            data = ImageDataModule(
                dataset=kind_of(source),
                root=str(source),
                test_root=str(test_root) if test_root else None,
                num_classes=None,
                val_size=val_size,
                test_size=test_size,
                val_split=val_split,
                split_seed=split_seed,
                num_workers=workers,
            )
            data.setup()  # indexes and decodes every image once (data/images.py), in `workers` processes
            splits = (data.train_set, data.val_set, data.test_set)
            skipped_file = partial / "skipped.txt"
            pools = {id(base): base for base in (unwrap(subset)[0] for subset in splits)}.values()
            with skipped_file.open("a") as listing:
                listing.writelines(f"{path}\t{why}\n" for pool in pools for path, why in getattr(pool, "skipped", ()))
            counts = {}
            for split, subset in zip(SPLITS, splits, strict=True):
                rows = rows_of(subset, str(partial))
                random.Random(f"{split_seed}-{split}").shuffle(rows)
                if rows:
                    try:
                        optimize(
                            fn=encoded_sample,
                            inputs=rows,
                            output_dir=str(partial / split),
                            chunk_bytes=chunk_bytes,
                            num_workers=max(1, min(workers, len(rows))),
                            verbose=False,
                            start_method=START_METHOD,
                        )
                    except RuntimeError as error:  # a worker failed (a full disk): LitData sends its traceback
                        raise DataError(f"packing the {split} split failed: {worker_error(error)}") from error
                counts[split] = count_samples(partial / split)
            skipped = sorted(skipped_file.read_text().splitlines())
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "samples": counts,
                "classes": class_names(data),
                "val_split": val_split,
                "split": {"val_size": val_size, "test_size": test_size, "split_seed": split_seed},
                "source": str(source),
                "test_source": str(test_root) if test_root else None,
                "skipped": len(skipped),
            }
            if skipped:
                skipped_file.write_text("\n".join(skipped) + "\n")
            else:
                skipped_file.unlink()
            (partial / "arcface.json").write_text(json.dumps(manifest, indent=1) + "\n")
            os.replace(partial, out)
        except BaseException:
            stop_workers(running)
            remove(partial, created)
            raise
    return manifest


def kind_of(source: Path) -> str:
    """The `data.dataset` that reads `source`: a CSV list, an insightface folder, or a folder of class folders."""
    if source.is_file():
        return "image_list"
    return "insightface" if any((source / name).is_file() for name in ("train.rec", "train.idx")) else "image_folder"


def class_names(data: ImageDataModule) -> list[str]:
    """The names of the classes the packed set's labels count: a folder's or list's (the data module keeps them),
    else the source's (an insightface set's ids as text), of the training classes when by_class held some out."""
    if data.classes is not None:
        return list(data.classes)
    names, chosen = data.source.classes, data.split.class_ids()
    return [names[c] for c in chosen] if chosen is not None else list(names)


def rows_of(subset: Dataset, partial: str) -> list[tuple[Any, int, str]]:
    """(where the image is, label, the partial set's folder) per sample of a split: a file's path, or an insightface
    record's (train.rec, offset, name)."""
    base, indices = unwrap(subset)
    labels = targets(subset).tolist()
    if isinstance(base, RecordImages):
        rec = str(base.file.path)
        places = [(rec, int(base.offsets[i]), base.name(i)) for i in indices.tolist()]
    else:
        places = [os.fsdecode(base.paths[i]) for i in indices.tolist()]
    return [(place, label, partial) for place, label in zip(places, labels, strict=True)]


@functools.cache
def record_file(path: str) -> RecordFile:
    """One open train.rec per packing worker process (a handle per record would cost an open per image)."""
    return RecordFile(Path(path))


def encoded_sample(row: tuple[Any, int, str]) -> Iterator[dict[str, Any]]:
    """One image as a packed sample, its encoded bytes as stored: a file (it decoded when indexed), or an
    insightface record's image, decoded here once. An image that cannot be read or decoded now goes to skipped.txt
    (LitData workers run this in their own processes; one append per line)."""
    place, label, partial = row
    name = place if isinstance(place, str) else place[2]
    try:
        if isinstance(place, str):
            data = read_file(place).numpy().tobytes()
        else:
            rec, offset, _ = place
            data = unpack(record_file(rec).record(offset))[1]
            pixels(data, 3, name)
    except Exception as error:  # the OS's OSError, as torchvision.io raises it; DataError for a record
        why = first_line(error)
        with open(os.path.join(partial, "skipped.txt"), "a") as log:
            log.write(f"{name}\t{why if why.startswith('unreadable image') else f'unreadable image {name}: {why}'}\n")
        return
    yield {"image": data, "label": label}


def worker_error(error: RuntimeError) -> str:
    """The cause of a LitData worker's failure: the first exception line of the traceback its error carries."""
    cause = re.search(r"^\w+(?:\.\w+)*: .*$", str(error), re.MULTILINE)
    return cause.group(0) if cause else first_line(error)


def count_samples(folder: Path) -> int:
    index = folder / "index.json"
    if not index.is_file():  # an empty split (no test split when there is a test folder's own)
        folder.mkdir(parents=True, exist_ok=True)
        index.write_text(json.dumps({"chunks": [], "config": None}) + "\n")
        return 0
    return sum(chunk["chunk_size"] for chunk in json.loads(index.read_text())["chunks"])


# pack builds its splits with the data module, whose messages name its config keys: here they are pack's arguments
OWN_NAMES = {
    "data.root": "source",
    "data.test_root": "--test-root",
    "data.val_size": "--val-size",
    "data.test_size": "--test-size",
    "data.val_split": "--val-split",
    "data.split_seed": "--split-seed",
}


def own_names(message: str) -> str:
    return re.sub("|".join(re.escape(key) + r"\b" for key in OWN_NAMES), lambda m: OWN_NAMES[m.group(0)], message)


def size(text: str) -> int | float:
    """--val-size / --test-size: a count ≥ 1, or a fraction 0 < f < 1."""
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        value = 0
    if not is_size(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; allowed: a count ≥ 1, or a fraction 0 < f < 1")
    return value


def count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an integer ≥ {minimum}")
        return value

    return parse


def chunk_size(text: str) -> str:
    """--chunk-bytes, read as LitData reads it (so that what passes here is what `optimize` takes)."""
    from litdata.utilities.format import _convert_bytes_to_int

    try:
        valid = _convert_bytes_to_int(text) >= 1
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; allowed: a number and a unit, e.g. 64MB, 512KB")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(
        prog="python -m arcface_lightning.pack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", type=Path, help="a folder of class folders, a CSV list of path,label rows, or an insightface folder"
    )
    parser.add_argument("output", type=Path, help="the packed set's folder (must not exist)")
    parser.add_argument("--test-root", type=Path, help="a separate test folder or list (else a split is held out)")
    parser.add_argument("--val-size", type=size, default=0.05, help="images (by_class: classes), or a fraction")
    parser.add_argument("--test-size", type=size, default=None, help="as --val-size (default: the same)")
    parser.add_argument("--val-split", choices=("by_sample", "by_class"), default="by_sample")
    parser.add_argument("--split-seed", type=count(0), default=0)
    parser.add_argument("--workers", type=count(1), default=min(8, os.cpu_count() or 1), help="packing processes")
    parser.add_argument("--chunk-bytes", type=chunk_size, default="64MB", help="LitData chunk size")
    args = parser.parse_args(argv)
    try:
        manifest = pack(
            args.source,
            args.output,
            test_root=args.test_root,
            val_size=args.val_size,
            test_size=args.test_size,
            val_split=args.val_split,
            split_seed=args.split_seed,
            workers=args.workers,
            chunk_bytes=args.chunk_bytes,
        )
    except (DataError, ValueError) as error:
        raise SystemExit(f"error: {own_names(first_line(error))}") from None
    except Interrupted as error:
        print(f"error: {error}; nothing written to {args.output}", file=sys.stderr)
        raise SystemExit(128 + error.signum) from None
    counts = ", ".join(f"{split} {n}" for split, n in manifest["samples"].items())
    print(f"packed {args.output}: {counts} images, {len(manifest['classes'])} classes; skipped {manifest['skipped']}")
    if manifest["skipped"]:
        print(f"unreadable images skipped: {args.output / 'skipped.txt'}", file=sys.stderr)


if __name__ == "__main__":
    main()
