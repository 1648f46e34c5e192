"""Data: torchvision's MNIST-format sets and CIFAR as a LightningDataModule with a fixed validation split.

The official training set is split into train/validation with a seeded generator (MNIST: 55,000/5,000), so model
selection never sees the test set; the official test set is used once, at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, random_split
from torchvision import datasets, transforms

DATASETS: dict[str, type[datasets.VisionDataset]] = {
    "MNIST": datasets.MNIST,
    "FashionMNIST": datasets.FashionMNIST,
    "KMNIST": datasets.KMNIST,
    "CIFAR10": datasets.CIFAR10,
}


class DataError(RuntimeError):
    """Data missing, unreadable or inconsistent with the config: the message says where and how to fix it."""


class ImageDataModule(L.LightningDataModule):
    """Serves (images, labels) batches of one torchvision dataset: train / validation split / official test."""

    def __init__(
        self,
        dataset: str = "MNIST",
        data_dir: str = "data",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        shuffle_seed: int | None = 0,
        train_classes: list[int] | None = None,
        open_classes: list[int] | None = None,
        download: bool = True,
        normalize: bool = True,
        mean: tuple[float, ...] = (0.1307,),
        std: tuple[float, ...] = (0.3081,),
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"data.dataset={dataset!r} is not supported; allowed: {', '.join(DATASETS)}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("val_size", val_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"data.{name}={value!r} is out of range; allowed: an integer ≥ 1")
        if normalize and not len(mean) == len(std) == in_channels:
            raise ValueError(f"data.mean/std need {in_channels} values (in_channels), got {list(mean)} / {list(std)}")
        check_class_split(train_classes, open_classes, num_classes)
        self.save_hyperparameters()
        self.root = Path(data_dir).expanduser()
        steps: list[Any] = [transforms.ToTensor()]
        if normalize:
            steps.append(transforms.Normalize(mean, std))
        self.transform = transforms.Compose(steps)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.open_set: Dataset | None = None  # test images of classes never trained on (open-set protocol)

    @property
    def folder(self) -> Path:
        """Where torchvision keeps this dataset's files (MNIST-format sets: <root>/<Name>/raw)."""
        cls = DATASETS[self.hparams.dataset]
        if issubclass(cls, datasets.CIFAR10):
            return self.root / cls.base_folder
        return self.root / cls.__name__ / "raw"

    def prepare_data(self) -> None:
        """Download (rank zero only, Lightning's rule) when data.download=true; otherwise touch nothing."""
        if not self.hparams.download:
            return
        for train in (True, False):
            try:
                DATASETS[self.hparams.dataset](str(self.root), train=train, download=True)
            except Exception as error:  # network errors come as URLError, HTTPError, OSError or RuntimeError
                raise DataError(
                    f"could not download {self.hparams.dataset} into {self.folder}: {first_line(error)}. "
                    f"Without network, copy the files there and set data.download=false, "
                    f"or set paths.data_dir=<folder that has them>"
                ) from error

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._classes(self._load(train=True), self.hparams.train_classes)
            val_size = self.hparams.val_size
            if val_size >= len(full):
                raise ValueError(f"data.val_size={val_size} leaves no training data; allowed: < {len(full)}")
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            self.train_set, self.val_set = random_split(full, [len(full) - val_size, val_size], generator=generator)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._classes(self._load(train=False), self.hparams.train_classes)
            if self.hparams.open_classes:
                self.open_set = self._classes(self._load(train=False), self.hparams.open_classes, relabel=False)

    def _classes(self, dataset: Dataset, classes: list[int] | None, relabel: bool = True) -> Dataset:
        """The samples of `classes` only; with relabel, their labels become 0..len(classes)-1 (the head's)."""
        if classes is None:
            return dataset
        known = len(dataset.classes)
        if bad := [c for c in classes if not 0 <= c < known]:
            raise DataError(f"class {bad[0]} is not in {self.hparams.dataset} (classes 0..{known - 1})")
        targets = torch.as_tensor(dataset.targets)
        if relabel:
            dataset.target_transform = Relabel(classes)
        return Subset(dataset, torch.nonzero(torch.isin(targets, torch.tensor(classes))).squeeze(1).tolist())

    def _load(self, train: bool) -> Dataset:
        name, split = self.hparams.dataset, "train" if train else "test"
        try:
            dataset = DATASETS[name](str(self.root), train=train, download=False)
            image, _ = dataset[0]  # a PIL image: decodes one sample, so unreadable files fail here
        except Exception as error:
            message = str(error)  # torchvision: "Dataset not found[ or corrupted]. You can use download=True ..."
            if "not found" in message:
                state = "not found or corrupt" if "corrupt" in message else "not found"
                fix = (
                    f"set paths.data_dir=<folder that holds {self.folder.relative_to(self.root)}> or data.download=true"
                )
            else:
                state = f"unreadable ({first_line(error)})"
                fix = "delete those files and set data.download=true, or set paths.data_dir=<folder with good copies>"
            raise DataError(f"{name} {split} set {state} in {self.folder}; {fix}") from error
        if self.hparams.train_classes is None and len(dataset.classes) != self.hparams.num_classes:
            raise DataError(f"data.num_classes={self.hparams.num_classes} but {name} has {len(dataset.classes)}")
        shape = (len(image.getbands()), image.height, image.width)
        expected = (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)
        if shape != expected:
            raise DataError(f"{name} images are {shape} but the data config says {expected} (in_channels, image_size)")
        dataset.transform = self.transform
        return dataset

    def _loader(self, dataset: Dataset | None, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.hparams.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (shuffle_seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would.

        The sampler is a DistributedSampler for any number of processes: one shard per rank under DDP (batch_size
        is per device), the whole set in a single process. Lightning calls its set_epoch before every epoch.
        """
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        seed = self.hparams.shuffle_seed
        if seed is None:  # no run seed: a fresh order, still fixed per epoch within this run
            seed = torch.randint(2**31 - 1, ()).item()
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        return self._loader(self.train_set, self.hparams.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test set; with open_classes, also the open-set images as a second loader (dataloader_idx 1)."""
        closed = self._loader(self.test_set, self.hparams.eval_batch_size)
        return [closed, self._loader(self.open_set, self.hparams.eval_batch_size)] if self.open_set else closed


class Relabel:
    """Maps the kept classes' ids to 0..len(classes)-1, as a picklable target_transform (for loader workers)."""

    def __init__(self, classes: list[int]) -> None:
        self.index = {c: i for i, c in enumerate(classes)}

    def __call__(self, target: int) -> int:
        return self.index[int(target)]


def check_class_split(train_classes: list[int] | None, open_classes: list[int] | None, num_classes: int) -> None:
    """Open-set protocol: train on some classes, evaluate retrieval on others, never both."""
    for name, classes in (("train_classes", train_classes), ("open_classes", open_classes)):
        if classes is not None and (len(classes) == 0 or len(set(classes)) != len(classes)):
            raise ValueError(f"data.{name}={list(classes)} must be a non-empty list of distinct class ids")
    if open_classes and train_classes is None:
        raise ValueError("data.open_classes needs data.train_classes (the classes the model may see)")
    if train_classes is not None and len(train_classes) != num_classes:
        raise ValueError(f"data.num_classes={num_classes} but data.train_classes has {len(train_classes)} classes")
    if shared := sorted(set(train_classes or ()) & set(open_classes or ())):
        raise ValueError(f"data.train_classes and data.open_classes share {shared}; open classes must be unseen")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when the message is empty)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
