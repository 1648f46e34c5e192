"""What the data module asks of a source of samples: the interface every source (`data.dataset`) implements.

A source only says which samples there are, with which labels; splitting them (splits.py), serving them as batches
(pipelines.py) and the loaders (datamodule.py) are the same for every source. It reads the checked `data.*`
settings it needs from `settings` (the data module's hyper-parameters, shared: `num_classes` counted from the data
is seen by all).

Most sources give a pool of samples to split (`load`): the training pool, and for those with one (`has_test_set`)
a test set of their own. A source whose splits were drawn when it was made (a packed set) gives them by name
(`fixed_splits`, `split`) and may bring its own training loader (`train_loader`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import DataLoader, Dataset


class Source:
    """One kind of data set. A new one: a subclass with `load` (and the class attributes that differ), registered
    under its `data.dataset` name in sources/__init__.py (or by `register_source`), and a conf/data/<name>.yaml.

    A pool is a map-style dataset of (image, label) samples with torchvision's attributes: `targets` (the labels),
    `classes` (a name per label) and `target_transform` (None; set when classes are selected and relabelled)."""

    root_is: ClassVar[str | None] = None  # what data.root names ("a folder"): required when set
    per_sample_pipeline: ClassVar[bool] = False  # serves PIL images, so pipeline=torchvision can read it
    keeps_class_names: ClassVar[bool] = False  # its class names are the data module's (classes.json, checkpoints)
    fixed_splits: ClassVar[bool] = False  # train/val/test drawn when it was made: `split(name)`, not `load`

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._pools: dict[bool, Dataset] = {}

    @property
    def folder(self) -> Path:
        """Where its files are (data.root unless the source says otherwise)."""
        return Path(self.settings.root).expanduser()

    @property
    def has_test_set(self) -> bool:
        """A test set of its own (`load(train=False)`); without one, the split holds a test split out of the pool."""
        return False

    @property
    def separate_test_identities(self) -> bool:
        """by_class: its test set holds identities of its own (a test folder), used whole; else the held-out test
        classes are drawn from the pool (and, with a test set of the same classes, their images taken from it)."""
        return False

    @property
    def in_memory(self) -> bool:
        """The tensor pipeline may keep its splits as one uint8 tensor each (else: decoded per sample)."""
        return True

    @property
    def classes(self) -> list[str]:
        """A name per class id of the training pool."""
        return list(self.pool(train=True).classes)

    def prepare(self) -> None:
        """Fetch what is missing (Lightning's prepare_data: rank zero only). Most sources have nothing to fetch."""

    def pool(self, train: bool) -> Dataset:
        """The training pool (train=True) or its own test set, loaded and checked once."""
        if train not in self._pools:
            self._pools[train] = self.load(train)
        return self._pools[train]

    def load(self, train: bool) -> Dataset:
        """The training pool or the test set, read from its files; one line (DataError) says what is wrong."""
        raise NotImplementedError(f"{type(self).__name__} gives fixed splits, not a pool to split")

    def split(self, name: str) -> Dataset:
        """fixed_splits: the split `name` (train, val or test) as it was drawn."""
        raise NotImplementedError(f"{type(self).__name__} gives a pool to split, not fixed splits")

    def train_loader(self, seed: int | None) -> DataLoader | None:
        """A training loader of its own (shuffled by `seed`); None: the data module's seeded sampler over the
        training split."""
        return None


class UserFolder(Source):
    """A user's files at data.root, with an optional test set at data.test_root (its identities its own under
    by_class), decoded once into memory with data.cache=memory or in the loader's workers at every epoch."""

    @property
    def has_test_set(self) -> bool:
        return self.settings.test_root is not None

    @property
    def separate_test_identities(self) -> bool:
        return self.has_test_set  # by_class: the test folder's people are not the training folder's

    @property
    def in_memory(self) -> bool:
        return self.settings.cache == "memory"

    def where(self, train: bool) -> tuple[Path, str]:
        """The folder of the training pool or of the test set, and the key that names it in an error."""
        return (self.folder, "data.root") if train else (Path(self.settings.test_root).expanduser(), "data.test_root")
