"""Data: torchvision's MNIST-format sets and CIFAR as a LightningDataModule with a fixed validation split.

The official training set is split into train/validation with a seeded generator (MNIST: 55,000/5,000), so model
selection never sees the test set; the official test set is used once, at the end.

Two pipelines serve the same samples in the same order (same split, same sampler):

- `pipeline=tensor` (default, fast): torchvision reads (or downloads) the files once; the whole set is kept as one
  uint8 tensor (60,000 MNIST images are 47 MB), batches are index lookups, and scaling, normalisation and
  augmentation run as batched tensor ops on the training device (`on_after_batch_transfer`). With
  `on_device=true` the uint8 set itself lives on the GPU, so no batch ever crosses the bus. The storage is
  tensors.py, the batched augmentation augment.py.
- `pipeline=torchvision`: the classic per-sample path (PIL image → ToTensor → Normalize → torchvision's random
  transforms) through the DataLoader, e.g. for workers or a dataset without a `.data` array.

Both give bit-identical batches without augmentation (a test checks it). Augmentation draws its random parameters
per sample in both, from different generators: same distribution, different draws. The tensor pipeline seeds its
generator with (shuffle_seed, epoch, rank), so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, random_split
from torchvision import datasets, transforms

from arcface_lightning.augment import random_affine, random_crop_flip
from arcface_lightning.checks import check_choice, check_int, check_number, first_line, is_int, is_number, require
from arcface_lightning.tensors import TensorImages, ready_batch, targets

DATASETS: dict[str, type[datasets.VisionDataset]] = {
    "MNIST": datasets.MNIST,
    "FashionMNIST": datasets.FashionMNIST,
    "KMNIST": datasets.KMNIST,
    "CIFAR10": datasets.CIFAR10,
}
PIPELINES = ("tensor", "torchvision")
AUGMENTATIONS = ("affine", "crop_flip")


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
        pipeline: str = "tensor",
        on_device: bool = False,
        augment: str | None = None,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        crop_padding: int = 4,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_choice(owner, "dataset", dataset, list(DATASETS))
        check_choice(owner, "pipeline", pipeline, PIPELINES)
        check_choice(owner, "augment", augment, (None, *AUGMENTATIONS))
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("val_size", val_size)):
            check_int(owner, name, value)
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
            check_int(owner, name, value)
        check_int(owner, "num_workers", num_workers, minimum=0)
        check_int(owner, "split_seed", split_seed, minimum=0)
        require(
            owner, "shuffle_seed", shuffle_seed, "null or an integer ≥ 0", lambda v: v is None or (is_int(v) and v >= 0)
        )
        check_number(owner, "degrees", degrees, "0 ≤ degrees ≤ 180", lambda v: 0 <= v <= 180)
        check_number(owner, "translate", translate, "0 ≤ translate < 1", lambda v: 0 <= v < 1)
        require(owner, "scale", scale, "[low, high] with 0 < low ≤ high", lambda v: 0 < v[0] <= v[1] and len(v) == 2)
        check_int(owner, "crop_padding", crop_padding, minimum=0)
        if normalize:
            sizes = f"{in_channels} numbers (one per input channel)"
            for name, values in (("mean", mean), ("std", std)):
                require(owner, name, values, sizes, lambda v: len(v) == in_channels and all(map(is_number, v)))
            require(owner, "std", std, "numbers > 0", lambda v: min(v) > 0)
        if on_device and (pipeline != "tensor" or num_workers):
            raise ValueError("data.on_device=true needs data.pipeline=tensor and data.num_workers=0")
        check_class_split(train_classes, open_classes, num_classes)
        self.save_hyperparameters()
        self.root = Path(data_dir).expanduser()
        self.transform = transforms.Compose(self._transforms(train=False))
        self.train_transform = transforms.Compose(self._transforms(train=True))
        self._augment_generator: torch.Generator | None = None
        self._augment_key: tuple[int, torch.device] | None = None  # (epoch, device) it was seeded for
        self.seed: int | None = None  # the shuffle seed in use, fixed by setup("fit") (see train_seed)
        self._tensors: dict[str, TensorImages] = {}  # tensor pipeline: split name → its uint8 copy
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.open_set: Dataset | None = None  # test images of classes never trained on (open-set protocol)

    def _transforms(self, train: bool) -> list[Any]:
        """The torchvision pipeline's per-sample transforms (the tensor pipeline does the same in `prepare`)."""
        hp = self.hparams
        steps: list[Any] = []
        if train and hp.augment == "affine":
            steps.append(
                transforms.RandomAffine(
                    hp.degrees,
                    translate=(hp.translate, hp.translate),
                    scale=tuple(hp.scale),
                    interpolation=transforms.InterpolationMode.BILINEAR,
                )
            )
        elif train and hp.augment == "crop_flip":
            steps += [transforms.RandomCrop(hp.image_size, padding=hp.crop_padding), transforms.RandomHorizontalFlip()]
        steps.append(transforms.ToTensor())
        if hp.normalize:
            steps.append(transforms.Normalize(hp.mean, hp.std))
        return steps

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
                raise DataError(
                    f"data.val_size={val_size} leaves no training data; allowed: 1 ≤ val_size < {len(full)}"
                )
            self._check_targets(full, "train")
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            self.train_set, self.val_set = random_split(full, [len(full) - val_size, val_size], generator=generator)
            if self.hparams.augment and self.hparams.pipeline == "torchvision":  # the subsets share one dataset
                self.train_set = with_transform(self.train_set, self.train_transform)
            self.seed = self.train_seed()
        if stage in (None, "test", "predict") and self.test_set is None:
            test = self._load(train=False)  # once: the closed and the open set are views of it
            self.test_set = self._classes(test, self.hparams.train_classes)
            self._check_targets(self.test_set, "test")
            if self.hparams.open_classes:
                self.open_set = self._classes(test, self.hparams.open_classes, relabel=False)

    def train_seed(self) -> int:
        """data.shuffle_seed; without one (no run seed), one drawn for this run, the same on every DDP rank (rank
        zero's, broadcast): ranks that shuffled with different seeds would train on overlapping shards."""
        if self.hparams.shuffle_seed is not None:
            return self.hparams.shuffle_seed
        seed = int(torch.randint(2**31 - 1, ()).item())
        return self.trainer.strategy.broadcast(seed) if self.trainer is not None else seed

    def _check_targets(self, dataset: Dataset, split: str) -> None:
        """Every label in [0, num_classes), checked once here: the heads skip that check on accelerators, where
        it would cost a device synchronisation per step (heads.py)."""
        labels = targets(dataset)
        bad = labels[(labels < 0) | (labels >= self.hparams.num_classes)]
        if len(bad):
            raise DataError(
                f"{self.hparams.dataset} {split} set has label {bad[0].item()}; "
                f"allowed: 0 ≤ label < data.num_classes={self.hparams.num_classes}"
            )

    def _serve(self, split: str) -> Dataset:
        """What a loader of `split` (train, val, test, open) iterates: the tensor pipeline's in-memory copy of that
        split (made once), or the split itself."""
        dataset = getattr(self, f"{split}_set")
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if self.hparams.pipeline != "tensor":
            return dataset
        if split not in self._tensors:
            tensors = TensorImages.from_dataset(dataset)
            if self.hparams.on_device and self.trainer is not None:
                tensors = tensors.to(self.trainer.strategy.root_device)
            self._tensors[split] = tensors
        return self._tensors[split]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tensor pipeline: uint8 batches become normalised (and, in training, augmented) floats on the device."""
        if not isinstance(batch, (tuple, list)):  # the model summary's example input, a float image tensor
            return batch
        images, labels = batch
        if images.dtype != torch.uint8:  # the torchvision pipeline's batches are ready
            return batch
        training = self.trainer is not None and self.trainer.training
        return self.prepare(images, self._generator(images.device) if training else None), labels

    def prepare(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (batch, C, H, W) → float in [0, 1] → augmented (when a generator is given) → normalised."""
        hp = self.hparams
        images = images.float().div_(255)
        if generator is not None and hp.augment == "affine":
            images = random_affine(images, generator, hp.degrees, hp.translate, tuple(hp.scale))
        elif generator is not None and hp.augment == "crop_flip":
            images = random_crop_flip(images, generator, hp.crop_padding)
        if hp.normalize:  # torchvision's own normalize, batched: the same ops as the per-sample pipeline
            images = transforms.functional.normalize(images, hp.mean, hp.std, inplace=True)
        return images

    def _generator(self, device: torch.device) -> torch.Generator:
        """Augmentation randomness, reseeded from (the run's shuffle seed, epoch, rank) at each epoch's first batch."""
        epoch = self.trainer.current_epoch
        if self._augment_key != (epoch, device):
            mixed = (self.seed * 1_000_003 + epoch) * 1_009 + self.trainer.global_rank
            self._augment_generator = torch.Generator(device).manual_seed(mixed % 2**63)
            self._augment_key = (epoch, device)
        return self._augment_generator

    def _classes(self, dataset: Dataset, classes: list[int] | None, relabel: bool = True) -> Dataset:
        """The samples of `classes` only; with relabel, their labels become 0..len(classes)-1 (the head's)."""
        if classes is None:
            return dataset
        known = len(dataset.classes)
        if bad := [c for c in classes if not 0 <= c < known]:
            raise DataError(f"class {bad[0]} is not in {self.hparams.dataset} (classes 0..{known - 1})")
        targets = torch.as_tensor(dataset.targets)
        if relabel:  # on a shallow copy (the decoded arrays are shared): the open set keeps the original labels
            dataset = copy.copy(dataset)
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

    def _loader(self, split: str, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        dataset = self._serve(split)
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.hparams.pin_memory and not self.hparams.on_device,
            collate_fn=ready_batch if isinstance(dataset, TensorImages) else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (shuffle_seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would.

        The sampler is a DistributedSampler for any number of processes: one shard per rank under DDP (batch_size
        is per device), the whole set in a single process. Lightning calls its set_epoch before every epoch.
        """
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self._loader("train", self.hparams.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The official test set, for Trainer.predict (its embeddings, through the module's predict_step)."""
        return self._loader("test", self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test set; with open_classes, also the open-set images as a second loader (dataloader_idx 1)."""
        closed = self._loader("test", self.hparams.eval_batch_size)
        return [closed, self._loader("open", self.hparams.eval_batch_size)] if self.open_set else closed


def with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """The same samples with another per-sample transform (a shallow copy: the decoded arrays are shared)."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    clone = copy.copy(dataset)
    clone.transform = transform
    return clone


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
