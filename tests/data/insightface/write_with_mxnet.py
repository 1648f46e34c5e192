"""Writes the insightface-format fixtures of tests/test_recordio.py with MXNet's own RecordIO writer (the reference
tool), from real MNIST digits, and records what MXNet reads back (expected.json). Not a project dependency: run it in
a side environment, from the repository root:

    python3 -m venv /tmp/mxvenv && /tmp/mxvenv/bin/pip install "mxnet==1.9.1" "numpy<1.24" pillow
    /tmp/mxvenv/bin/python tests/data/insightface/write_with_mxnet.py <MNIST raw folder> tests/data/insightface

Folders written (a few dozen 28×28 digits each):
- header/: insightface's layout: record 0 a header whose labels (a, b) bound the image keys 1 … a − 1, then one
  record per identity (keys a … b − 1, labels = that identity's image key range); JPEG (quality 95) and PNG images;
  some image headers carry several float labels (flag > 0: the class is the first).
- plain/: no header record: keys 0 … n − 1, one label each; one PNG holds the RecordIO magic in a text chunk, so the
  writer splits that record into several frames.
- mnist_pairs.bin: insightface's verification format, a pickle of (encoded images, same/different flags), pairs
  consecutive.

With --mnist it writes instead all of MNIST as two insightface folders OUTSIDE the repository (real data for
tests/test_real_data.py-style runs and benchmarks/recordio_read.py, never committed):

    /work/mxvenv/bin/python tests/data/insightface/write_with_mxnet.py <MNIST raw folder> /tmp/mnist_rec --mnist

- <out>/train: the 60,000 training digits in MNIST's order (keys 1 … 60,000, so data=insightface draws the same
  validation split as data=mnist), record 0 the header whose labels (60,001, 60,001) bound them (no identity
  records: MNIST's classes are not contiguous); JPEG quality 95; property `10,28,28`.
- <out>/test: the 10,000 test digits the same way (data.test_root=<out>/test: data=mnist's test set).
--limit N keeps the first N of each split; --repeat K writes the (limited) training digits K times over (keys
continue; benchmarks' memory check at K× the set size).
"""

import argparse
import hashlib
import io
import json
import pickle
import struct
from pathlib import Path

import mxnet as mx
import numpy as np
from PIL import Image, PngImagePlugin

MAGIC = struct.pack("<I", 0xCED7230A)


def mnist(raw: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.frombuffer((raw / f"{split}-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
    labels = np.frombuffer((raw / f"{split}-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    return images, labels


def encode(image: np.ndarray, kind: str, text: str | None = None) -> bytes:
    out = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(image).save(out, format="JPEG", quality=95)
    else:
        info = PngImagePlugin.PngInfo()
        if text is not None:
            info.add_text("note", text)
        Image.fromarray(image).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def read_back(folder: Path) -> list[dict]:
    """Every key as MXNet reads it: its labels and the sha256 of its image bytes."""
    rec = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "r")
    records = []
    for key in sorted(rec.keys):
        header, payload = mx.recordio.unpack(rec.read_idx(key))
        labels = np.atleast_1d(np.asarray(header.label, dtype=np.float32)).tolist()
        records.append(
            {
                "key": int(key),
                "flag": int(header.flag),
                "labels": labels,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "bytes": len(payload),
            }
        )
    rec.close()
    return records


def write(folder: Path, records: list[tuple[int, mx.recordio.IRHeader, bytes]], classes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rec = mx.recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    for key, header, payload in records:
        rec.write_idx(key, mx.recordio.pack(header, payload))
    rec.close()
    (folder / "property").write_text(f"{classes},28,28\n")


def main(raw: Path, out: Path) -> None:
    images, labels = mnist(raw, "train")
    n = 30
    order = np.argsort(labels[:200], kind="stable")[:: 200 // n][:n]  # digits of every class, sorted by class
    digits, classes = images[order], labels[order].astype(int)
    # header/: keys 1 … n are images, n + 1 … n + 10 the identities' key ranges, record 0 the bounds
    records, first_key = [], {}
    for i, (image, label) in enumerate(zip(digits, classes, strict=True), 1):
        payload = encode(image, "jpeg" if i % 2 else "png")
        first_key.setdefault(label, i)
        header = (
            mx.recordio.IRHeader(2, [float(label), 7.0], i, 0)
            if i % 5 == 0
            else mx.recordio.IRHeader(0, float(label), i, 0)
        )
        records.append((i, header, payload))
    identities = sorted(first_key)
    for j, label in enumerate(identities):
        end = first_key[identities[j + 1]] if j + 1 < len(identities) else n + 1
        records.append((n + 1 + j, mx.recordio.IRHeader(2, [float(first_key[label]), float(end)], 0, 0), b""))
    bounds = mx.recordio.IRHeader(2, [float(n + 1), float(n + 1 + len(identities))], 0, 0)
    write(out / "header", [(0, bounds, b""), *records], classes=10)
    # plain/: keys 0 … n − 1, one of them split by the writer at the magic inside it
    # the writer splits only at a magic on a 4-byte boundary of the packed record (its 24-byte header included)
    magic_text = next(
        text
        for text in ("x" * k + MAGIC.decode("latin-1") for k in range(4))
        if (24 + encode(digits[3], "png", text=text).find(MAGIC)) % 4 == 0
    )
    plain = [
        (i, mx.recordio.IRHeader(0, float(label), i, 0), encode(image, "png", text=magic_text if i == 3 else None))
        for i, (image, label) in enumerate(zip(digits, classes, strict=True))
    ]
    assert MAGIC in plain[3][2]
    write(out / "plain", plain, classes=10)
    # mnist_pairs.bin: 8 pairs of test digits, same class for even pairs
    test_images, test_labels = mnist(raw, "t10k")
    bins, issame = [], []
    for p in range(8):
        a = p
        b = next(j for j in range(a + 1, 1000) if (test_labels[j] == test_labels[a]) == (p % 2 == 0))
        bins += [encode(test_images[a], "png"), encode(test_images[b], "jpeg")]
        issame.append(p % 2 == 0)
    with open(out / "mnist_pairs.bin", "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    expected = {
        "header": read_back(out / "header"),
        "plain": read_back(out / "plain"),
        "mxnet": mx.__version__,
        "pairs": {"issame": issame, "sha256": [hashlib.sha256(b).hexdigest() for b in bins]},
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def write_mnist(raw: Path, out: Path, limit: int | None, repeat: int) -> None:
    """All of MNIST (or its first `limit` digits per split) as insightface folders train/ and test/."""
    if out.exists():
        raise SystemExit(f"{out} exists; give a new folder")
    for split, folder, times in (("train", "train", repeat), ("t10k", "test", 1)):
        images, labels = mnist(raw, split)
        images, labels = images[:limit], labels[:limit]
        n = len(images) * times
        records = [(0, mx.recordio.IRHeader(2, [float(n + 1), float(n + 1)], 0, 0), b"")]
        for key in range(1, n + 1):
            image, label = images[(key - 1) % len(images)], labels[(key - 1) % len(images)]
            records.append((key, mx.recordio.IRHeader(0, float(label), key, 0), encode(image, "jpeg")))
        write(out / folder, records, classes=10)
        print(f"{out / folder}: {n} digits, JPEG quality 95, written by mxnet {mx.__version__}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path, help="MNIST's raw folder (the idx files)")
    parser.add_argument("out", type=Path, help="where to write")
    parser.add_argument("--mnist", action="store_true", help="all of MNIST as train/ and test/ insightface folders")
    parser.add_argument("--limit", type=int, default=None, help="--mnist: the first N digits of each split")
    parser.add_argument("--repeat", type=int, default=1, help="--mnist: the training digits K times over")
    args = parser.parse_args()
    if args.mnist:
        write_mnist(args.raw, args.out, args.limit, args.repeat)
    else:
        main(args.raw, args.out)
