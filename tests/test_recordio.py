"""insightface's RecordIO training sets read without MXNet (data/recordio.py), against files MXNet itself wrote
(tests/data/insightface/write_with_mxnet.py: real MNIST digits) and what MXNet read back from them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from arcface_lightning.core.checks import DataError
from arcface_lightning.data.recordio import MAGIC, RecordFile, RecordIndex, unpack

FIXTURES = Path(__file__).parent / "data" / "insightface"
RAW = Path(os.environ.get("ARCFACE_DATA_DIR", "/nonexistent")) / "MNIST" / "raw"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("folder", ["header", "plain"])
def test_every_record_reads_as_mxnet_read_it(folder: str) -> None:
    """Labels and image bytes of every key, exactly MXNet's, including a record the writer split in frames."""
    index = RecordIndex.read(FIXTURES / folder)
    rec = RecordFile(FIXTURES / folder / "train.rec")
    by_key = {item["key"]: item for item in EXPECTED[folder]}
    images = [by_key[key] for key in index.keys.tolist()]
    for key, offset, label, expected in zip(index.keys, index.offsets, index.labels, images, strict=True):
        labels, image = unpack(rec.record(int(offset)))
        assert labels.tolist() == expected["labels"], key
        assert hashlib.sha256(image).hexdigest() == expected["sha256"], key
        assert label == int(expected["labels"][0])
    assert (index.classes, index.height, index.width) == (10, 28, 28)


def test_the_header_record_bounds_the_images_and_a_set_without_it_is_every_key() -> None:
    header = RecordIndex.read(FIXTURES / "header")
    first_identity = int(EXPECTED["header"][0]["labels"][0])  # record 0, as MXNet read it
    assert header.keys.tolist() == list(range(1, first_identity))
    multi = [item for item in EXPECTED["header"][1:first_identity] if item["flag"] > 0]  # several float labels
    assert multi and all(len(item["labels"]) == item["flag"] == 2 for item in multi)
    plain = RecordIndex.read(FIXTURES / "plain")
    assert plain.keys.tolist() == [item["key"] for item in EXPECTED["plain"]]
    assert plain.labels.tolist() == header.labels.tolist()  # the same digits in both


def test_a_record_holding_the_magic_is_split_by_the_writer_and_joined_by_the_reader() -> None:
    data = (FIXTURES / "plain" / "train.rec").read_bytes()
    flags = []
    position = 0
    while position < len(data):
        magic, lrecord = struct.unpack_from("<II", data, position)
        assert magic == MAGIC
        flags.append(lrecord >> 29)
        position += 8 + ((lrecord & (2**29 - 1)) + 3) // 4 * 4
    assert {1, 3} <= set(flags)  # the fixture exercises the continuation frames


def damaged_magic(data: bytes, folder: Path) -> bytes:
    """The magic of the 6th record overwritten (record 0, the possible header, is read first and apart)."""
    offsets = [int(line.split("\t")[1]) for line in (folder / "train.idx").read_text().splitlines()]
    at = sorted(offsets)[5]
    return data[:at] + b"\xff" * 4 + data[at + 4 :]


def copy_of(folder: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / folder, tmp_path / folder))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "train.idx").unlink(), r"^data\.root=.* has no train\.idx; allowed: insightface's"),
        (lambda d: (d / "property").unlink(), r"^data\.root=.* has no property;"),
        (lambda d: (d / "property").write_text("ten,28,28\n"), r"property is invalid; allowed: one line"),
        (lambda d: (d / "train.rec").write_bytes(b"\0" * 8 + (d / "train.rec").read_bytes()[8:]),
         r"train\.rec has 0x00000000 at offset 0; allowed: the RecordIO magic 0xced7230a \(is train\.idx the index"),
        (lambda d: (d / "train.rec").write_bytes(damaged_magic((d / "train.rec").read_bytes(), d)),
         r"train\.rec has no record at offset \d+ \(bad magic or truncated\)$"),
        (lambda d: (d / "train.rec").write_bytes((d / "train.rec").read_bytes()[:3000]),
         r"past the end of train\.rec \(3000 bytes\)$"),
        (lambda d: (d / "train.idx").write_text((d / "train.idx").read_text() + "99\t123456789\n"),
         r"gives offset 123456789 for key 99, past the end of train\.rec"),
        (lambda d: (d / "property").write_text("3,28,28\n"), r"has label \d; allowed: 0 ≤ label < 3 \(property's"),
        (lambda d: (d / "train.idx").write_text("0\tzero\n"), r"train\.idx line 1 is '0\\tzero'; allowed"),
    ],
    ids=["no idx", "no property", "bad property", "bad magic", "bad magic later", "truncated",
         "offset past the end", "label ≥ classes",
         "bad idx line"],
)  # fmt: skip
def test_a_damaged_folder_is_one_line_before_any_training(damage, message: str, tmp_path: Path) -> None:
    folder = copy_of("plain", tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=message):
        RecordIndex.read(folder)


def test_a_record_cut_short_is_named_when_it_is_read(tmp_path: Path) -> None:
    folder = copy_of("plain", tmp_path)
    index = RecordIndex.read(folder)
    last = int(index.offsets.max())
    (folder / "train.rec").write_bytes((folder / "train.rec").read_bytes()[: last + 40])
    with pytest.raises(DataError, match=rf"ends inside the record at offset {last} \(truncated\?\)$"):
        RecordFile(folder / "train.rec").record(last)


def test_the_reader_crosses_into_loader_workers_without_its_handle() -> None:
    import pickle

    rec = RecordFile(FIXTURES / "plain" / "train.rec")
    rec.record(0)
    copy = pickle.loads(pickle.dumps(rec))
    assert copy._file is None and np.array_equal(unpack(copy.record(0))[0], unpack(rec.record(0))[0])


def test_data_insightface_trains_from_the_mxnet_folder(tmp_path: Path) -> None:
    """`data=insightface data.root=<folder>`: composed, indexed, split (by sample and by class), served as uint8
    batches (decoded per sample, or cached), trained; a folder without the files is one line before any work."""
    from arcface_lightning.core.runs import run
    from arcface_lightning.train import train
    from conftest import tiny_config

    common = ["data=insightface", "data.in_channels=1", "data.image_size=28", "data.num_workers=0",
              "data.val_size=4", "data.test_size=4", "trainer.fast_dev_run=1", "logger=csv"]  # fmt: skip
    root = f"data.root={FIXTURES / 'header'}"
    for number, extra in enumerate(
        ([], ["data.cache=memory"], ["data.val_split=by_class", "data.val_size=2", "data.test_size=2"])
    ):
        record = run(train, tiny_config(tmp_path, tmp_path / f"run{number}", *common, root, *extra))
        assert record["status"] == "ok", record
    folder = copy_of("plain", tmp_path)
    (folder / "train.idx").unlink()
    with pytest.raises(SystemExit, match=r"^error: data\.root=.*plain has no train\.idx; allowed: insightface"):
        run(train, tiny_config(tmp_path, tmp_path / "bad", *common, f"data.root={folder}"))


@pytest.mark.real_data
@pytest.mark.skipif(not (RAW / "train-images-idx3-ubyte").is_file(), reason="real MNIST is not under ARCFACE_DATA_DIR")
def test_png_records_decode_to_the_real_mnist_digits_mxnet_was_given() -> None:
    """The writer stored real MNIST training digits; its PNG records come back as exactly those pixels."""
    from arcface_lightning.data.sources.insightface import RecordImages

    mnist = np.frombuffer((RAW / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
    labels = np.frombuffer((RAW / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    order = np.argsort(labels[:200], kind="stable")[:: 200 // 30][:30]  # as write_with_mxnet.py chose them
    dataset = RecordImages(RecordIndex.read(FIXTURES / "header"), in_channels=1, image_size=28)
    for i in range(1, 30, 2):  # keys 2, 4, …: the PNG records (odd keys are JPEG, lossy)
        image, label = dataset[i]
        assert np.array_equal(image[0].numpy(), mnist[order[i]]) and label == labels[order[i]], i


def test_records_longer_than_one_read_are_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-ahead shorter than every record: each one takes the second read, and still comes back as MXNet's."""
    from arcface_lightning.data import recordio

    monkeypatch.setattr(recordio, "READ_AHEAD", 16)
    index = RecordIndex.read(FIXTURES / "plain")
    rec = RecordFile(FIXTURES / "plain" / "train.rec")
    by_key = {item["key"]: item["sha256"] for item in EXPECTED["plain"]}
    for key, offset in zip(index.keys.tolist(), index.offsets.tolist(), strict=True):
        assert hashlib.sha256(unpack(rec.record(offset))[1]).hexdigest() == by_key[key], key


def test_an_image_that_does_not_decode_is_named_by_its_record(tmp_path: Path) -> None:
    from arcface_lightning.data.recordio import FRAME, HEADER
    from arcface_lightning.data.sources.insightface import RecordImages

    folder = copy_of("plain", tmp_path)
    offsets = dict(line.split("\t") for line in (folder / "train.idx").read_text().splitlines())
    data = bytearray((folder / "train.rec").read_bytes())
    start = int(offsets["5"]) + FRAME.size + HEADER.size + 8  # past the frame, the image header, PNG's signature
    data[start : start + 64] = bytes(64)
    (folder / "train.rec").write_bytes(bytes(data))
    dataset = RecordImages(RecordIndex.read(folder), in_channels=1, image_size=28)
    assert dataset[4][1] == EXPECTED["plain"][4]["labels"][0]
    with pytest.raises(DataError, match=rf"^unreadable image {folder / 'train.rec'} key 5: "):
        dataset[5]
