"""Your own images: a folder per class, or a CSV list of `path,label` rows, decoded with torchvision.io.

- `scan_folder(root)`: torchvision's ImageFolder layout, `<root>/<class>/**/<image>`. Class ids follow the sorted
  class-folder names; files are read in sorted order, so the same folder always gives the same ids and samples.
- `read_list(file)`: rows `path,label` (an optional `path,label` header), paths relative to the list's folder,
  integer labels. Class ids follow the sorted distinct labels (labels 0..K-1 keep their values).
- `ImageFiles`: the indexed files as a map-style dataset of uint8 (C, H, W) tensors, decoded in the DataLoader's
  workers by `torchvision.io.decode_image` (no PIL), converted to `in_channels` (grayscale or RGB) and resized
  (shorter side) then centre-cropped to `image_size`. Normalisation and augmentation happen later, batched on the
  training device, as for every other source (datamodule.py).

What is wrong with the data is said in one line (`DataError`) or, where skipping is the sensible thing, counted
and reported once in the log:
- a missing root, a root with no class folders or no images, a list row without two fields, a label that is not an
  integer, a list naming a missing file: an error, before any training;
- a class folder with no images: skipped (no class id), reported; files that are not images (by suffix): ignored,
  counted in the same report;
- an image that cannot be decoded: an error naming the file when it is read (at setup with `data.cache=memory`,
  in the loader otherwise); `python -m arcface_lightning.pack` skips and lists such files instead.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

from arcface_lightning.checks import first_line
from arcface_lightning.data.datasets import DataError

log = logging.getLogger(__name__)

# what torchvision.io.decode_image reads; any other file in a class folder is not an image
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp"})


@dataclass
class ImageIndex:
    """Which files, with which class ids; `classes[i]` is the name of class id i."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # what was skipped or ignored, for the log


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def scan_folder(root: Path, key: str = "data.root") -> ImageIndex:
    """Index `<root>/<class>/**/<image>`: classes in sorted name order, files in sorted path order."""
    if not root.is_dir():
        raise DataError(f"{key}={root} is not a folder; give a folder with one sub-folder of images per class")
    class_dirs = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not class_dirs:
        raise DataError(f"{key}={root} has no class sub-folders; expected {root}/<class>/<images> (ImageFolder)")
    paths: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    empty: list[str] = []
    ignored = 0
    for name in class_dirs:
        found = []
        for folder, _, files in os.walk(root / name, followlinks=True):
            images = [f for f in files if is_image(f)]
            ignored += len(files) - len(images)
            found += [os.path.join(folder, f) for f in images]
        if not found:
            empty.append(name)
            continue
        paths += sorted(found)
        labels += [len(classes)] * len(found)
        classes.append(name)
    if not classes:
        raise DataError(f"{key}={root} has no images in its class folders (read: {', '.join(sorted(IMAGE_SUFFIXES))})")
    notes = []
    if empty:
        notes.append(f"{len(empty)} class folder(s) with no images skipped (first: {empty[0]})")
    if ignored:
        notes.append(f"{ignored} file(s) that are not images ignored")
    return ImageIndex(paths, labels, classes, notes)


def read_list(path: Path, key: str = "data.root") -> ImageIndex:
    """Index a CSV list of `path,label` rows; paths relative to the list's folder, labels integers."""
    if not path.is_file():
        raise DataError(f"{key}={path} is not a file; give a CSV list of path,label rows")
    base = path.parent
    rows: list[tuple[str, int]] = []
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or (line == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{line}: expected path,label, got {len(row)} field(s): {','.join(row)!r}")
            try:
                label = int(row[1])
            except ValueError:
                raise DataError(f"{path}:{line}: label {row[1]!r} is not an integer") from None
            rows.append((os.path.join(base, row[0].strip()), label))
    if not rows:
        raise DataError(f"{key}={path} lists no images")
    missing = [p for p, _ in rows if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{key}={path} names {len(missing)} missing file(s), the first {missing[0]}")
    distinct = sorted({label for _, label in rows})
    ids = {label: i for i, label in enumerate(distinct)}
    return ImageIndex([p for p, _ in rows], [ids[label] for _, label in rows], [str(label) for label in distinct])


# data.dataset → the reader of data.root: a folder of class folders, or a CSV list
SOURCES = {"image_folder": scan_folder, "image_list": read_list}


def match_classes(index: ImageIndex, classes: list[str], where: str) -> ImageIndex:
    """A test set's index with the training pool's class ids, matched by class name."""
    ids = {name: i for i, name in enumerate(classes)}
    if unknown := [name for name in index.classes if name not in ids]:
        raise DataError(
            f"data.test_root={where} has {len(unknown)} class(es) the training data lacks (first: {unknown[0]}); "
            "a closed-set test needs the same classes"
        )
    labels = [ids[index.classes[label]] for label in index.labels]
    return ImageIndex(index.paths, labels, list(classes), index.notes)


def io_message(error: BaseException) -> str:
    """torchvision.io's error without the C++ source location it starts with (`decode_image, <file>.cpp:37, `)."""
    return re.sub(r"^\w+, \S+\.cpp:\d+, ", "", first_line(error))


def read_image(path: str, in_channels: int, image_size: int) -> torch.Tensor:
    """One file → uint8 (in_channels, image_size, image_size): decoded, converted, resized, centre-cropped."""
    try:
        data = read_file(path)
    except Exception as error:
        if not os.path.isfile(path):
            raise DataError(f"no such image file: {path}") from None
        raise DataError(f"unreadable image {path}: {io_message(error)}") from error
    return decode(data, in_channels, image_size, path)


def decode(data: torch.Tensor, in_channels: int, image_size: int, name: str) -> torch.Tensor:
    """Encoded image bytes (uint8 1-D) → uint8 (in_channels, image_size, image_size). `name` is for the error."""
    mode = ImageReadMode.GRAY if in_channels == 1 else ImageReadMode.RGB
    try:
        image = decode_image(data, mode=mode)
    except Exception as error:  # torchvision raises RuntimeError for corrupt data
        raise DataError(f"unreadable image {name}: {io_message(error)}") from error
    if image.ndim == 4:  # an animated GIF: its first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNGs
        image = TF.to_dtype(image, torch.uint8, scale=True)
    if image.shape[-2:] != (image_size, image_size):
        image = TF.center_crop(TF.resize(image, image_size, antialias=True), [image_size, image_size])
    return image


def load(
    source: str, where: Path, key: str, in_channels: int, image_size: int, classes: list[str] | None = None
) -> ImageFiles:
    """A folder or a CSV list (`source`: image_folder or image_list) as ImageFiles, what was skipped logged once.
    `classes`: give the samples these class ids, matched by name (a test set of the training classes)."""
    index = SOURCES[source](where, key)
    if classes is not None:
        index = match_classes(index, classes, str(where))
    for note in index.notes:
        log.warning("%s: %s", where, note)
    return ImageFiles(index, in_channels, image_size)


class ImageFiles(Dataset):
    """Indexed image files as (uint8 (C, H, W), label) samples.

    Paths are kept as one NumPy bytes array rather than a list of str: DataLoader workers forked from this process
    then share its pages instead of copying them as Python objects' reference counts change (a large index would
    otherwise be copied into every worker). `targets`, `classes` and `target_transform` follow torchvision's
    dataset attributes, so the class selection and label checks of datasets.py work unchanged.
    """

    def __init__(self, index: ImageIndex, in_channels: int, image_size: int) -> None:
        self.paths = np.array([os.fsencode(p) for p in index.paths])
        self.targets = torch.as_tensor(index.labels, dtype=torch.long)
        self.classes = list(index.classes)
        self.in_channels, self.image_size = in_channels, image_size
        self.target_transform = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = read_image(os.fsdecode(self.paths[i]), self.in_channels, self.image_size)
        label = int(self.targets[i])
        return image, self.target_transform(label) if self.target_transform is not None else label
