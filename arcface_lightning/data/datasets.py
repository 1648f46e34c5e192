"""The data sets: torchvision's registry, where their files live, download, loading with a diagnosis, class splits.

Everything here answers "which samples, with which labels?" and says in one line what is wrong when the files or
the config do not fit. How the samples become batches is datamodule.py's job.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from arcface_lightning.core.checks import DataError, first_line
from arcface_lightning.data.tensors import targets

DATASETS: dict[str, type[datasets.VisionDataset]] = {
    "MNIST": datasets.MNIST,
    "FashionMNIST": datasets.FashionMNIST,
    "KMNIST": datasets.KMNIST,
    "CIFAR10": datasets.CIFAR10,
}


def folder(root: Path, name: str) -> Path:
    """Where torchvision keeps a set's files under `root` (MNIST-format sets: <root>/<Name>/raw)."""
    cls = DATASETS[name]
    if issubclass(cls, datasets.CIFAR10):
        return root / cls.base_folder
    return root / cls.__name__ / "raw"


def download(name: str, root: Path) -> None:
    """Fetch both splits of a set into `root` (torchvision skips files that are already there and intact)."""
    for train in (True, False):
        try:
            DATASETS[name](str(root), train=train, download=True)
        except Exception as error:  # network errors come as URLError, HTTPError, OSError or RuntimeError
            raise DataError(
                f"could not download {name} into {folder(root, name)}: {first_line(error)}. "
                f"Without network, copy the files there and set data.download=false, "
                f"or set paths.data_dir=<folder that has them>"
            ) from error


def load(name: str, root: Path, train: bool, shape: tuple[int, int, int], num_classes: int | None) -> Dataset:
    """One split of a set, checked against the config: its files readable, its images (C, H, W) == `shape`, and
    (when `num_classes` is given, i.e. all classes are used) its class count. One line says what is wrong."""
    split, where = "train" if train else "test", folder(root, name)
    try:
        dataset = DATASETS[name](str(root), train=train, download=False)
        image, _ = dataset[0]  # a PIL image: decodes one sample, so unreadable files fail here
    except Exception as error:
        message = str(error)  # torchvision: "Dataset not found[ or corrupted]. You can use download=True ..."
        if "not found" in message:
            state = "not found or corrupt" if "corrupt" in message else "not found"
            fix = f"set paths.data_dir=<folder that holds {where.relative_to(root)}> or data.download=true"
        else:
            state = f"unreadable ({first_line(error)})"
            fix = "delete those files and set data.download=true, or set paths.data_dir=<folder with good copies>"
        raise DataError(f"{name} {split} set {state} in {where}; {fix}") from error
    if num_classes is not None and len(dataset.classes) != num_classes:
        raise DataError(f"data.num_classes={num_classes} but {name} has {len(dataset.classes)}")
    found = (len(image.getbands()), image.height, image.width)
    if found != shape:
        raise DataError(f"{name} images are {found} but the data config says {shape} (in_channels, image_size)")
    return dataset


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
