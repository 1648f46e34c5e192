"""torchvision's MNIST-format sets and CIFAR10 (`data.dataset=MNIST|FashionMNIST|KMNIST|CIFAR10`): files under
`data.data_dir` in torchvision's own layout, downloaded when missing, each read through torchvision's class, with a
one-line diagnosis when the files or the config do not fit. The official training set is the pool; the official
test set is the test set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets

from arcface_lightning.core.checks import DataError, first_line
from arcface_lightning.data.pipelines import sample_transform
from arcface_lightning.data.sources.base import Source

DATASETS: dict[str, type[datasets.VisionDataset]] = {
    "MNIST": datasets.MNIST,
    "FashionMNIST": datasets.FashionMNIST,
    "KMNIST": datasets.KMNIST,
    "CIFAR10": datasets.CIFAR10,
}


class TorchvisionSet(Source):
    """One of DATASETS, by `data.dataset`."""

    per_sample_pipeline = True  # PIL images: the torchvision pipeline's per-sample transforms apply

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.data_dir = Path(settings.data_dir).expanduser()

    @property
    def folder(self) -> Path:
        return folder(self.data_dir, self.settings.dataset)

    @property
    def has_test_set(self) -> bool:
        return True

    def prepare(self) -> None:
        if self.settings.download:
            download(self.settings.dataset, self.data_dir)

    def load(self, train: bool) -> Dataset:
        """Checked against the config; read one by one, a sample is a tensor (ToTensor, Normalize): the torchvision
        pipeline's evaluation transform. The tensor pipeline reads the decoded arrays instead (tensors.py)."""
        hp = self.settings
        shape = (hp.in_channels, hp.image_size, hp.image_size)
        num_classes = hp.num_classes if hp.train_classes is None else None  # all classes used: their count checked
        dataset = load(hp.dataset, self.data_dir, train, shape, num_classes)
        dataset.transform = sample_transform(hp, train=False)
        return dataset


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
