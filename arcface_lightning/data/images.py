"""Your own images as datasets: a folder per class or a CSV list (files.py finds and decodes them), each file checked
once before training, then served as uint8 (C, H, W) tensors decoded in the DataLoader's workers.

- `load(source, where, ...)`: the folder or list indexed (files.scan_folder / files.read_list), every file decoded
  once (in `workers` loader processes) before the split is drawn, so training, evaluation and `pack` index the same
  readable files and draw the same split. A file that does not decode is skipped and listed once in the log; a
  class left with no readable image gets no class id. A file that breaks after that check is named in one line
  when the loader reads it.
- `ImageFiles`: the indexed files as a map-style dataset, converted to `in_channels` and resized (shorter side) then
  centre-cropped to `image_size` (files.read_image). Normalisation and augmentation happen later, batched on the
  training device, as for every other source (pipelines.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from arcface_lightning.core.checks import DataError
from arcface_lightning.data.files import SOURCES, ImageIndex, match_classes, pixels, read_bytes, read_image

log = logging.getLogger(__name__)


class Probe(Dataset):
    """Each indexed file decoded once, for its outcome only: "" if it decodes, else the one line saying why not."""

    def __init__(self, paths: list[str], in_channels: int) -> None:
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        path = os.fsdecode(self.paths[i])
        try:
            pixels(read_bytes(path), self.in_channels, path)
        except DataError as error:
            return str(error)
        return ""


def readable(index: ImageIndex, in_channels: int, workers: int, renumber: bool) -> ImageIndex:
    """The index without the files that do not decode (each file decoded once, in `workers` loader processes);
    they are listed in `skipped`. `renumber`: class ids over the classes that still have images (a training pool);
    else the ids are kept (a test set with the training pool's ids)."""
    probe = Probe(index.paths, in_channels)
    # its own generator: a loader draws its workers' base seed from the global one, which seeds the model
    loader = DataLoader(probe, batch_size=64, num_workers=workers, collate_fn=list, generator=torch.Generator())
    outcomes = [outcome for batch in loader for outcome in batch]
    bad = [i for i, outcome in enumerate(outcomes) if outcome]
    if not bad:
        return index
    drop = set(bad)
    kept = [i for i in range(len(index.paths)) if i not in drop]
    labels, classes = [index.labels[i] for i in kept], list(index.classes)
    notes = [*index.notes, f"{len(bad)} image(s) that cannot be decoded skipped (first: {index.paths[bad[0]]})"]
    if renumber and len(used := sorted(set(labels))) < len(classes):
        emptied = [name for c, name in enumerate(classes) if c not in used]
        notes.append(f"{len(emptied)} class(es) with no readable image skipped (first: {emptied[0]})")
        ids = {old: new for new, old in enumerate(used)}
        labels, classes = [ids[label] for label in labels], [classes[c] for c in used]
    skipped = [(index.paths[i], outcomes[i]) for i in bad]
    return ImageIndex([index.paths[i] for i in kept], labels, classes, notes, [*index.skipped, *skipped])


def load(
    source: str,
    where: Path,
    key: str,
    in_channels: int,
    image_size: int,
    classes: list[str] | None = None,
    workers: int = 0,
) -> ImageFiles:
    """A folder or a CSV list (`source`: image_folder or image_list) as ImageFiles, what was skipped logged once.
    `classes`: give the samples these class ids, matched by name (a test set of the training classes). Every file
    is decoded once here, in `workers` loader processes; those that do not decode are skipped and listed."""
    index = SOURCES[source](where, key)
    if classes is not None:
        index = match_classes(index, classes, str(where))
    index = readable(index, in_channels, workers, renumber=classes is None)
    if not index.paths:
        raise DataError(f"{key}={where} has no image that can be decoded ({index.skipped[0][1]})")
    for note in index.notes:
        log.warning("%s: %s", where, note)
    for _, why in index.skipped:
        log.warning("skipped: %s", why)
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
        self.skipped = list(index.skipped)  # the files left out because they do not decode (pack lists them)
        self.in_channels, self.image_size = in_channels, image_size
        self.target_transform = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(read_image(os.fsdecode(self.paths[i]), self.in_channels, self.image_size))
        label = int(self.targets[i])
        return image, self.target_transform(label) if self.target_transform is not None else label
