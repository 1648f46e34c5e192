"""Data: torchvision's MNIST-format sets and CIFAR as a LightningDataModule with a fixed validation split.

The official training set is split into train/validation with a seeded generator (MNIST: 55,000/5,000), so model
selection never sees the test set; the official test set is used once, at the end.

Two pipelines serve the same samples in the same order (same split, same sampler):

- `pipeline=tensor` (default, fast): torchvision reads (or downloads) the files once; the whole set is kept as one
  uint8 tensor (60,000 MNIST images are 47 MB), batches are index lookups, and scaling, normalisation and
  augmentation run as batched tensor ops on the training device (`on_after_batch_transfer`). With
  `on_device=true` the uint8 set itself lives on the GPU, so no batch ever crosses the bus. The storage is
  tensors.py, the batched augmentation augment.py.
- `pipeline=torchvision`: the classic per-sample path (PIL image → torchvision's random transforms → ToTensor →
  Normalize) through the DataLoader and its workers. It stays as the reference the fast path is held to: the
  textbook pipeline every torchvision user knows, with torchvision's own random transforms, so a test can prove
  the tensor pipeline serves the same batches, and a user who doubts a number can rerun it the classic way.

Both give bit-identical batches without augmentation (a test checks it). Augmentation draws its random parameters
per sample in both, from different generators: same distribution, different draws. The tensor pipeline seeds its
generator with (shuffle_seed, epoch, rank), so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, random_split
from torchvision import transforms

from arcface_lightning.checks import check_choice, check_int, is_int, is_number, require
from arcface_lightning.data import augment as augmentation
from arcface_lightning.data import datasets as sets
from arcface_lightning.data.tensors import TensorImages, ready_batch

PIPELINES = ("tensor", "torchvision")
LEGACY_AUGMENT_KEYS = ("degrees", "translate", "scale", "crop_padding")  # now data.augment.<key>


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
        augment: str | Mapping[str, Any] | None = None,
        degrees: float | None = None,
        translate: float | None = None,
        scale: tuple[float, float] | None = None,
        crop_padding: int | None = None,
    ) -> None:
        """`augment`: the `data.augment` node (augment.py: kind, degrees, translate, scale, crop_padding) or a kind
        alone. `degrees`, `translate`, `scale`, `crop_padding`: deprecated spellings of its keys (older configs and
        checkpoints), folded into it with a warning."""
        super().__init__()
        owner = type(self).__name__
        check_choice(owner, "dataset", dataset, list(sets.DATASETS))
        check_choice(owner, "pipeline", pipeline, PIPELINES)
        legacy = {"degrees": degrees, "translate": translate, "scale": scale, "crop_padding": crop_padding}
        if legacy := {k: v for k, v in legacy.items() if v is not None}:
            warnings.warn(
                f"data.{', data.'.join(legacy)}: deprecated, now data.augment.<key> (data.augment is one node)",
                FutureWarning,
                stacklevel=2,
            )
            node = {"kind": augment} if augment is None or isinstance(augment, str) else dict(augment)
            augment = {**node, **legacy}
        augment = augmentation.settings(owner, augment)
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("val_size", val_size)):
            check_int(owner, name, value)
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
            check_int(owner, name, value)
        check_int(owner, "num_workers", num_workers, minimum=0)
        check_int(owner, "split_seed", split_seed, minimum=0)
        require(
            owner, "shuffle_seed", shuffle_seed, "null or an integer ≥ 0", lambda v: v is None or (is_int(v) and v >= 0)
        )
        if normalize:
            sizes = f"{in_channels} numbers (one per input channel)"
            for name, values in (("mean", mean), ("std", std)):
                require(owner, name, values, sizes, lambda v: len(v) == in_channels and all(map(is_number, v)))
            require(owner, "std", std, "numbers > 0", lambda v: min(v) > 0)
        if on_device and (pipeline != "tensor" or num_workers):
            raise ValueError("data.on_device=true needs data.pipeline=tensor and data.num_workers=0")
        sets.check_class_split(train_classes, open_classes, num_classes)
        self.save_hyperparameters(ignore=LEGACY_AUGMENT_KEYS)
        self.hparams.augment = augment  # the full node: checkpoints hold the ranges in use
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
        steps = augmentation.per_sample_transforms(hp.augment, hp.image_size) if train else []
        steps.append(transforms.ToTensor())
        if hp.normalize:
            steps.append(transforms.Normalize(hp.mean, hp.std))
        return steps

    @property
    def folder(self) -> Path:
        """Where torchvision keeps this dataset's files (MNIST-format sets: <root>/<Name>/raw)."""
        return sets.folder(self.root, self.hparams.dataset)

    def prepare_data(self) -> None:
        """Download (rank zero only, Lightning's rule) when data.download=true; otherwise touch nothing."""
        if self.hparams.download:
            sets.download(self.hparams.dataset, self.root)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = sets.select_classes(self._load(train=True), self.hparams.train_classes, self.hparams.dataset)
            val_size = self.hparams.val_size
            if val_size >= len(full):
                raise sets.DataError(
                    f"data.val_size={val_size} leaves no training data; allowed: 1 ≤ val_size < {len(full)}"
                )
            sets.check_labels(full, self.hparams.num_classes, f"{self.hparams.dataset} train set")
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            self.train_set, self.val_set = random_split(full, [len(full) - val_size, val_size], generator=generator)
            if self.hparams.augment["kind"] and self.hparams.pipeline == "torchvision":  # subsets share a dataset
                self.train_set = sets.with_transform(self.train_set, self.train_transform)
            self.seed = self.train_seed()
        if stage in (None, "test", "predict") and self.test_set is None:
            test = self._load(train=False)  # once: the closed and the open set are views of it
            self.test_set = sets.select_classes(test, self.hparams.train_classes, self.hparams.dataset)
            sets.check_labels(self.test_set, self.hparams.num_classes, f"{self.hparams.dataset} test set")
            if self.hparams.open_classes:
                self.open_set = sets.select_classes(
                    test, self.hparams.open_classes, self.hparams.dataset, relabel=False
                )

    def train_seed(self) -> int:
        """data.shuffle_seed; without one (no run seed), one drawn for this run, the same on every DDP rank (rank
        zero's, broadcast): ranks that shuffled with different seeds would train on overlapping shards."""
        if self.hparams.shuffle_seed is not None:
            return self.hparams.shuffle_seed
        seed = int(torch.randint(2**31 - 1, ()).item())
        return self.trainer.strategy.broadcast(seed) if self.trainer is not None else seed

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
        if generator is not None:
            images = augmentation.augment_batch(images, generator, hp.augment)
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

    def _load(self, train: bool) -> Dataset:
        hp = self.hparams
        shape = (hp.in_channels, hp.image_size, hp.image_size)
        num_classes = hp.num_classes if hp.train_classes is None else None
        dataset = sets.load(hp.dataset, self.root, train, shape, num_classes)
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
