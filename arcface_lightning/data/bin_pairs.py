"""insightface's `.bin` verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, cplfw.bin): a pickle of
(encoded images, same/different flags), the two images of pair k at 2k and 2k + 1.

A pickle can name any callable to run while it loads, so a `.bin` is read by `DataOnlyUnpickler`, which admits the
types pickle builds without importing anything (lists, tuples, bytes, str, bools, numbers, None) and refuses every
global: a crafted file is one line naming what it tried to import, and nothing in it runs. The sets the field ships
were written by Python 2, whose `str` images load as bytes with `encoding="bytes"` (as insightface reads them).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arcface_lightning.core.checks import DataError
from arcface_lightning.data.files import decode

FOLDS = 10  # the field's 10-fold protocol: contiguous tenths of the pairs, as in insightface's verification.py


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global: the unpickler stopped before importing or calling it."""


class DataOnlyUnpickler(pickle.Unpickler):
    """Loads plain data only: every global (class, function) a pickle names is refused."""

    def find_class(self, module: str, name: str) -> object:
        raise RefusedGlobal(f"it names {module}.{name}")


@dataclass
class BinPairs:
    """Pairs of a `.bin`: pair k is images[2k] and images[2k + 1] (encoded bytes), same[k], fold[k]."""

    name: str
    images: list[bytes]
    same: np.ndarray  # bool
    fold: np.ndarray  # int64, 0 … FOLDS − 1

    def decoded(self, in_channels: int, image_size: int) -> np.ndarray:
        """Every image as uint8 (2P, in_channels, image_size, image_size): the same decoding, resize and centre
        crop as a user's image files, so the model sees what training showed it."""
        out = np.empty((len(self.images), in_channels, image_size, image_size), dtype=np.uint8)
        for i, data in enumerate(self.images):
            out[i] = decode(data, in_channels, image_size, f"{self.name} image {i}")
        return out


def read_bin(path: str | Path, key: str = "evaluation.pairs") -> BinPairs:
    """The pairs of a `.bin`, checked: one line naming `key`, the file and the problem otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{key}={path} is not a file; allowed: insightface's .bin, a CSV of pairs or LFW's pairs.txt")
    try:
        with open(path, "rb") as f:
            loaded = DataOnlyUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except RefusedGlobal as error:
        raise DataError(f"{key}={path} is refused: {error}; allowed: a .bin of plain data (lists of bytes and "
                        "bools), and nothing in it ran") from None  # fmt: skip
    except Exception as error:  # truncated or not a pickle at all: EOFError, ValueError, ...
        raise DataError(f"{key}={path} is not a readable .bin: {type(error).__name__}: {error}") from None
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise DataError(f"{key}={path} holds {type(loaded).__name__}; allowed: (images, same flags)")
    images, flags = loaded
    if not isinstance(images, (list, tuple)) or not all(isinstance(image, bytes) for image in images):
        raise DataError(f"{key}={path}: its images are not all encoded bytes")
    if not isinstance(flags, (list, tuple)) or not all(isinstance(flag, (bool, int)) for flag in flags):
        raise DataError(f"{key}={path}: its same/different flags are not all bools")
    if not flags or len(images) != 2 * len(flags):
        raise DataError(f"{key}={path} has {len(images)} images for {len(flags)} pairs; allowed: two per pair")
    pairs = len(flags)
    return BinPairs(
        path.stem,
        list(images),
        np.asarray([bool(flag) for flag in flags]),
        np.arange(pairs, dtype=np.int64) * FOLDS // pairs,
    )
