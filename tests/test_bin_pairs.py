"""insightface's `.bin` verification sets: read as data only (a crafted pickle runs nothing), checked, decoded."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from arcface_lightning.core.checks import DataError
from arcface_lightning.data.bin_pairs import FOLDS, read_bin
from arcface_lightning.data.files import decode

FIXTURES = Path(__file__).parent / "data" / "insightface"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["pairs"]


def test_a_bin_reads_as_written() -> None:
    pairs = read_bin(FIXTURES / "mnist_pairs.bin")
    assert pairs.name == "mnist_pairs"
    assert pairs.same.tolist() == EXPECTED["issame"]
    assert [hashlib.sha256(image).hexdigest() for image in pairs.images] == EXPECTED["sha256"]
    assert pairs.fold.tolist() == [k * FOLDS // 8 for k in range(8)]
    decoded = pairs.decoded(in_channels=1, image_size=28)
    assert decoded.shape == (16, 1, 28, 28) and decoded.dtype == np.uint8
    assert np.array_equal(decoded[1], decode(pairs.images[1], 1, 28, "a JPEG"))  # the same path as image files
    assert pairs.decoded(in_channels=3, image_size=14).shape == (16, 3, 14, 14)


def test_a_python2_bin_loads_its_images_as_bytes(tmp_path: Path) -> None:
    """The field's .bin files were written by Python 2, whose str pickles as a STRING opcode (protocol 0)."""
    images = [b"\x89PNG fake", b"\xff\xd8 fake"]
    text = b"((lp0\nS'" + images[0].decode("latin-1").encode("unicode_escape") + b"'\np1\na"
    text += b"S'" + images[1].decode("latin-1").encode("unicode_escape") + b"'\np2\na(lp3\nI01\natp4\n."
    path = tmp_path / "py2.bin"
    path.write_bytes(text)
    pairs = read_bin(path)
    assert pairs.images == images and pairs.same.tolist() == [True]


class RunsCode:
    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.target),))

    def __init__(self, target: Path) -> None:
        self.target = str(target)


def test_a_crafted_bin_that_would_run_code_is_refused_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True], RunsCode(marker))))
    with pytest.raises(DataError, match=r"^evaluation\.pairs=.*lfw\.bin is refused: it names pathlib\.Path\.touch; "
                                        r"allowed: a \.bin of plain data .* nothing in it ran$"):  # fmt: skip
        read_bin(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # the control: an ordinary unpickler would have run it
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (([b"a", b"b", b"c"], [True]), r"has 3 images for 1 pairs; allowed: two per pair$"),
        (([b"a", "b"], [True]), r"its images are not all encoded bytes$"),
        (([b"a", b"b"], ["yes"]), r"its same/different flags are not all bools$"),
        ({"images": []}, r"holds dict; allowed: \(images, same flags\)$"),
        (([], []), r"has 0 images for 0 pairs"),
    ],
    ids=["lengths disagree", "not bytes", "not bools", "not a pair", "empty"],
)
def test_a_malformed_bin_is_one_line(content: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "set.bin"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=r"^evaluation\.pairs=.*set\.bin" + ".*" + message):
        read_bin(path)


def test_a_truncated_bin_and_images_that_do_not_decode_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    path.write_bytes((FIXTURES / "mnist_pairs.bin").read_bytes()[:500])
    with pytest.raises(DataError, match=r"^evaluation\.pairs=.*cut\.bin is not a readable \.bin: "):
        read_bin(path)
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(([b"\x89PNG\r\n\x1a\n broken", b"nothing"], [False])))
    with pytest.raises(DataError, match=r"^unreadable image bad image 0: "):
        read_bin(path).decoded(1, 28)
    with pytest.raises(DataError, match=r"^evaluation\.pairs=.*missing\.bin is not a file"):
        read_bin(tmp_path / "missing.bin")
