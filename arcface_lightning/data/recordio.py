"""insightface's training sets as the field ships them (MS1MV2/3, Glint360K, WebFace: `train.rec`, `train.idx`,
`property`), read without MXNet. NumPy only: the framing is parsed here, the image bytes are decoded elsewhere.

The format, from dmlc-core's recordio.h and MXNet's recordio.py:
- `train.idx`: one `key<TAB>offset` line per record; the offset is where its frame starts in `train.rec`.
- a frame: the magic 0xCED7230A, then lrecord = cflag << 29 | length (little-endian uint32), `length` bytes of
  data, zero padding to a multiple of 4. cflag 0 is a whole record. When the data itself holds the magic, the writer
  splits it there into frames flagged 1 (first), 2 (middle), 3 (last), and the reader joins them with the magic put
  back between the parts.
- a record: MXNet's image header `IfQQ` (flag, label, id, id2; 24 bytes), then `flag` float32 labels when flag > 0
  (the header's own label is then unused; the class is the first of them), then the encoded image (JPEG or PNG).
- record 0 of insightface's sets is a header whose labels (a, b) say the images are keys 1 … a − 1 (keys a … b − 1
  are per-identity ranges, not images). A set written without it (flag 0 at key 0, or no key 0): every key.
- `property`: `classes,height,width`.

`RecordIndex.read` parses every image's header at once from a memory map (a few vectorised gathers, no Python loop
over millions of records), so only the keys, offsets and labels stay in memory; `RecordFile.record` reads one record
when a loader worker asks for it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arcface_lightning.core.checks import DataError

MAGIC = 0xCED7230A
FRAME = struct.Struct("<II")  # magic, lrecord
HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
LENGTH_BITS = 29
FILES = ("train.rec", "train.idx", "property")
READ_AHEAD = 1 << 14  # bytes per record read: an aligned 112×112 face's JPEG fits, an MNIST digit many times


def read_property(folder: Path, key: str = "data.root") -> tuple[int, int, int]:
    """(classes, height, width) from `property`, one line naming the problem otherwise (`key`: the config key
    that named the folder)."""
    path = folder / "property"
    parts = path.read_text().strip().split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts) or int(parts[0]) < 1:
        raise DataError(f"{key}: {path} is invalid; allowed: one line `classes,height,width` of positive integers")
    classes, height, width = (int(part) for part in parts)
    return classes, height, width


def read_idx(path: Path, key: str = "data.root") -> tuple[np.ndarray, np.ndarray]:
    """The keys and offsets of `train.idx`, in the file's order."""
    keys, offsets = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) != 2 or not fields[0].strip().isdigit() or not fields[1].strip().isdigit():
            raise DataError(f"{key}: {path} line {number} is {line[:60]!r}; allowed: `key<TAB>offset`")
        keys.append(int(fields[0]))
        offsets.append(int(fields[1]))
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class RecordFile:
    """`train.rec` opened for reading one record at a time (each loader worker opens its own descriptor)."""

    def __init__(self, path: Path, key: str = "data.root") -> None:
        self.path, self.key = Path(path), key
        self.size = self.path.stat().st_size
        self._file: int | None = None  # a descriptor read with pread: no shared file position, no Python buffer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # a descriptor does not cross into workers

    def record(self, offset: int) -> bytes:
        """The record whose first frame starts at `offset`, its parts joined as dmlc's reader joins them. One pread
        of READ_AHEAD bytes holds a typical record whole (frame header, image header and image), so a sample costs a
        single system call instead of two seeks and two reads."""
        if self._file is None:
            self._file = os.open(self.path, os.O_RDONLY)  # kept open for the worker's lifetime
        parts, position = [], int(offset)
        while True:
            chunk = os.pread(self._file, READ_AHEAD, position)
            if len(chunk) < FRAME.size:
                raise DataError(f"{self.key}: {self.path} ends inside the record at offset {offset} (truncated?)")
            magic, lrecord = FRAME.unpack_from(chunk)
            if magic != MAGIC:
                raise DataError(
                    f"{self.key}: {self.path} has {magic:#010x} at offset {position}; allowed: the RecordIO magic "
                    f"{MAGIC:#010x} (is train.idx the index of this train.rec?)"
                )
            flag, length = lrecord >> LENGTH_BITS, lrecord & ((1 << LENGTH_BITS) - 1)
            data = chunk[FRAME.size : FRAME.size + length]
            if len(data) < length:  # a record longer than the read-ahead: the rest in a second read
                data += os.pread(self._file, length - len(data), position + len(chunk))
            if len(data) < length:
                raise DataError(f"{self.key}: {self.path} ends inside the record at offset {offset} (truncated?)")
            parts.append(data)
            if flag in (0, 3):
                return MAGIC.to_bytes(4, "little").join(parts)
            position += FRAME.size + (length + 3) // 4 * 4

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None


def unpack(record: bytes) -> tuple[np.ndarray, bytes]:
    """(labels, image bytes) of one record: the float32 labels after the header when flag > 0, else its one label."""
    if len(record) < HEADER.size:
        raise DataError(f"a record of {len(record)} bytes is shorter than MXNet's {HEADER.size}-byte image header")
    flag, label, _, _ = HEADER.unpack_from(record)
    if flag == 0:
        return np.asarray([label], dtype=np.float32), record[HEADER.size :]
    end = HEADER.size + 4 * flag
    return np.frombuffer(record[HEADER.size : end], dtype="<f4").copy(), record[end:]


@dataclass
class RecordIndex:
    """The images of an insightface folder: their keys, where each record starts, and its class."""

    folder: Path
    keys: np.ndarray  # int64
    offsets: np.ndarray  # int64, into train.rec
    labels: np.ndarray  # int64 class ids
    classes: int
    height: int
    width: int
    key: str = "data.root"  # the config key that named the folder, for the errors of reading it

    @classmethod
    def read(cls, folder: str | Path, key: str = "data.root") -> RecordIndex:
        """Index the folder; every failure is one line naming `key` (the config key that named the folder), the file
        and what is wrong, before any training."""
        folder = Path(folder).expanduser()
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise DataError(f"{key}={folder} has no {', '.join(missing)}; allowed: insightface's train.rec, "
                            "train.idx and property")  # fmt: skip
        classes, height, width = read_property(folder, key)
        keys, offsets = read_idx(folder / "train.idx", key)
        rec = RecordFile(folder / "train.rec", key)
        where = dict(zip(keys.tolist(), range(len(keys)), strict=True))
        if 0 in where:  # insightface's header record: its labels bound the image keys
            labels, _ = unpack(rec.record(int(offsets[where[0]])))
            if len(labels) >= 2:
                first_identity = int(labels[0])
                wanted = np.arange(1, first_identity)
                absent = [int(k) for k in wanted if int(k) not in where]
                if absent:
                    raise DataError(f"{key}: {folder}/train.idx lacks image key {absent[0]} (record 0 says keys "
                                    f"1 … {first_identity - 1})")  # fmt: skip
                rows = np.asarray([where[int(k)] for k in wanted], dtype=np.int64)
                keys, offsets = keys[rows], offsets[rows]
        past = offsets + FRAME.size > rec.size
        if past.any():
            raise DataError(f"{key}: {folder}/train.idx gives offset {int(offsets[past][0])} for key "
                            f"{int(keys[past][0])}, past the end of train.rec ({rec.size} bytes)")  # fmt: skip
        labels = first_labels(rec, offsets)
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            raise DataError(f"{key}: {folder} key {int(keys[bad][0])} has label {int(labels[bad][0])}; allowed: "
                            f"0 ≤ label < {classes} (property's classes)")  # fmt: skip
        return cls(folder, keys, offsets, labels, classes, height, width, key)


def first_labels(rec: RecordFile, offsets: np.ndarray) -> np.ndarray:
    """Each record's class (its first label), parsed from a memory map of train.rec in a few vectorised gathers."""
    if not len(offsets):
        return np.zeros(0, dtype=np.int64)
    data = np.memmap(rec.path, dtype=np.uint8, mode="r")
    span = FRAME.size + HEADER.size + 4  # frame, header, and the first of the float labels when flag > 0
    ends = np.minimum(offsets[:, None] + np.arange(span), len(data) - 1)
    raw = np.asarray(data[ends]).copy()
    short = offsets + FRAME.size + HEADER.size > len(data)
    frames = raw[:, : FRAME.size].view("<u4")
    bad_magic = frames[:, 0] != MAGIC
    if bad_magic.any() or short.any():
        at = int(offsets[bad_magic | short][0])
        raise DataError(f"{rec.key}: {rec.path} has no record at offset {at} (bad magic or truncated)")
    whole = (frames[:, 1] >> LENGTH_BITS) == 0
    head = raw[:, FRAME.size :]
    flag = head[:, :4].copy().view("<u4")[:, 0]
    label = np.where(flag > 0, head[:, HEADER.size :].copy().view("<f4")[:, 0], head[:, 4:8].copy().view("<f4")[:, 0])
    out = label.astype(np.int64)
    for row in np.flatnonzero(~whole):  # a record split at a magic inside it: parsed whole (rare)
        out[row] = int(unpack(rec.record(int(offsets[row])))[0][0])
    return out
