"""What every source's datasets share: their labels checked, some classes selected (and relabelled for the head),
the open-set class lists checked, a per-sample transform swapped. Each works on any dataset with torchvision's
attributes (`targets`, `classes`, `target_transform`) or nested Subsets of one; each error is one line.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from arcface_lightning.core.checks import DataError
from arcface_lightning.data.tensors import targets


def check_labels(dataset: Dataset, num_classes: int, what: str) -> None:
    """Every label in [0, num_classes), checked once when the data is set up: the heads skip that check on
    accelerators, where it would cost a device synchronisation per step (heads.py)."""
    labels = targets(dataset)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise DataError(f"{what} has label {bad[0].item()}; allowed: 0 ≤ label < data.num_classes={num_classes}")


def select_classes(dataset: Dataset, classes: list[int] | None, name: str, relabel: bool = True) -> Dataset:
    """The samples of `classes` only; with relabel, their labels become 0..len(classes)-1 (the head's)."""
    if classes is None:
        return dataset
    known = len(dataset.classes)
    if bad := [c for c in classes if not 0 <= c < known]:
        raise DataError(f"class {bad[0]} is not in {name} (classes 0..{known - 1})")
    labels = torch.as_tensor(dataset.targets)
    if relabel:  # on a shallow copy (the decoded arrays are shared): the open set keeps the original labels
        dataset = copy.copy(dataset)
        dataset.target_transform = Relabel(classes)
    return Subset(dataset, torch.nonzero(torch.isin(labels, torch.tensor(classes))).squeeze(1).tolist())


class Relabel:
    """Maps the kept classes' ids to 0..len(classes)-1, as a picklable target_transform (for loader workers)."""

    def __init__(self, classes: list[int]) -> None:
        self.index = {c: i for i, c in enumerate(classes)}

    def __call__(self, target: int) -> int:
        return self.index[int(target)]


def check_class_split(train_classes: list[int] | None, open_classes: list[int] | None, num_classes: int | None) -> None:
    """Open-set protocol: train on some classes, evaluate retrieval on others, never both."""
    for name, classes in (("train_classes", train_classes), ("open_classes", open_classes)):
        if classes is not None and (len(classes) == 0 or len(set(classes)) != len(classes)):
            raise ValueError(f"data.{name}={list(classes)} must be a non-empty list of distinct class ids")
    if open_classes and train_classes is None:
        raise ValueError("data.open_classes needs data.train_classes (the classes the model may see)")
    if train_classes is not None and num_classes is not None and len(train_classes) != num_classes:
        raise ValueError(f"data.num_classes={num_classes} but data.train_classes has {len(train_classes)} classes")
    if shared := sorted(set(train_classes or ()) & set(open_classes or ())):
        raise ValueError(f"data.train_classes and data.open_classes share {shared}; open classes must be unseen")


def with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """The same samples with another per-sample transform (a shallow copy: the decoded arrays are shared)."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    clone = copy.copy(dataset)
    clone.transform = transform
    return clone
