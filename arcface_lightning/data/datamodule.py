"""Data: a LightningDataModule over torchvision's MNIST-format sets and CIFAR, or a user's own images (a folder per
class, or a CSV list), with fixed, seeded splits.

Splits: the training pool (a torchvision set's official training set, or every image under `root`) is split with a
seeded generator into train / validation (MNIST: 55,000/5,000), so model selection never sees the test set. The
test set is the official one, or `test_root`, or (neither) a third seeded split held out of the pool. It is used
once, at the end. `val_size` and `test_size` are counts, or fractions of the pool below 1.

Two pipelines serve the same samples in the same order (same split, same sampler):

- `pipeline=tensor` (default, fast): the files are read once; the whole set is kept as one uint8 tensor (60,000
  MNIST images are 47 MB), batches are index lookups, and scaling, normalisation and augmentation run as batched
  tensor ops on the training device (`on_after_batch_transfer`). With `on_device=true` the uint8 set itself lives
  on the GPU, so no batch ever crosses the bus. The storage is tensors.py, the batched augmentation augment.py.
  A user's images (images.py) take this path with `cache=memory`; with `cache=none` they are decoded per sample
  in the loader's workers into the same uint8 batches, and prepared on the device the same way. Either way each
  file is first decoded once when the set is indexed, in the same number of workers, so that files that do not
  decode are skipped and listed before training.
- `pipeline=torchvision` (torchvision's sets only): the classic per-sample path (PIL image → torchvision's random
  transforms → ToTensor → Normalize) through the DataLoader and its workers. It stays as the reference the fast
  path is held to: the textbook pipeline every torchvision user knows, with torchvision's own random transforms,
  so a test can prove the tensor pipeline serves the same batches, and a user who doubts a number can rerun it the
  classic way.

Both give bit-identical batches without augmentation (a test checks it). Augmentation draws its random parameters
per sample in both, from different generators: same distribution, different draws. The tensor pipeline seeds its
generator with (shuffle_seed, epoch, rank), so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision import transforms

from arcface_lightning.data import augment as augmentation
from arcface_lightning.data import datasets as sets
from arcface_lightning.data import images, splits
from arcface_lightning.data.settings import LEGACY_AUGMENT_KEYS, OWN_SOURCES, check_settings
from arcface_lightning.data.tensors import TensorImages, ready_batch, targets


class ImageDataModule(L.LightningDataModule):
    """Serves (images, labels) batches of one data set: train / validation / test splits, open-set classes."""

    def __init__(
        self,
        dataset: str = "MNIST",
        data_dir: str = "data",
        num_classes: int | None = 10,
        in_channels: int = 1,
        image_size: int = 28,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_size: int | float = 5000,
        split_seed: int = 0,
        shuffle_seed: int | None = 0,
        train_classes: list[int] | None = None,
        open_classes: list[int] | None = None,
        download: bool = True,
        normalize: bool = True,
        mean: tuple[float, ...] | None = (0.1307,),
        std: tuple[float, ...] | None = (0.3081,),
        num_workers: int = 0,
        pin_memory: bool = False,
        pipeline: str = "tensor",
        on_device: bool = False,
        augment: str | Mapping[str, Any] | None = None,
        degrees: float | None = None,
        translate: float | None = None,
        scale: tuple[float, float] | None = None,
        crop_padding: int | None = None,
        root: str | None = None,
        test_root: str | None = None,
        test_size: int | float | None = None,
        cache: str = "none",
        val_split: str = "by_sample",
    ) -> None:
        """`dataset`: a torchvision set (files under `data_dir`), or `image_folder` / `image_list` (files under
        `root`, a folder or a CSV list; `test_root` the same for a separate test set, else `test_size`, default
        `val_size`, is held out). `num_classes`: null counts them from the data (`count_classes`). `mean`, `std`:
        null is 0.5 per channel, i.e. [0, 255] → [-1, 1]. `cache`: a user's images decoded once into memory
        (`memory`) or in the loader's workers at every epoch (`none`). `val_split`: `by_sample` draws validation
        (and held-out test) images from every class; `by_class` holds out whole classes (identities) for them, so
        `val_size`/`test_size` count classes, and only classes with ≥ 2 images are held out (a retrieval query
        needs a match).
        `augment`: the `data.augment` node (augment.py: kind, degrees, translate, scale, crop_padding) or a kind
        alone. `degrees`, `translate`, `scale`, `crop_padding`: deprecated spellings of its keys (older configs and
        checkpoints), folded into it with a warning."""
        given = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        augment, mean, std = check_settings(type(self).__name__, given)
        self.save_hyperparameters(ignore=LEGACY_AUGMENT_KEYS)
        self.hparams.update(augment=augment, mean=mean, std=std)  # the values in use, for checkpoints
        self.root = Path(data_dir).expanduser()
        self.transform = transforms.Compose(self._transforms(train=False))
        self.train_transform = transforms.Compose(self._transforms(train=True))
        # uint8 batches on the device → floats, augmented in training, normalised: dm.prepare(images[, generator])
        self.prepare = augmentation.BatchPreparation(augment, normalize, mean, std)
        self.seed: int | None = None  # the shuffle seed in use, fixed by setup("fit") (see train_seed)
        self._tensors: dict[str, TensorImages] = {}  # tensor pipeline: split name → its uint8 copy
        self._pools: dict[bool, Dataset] = {}  # train (True) / test (False) pool, as loaded
        self._splits: list[Dataset] | None = None  # train, validation, held-out test (empty unless no test set)
        self._class_splits: tuple[list[int], list[int], list[int]] | None = None  # by_class: train, val, test ids
        self.classes: list[str] | None = None  # class id → name (a user's images; saved in checkpoints)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.open_set: Dataset | None = None  # test images of classes never trained on (open-set protocol)
        self.predict_split = "test"  # what Trainer.predict embeds (predict_dataloader)

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
        """Where the files are: a torchvision set's folder under data_dir (MNIST: <data_dir>/MNIST/raw), or root."""
        if self.hparams.dataset in OWN_SOURCES:
            return Path(self.hparams.root).expanduser()
        return sets.folder(self.root, self.hparams.dataset)

    def prepare_data(self) -> None:
        """Download (rank zero only, Lightning's rule) when data.download=true; otherwise touch nothing."""
        if self.hparams.download and self.hparams.dataset in sets.DATASETS:
            sets.download(self.hparams.dataset, self.root)

    def count_classes(self) -> int:
        """num_classes, counted from the data when the config leaves it null (a user's images); fixes it."""
        hp = self.hparams
        chosen = self._training_classes()
        if hp.dataset in images.SOURCES and self.classes is None:
            names = self._pool(train=True).classes
            self.classes = [names[c] for c in chosen] if chosen else list(names)
        counted = len(chosen) if chosen else None
        if hp.num_classes is None:
            hp.num_classes = counted or len(self._pool(train=True).classes)
        elif hp.val_split == "by_class" and counted != hp.num_classes:
            raise sets.DataError(f"data.num_classes={hp.num_classes} but by_class leaves {counted} training classes")
        return hp.num_classes

    def _training_classes(self) -> list[int] | None:
        """The pool's class ids the head learns (None: all of them): data.train_classes, or by_class's rest."""
        return self._class_split()[0] if self.hparams.val_split == "by_class" else self.hparams.train_classes

    def _class_split(self) -> tuple[list[int], list[int], list[int]]:
        """by_class: (training, validation, test) class ids of the training pool; with a separate test folder no
        test classes are drawn."""
        if self._class_splits is None:
            hp, pool = self.hparams, self._pool(train=True)
            test_size = 0 if hp.test_root is not None else hp.test_size
            self._class_splits = splits.by_class(
                targets(pool), len(pool.classes), hp.val_size, test_size, hp.split_seed
            )
        return self._class_splits

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.count_classes()
        predicting_train = stage == "predict" and self.predict_split in ("train", "val")
        if (stage in (None, "fit", "validate") or predicting_train) and self.train_set is None:
            self.train_set, self.val_set, _ = self._split()
            if hp.augment["kind"] and hp.pipeline == "torchvision" and stage != "predict":  # one shared dataset
                self.train_set = sets.with_transform(self.train_set, self.train_transform)
            self.seed = self.train_seed()
        if stage in (None, "test", "predict") and self.test_set is None:
            own = self._has_test_set()
            pool = self._pool(train=not own)  # once: the closed and the open set are views of it
            if hp.val_split == "by_class":  # identities never trained on: the test folder's, or the held-out ones
                held = self._class_split()[2]
                self.test_set = self._split()[2] if not own else pool if hp.test_root else self._select(pool, held)
            else:
                self.test_set = sets.select_classes(pool, hp.train_classes, hp.dataset) if own else self._split()[2]
                sets.check_labels(self.test_set, hp.num_classes, f"{hp.dataset} test set")
            if hp.open_classes:
                self.open_set = self._select(pool, hp.open_classes)

    def _select(self, pool: Dataset, classes: list[int]) -> Dataset:
        """The samples of some classes with their pool's labels (held-out and open-set classes)."""
        return sets.select_classes(pool, classes, self.hparams.dataset, relabel=False)

    def _has_test_set(self) -> bool:
        return self.hparams.dataset in sets.DATASETS or self.hparams.test_root is not None

    def _split(self) -> list[Dataset]:
        """Train, validation and held-out test (empty where there is a test set) from the training pool, by a
        generator seeded with split_seed alone: the same split for every run, stage and process."""
        if self._splits is None:
            hp = self.hparams
            pool = self._pool(train=True)
            full = sets.select_classes(pool, self._training_classes(), hp.dataset)
            sets.check_labels(full, hp.num_classes, f"{hp.dataset} train set")
            if hp.val_split == "by_class":
                _, held_val, held_test = self._class_split()
                test = self._select(pool, held_test) if held_test and not self._has_test_set() else Subset(pool, [])
                self._splits = [full, self._select(pool, held_val), test]
            else:
                test_size = 0 if self._has_test_set() else hp.test_size
                self._splits = splits.by_sample(full, hp.val_size, test_size, hp.split_seed)
        return self._splits

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
        hp = self.hparams
        if hp.pipeline != "tensor" or (hp.dataset in images.SOURCES and hp.cache == "none"):
            return dataset
        if split not in self._tensors:
            tensors = TensorImages.from_dataset(dataset, num_workers=hp.num_workers)
            if hp.on_device and self.trainer is not None:
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
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return self.prepare(images), labels
        generator = self.prepare.generator(images.device, self.seed, trainer.current_epoch, trainer.global_rank)
        return self.prepare(images, generator), labels

    def _pool(self, train: bool) -> Dataset:
        """The training pool (train=True) or the separate test set, loaded and checked once."""
        if train not in self._pools:
            hp = self.hparams
            if hp.dataset in images.SOURCES:
                where, key = (
                    (self.folder, "data.root") if train else (Path(hp.test_root).expanduser(), "data.test_root")
                )
                closed_set = not train and hp.val_split == "by_sample"  # the pool's classes, matched by name
                named = self._pool(train=True).classes if closed_set else None
                dataset = images.load(hp.dataset, where, key, hp.in_channels, hp.image_size, named, hp.num_workers)
            else:
                shape = (hp.in_channels, hp.image_size, hp.image_size)
                num_classes = hp.num_classes if hp.train_classes is None else None
                dataset = sets.load(hp.dataset, self.root, train, shape, num_classes)
                dataset.transform = self.transform
            self._pools[train] = dataset
        return self._pools[train]

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the class names of a user's images (the head's class id i is classes[i])."""
        return {"classes": self.classes} if self.classes is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.classes = state_dict.get("classes", self.classes)

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
        """The split named by `predict_split` (test unless set: train, val or test), unaugmented and in order, for
        Trainer.predict: its embeddings through the module's predict_step (arcface_lightning.embed)."""
        return self._loader(self.predict_split, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test set; with open_classes, also the open-set images as a second loader (dataloader_idx 1)."""
        closed = self._loader("test", self.hparams.eval_batch_size)
        return [closed, self._loader("open", self.hparams.eval_batch_size)] if self.open_set else closed
