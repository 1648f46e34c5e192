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
"""

import hashlib
import io
import json
import pickle
import struct
import sys
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


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
