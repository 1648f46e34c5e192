"""How a source's samples become the train / validation / test splits and the open set (`data.val_split`):

- `BySample`: validation (and, for a source without a test set, a held-out test split) drawn from every class of
  the training pool; with `data.train_classes`, only those classes, relabelled 0..n-1 for the head, and
  `data.open_classes` as the open set (retrieval on classes never trained on).
- `ByClass`: whole classes (identities) held out for validation and test, for identity data.
- `Fixed`: the splits a source drew when it was made (a packed set), taken as they are.

The generator is seeded with data.split_seed alone, so every run, stage and process draws the same split.
`val_size` and `test_size` are counts (of images; of classes for by_class), or fractions of the pool below 1.

K-fold cross-validation (`data.folds=K data.fold=i`): the held-out test split is drawn first, exactly as without
folds (so the test set is the same), and what remains of the pool is dealt into K folds, also seeded by
data.split_seed alone: fold i validates, the other K-1 train. by_sample stratifies (each class's images spread over
the folds ±1); by_class deals whole classes (those with 2 images or more; the others train in every fold).
`val_size` then sizes no validation set: it only stands in for a null `test_size`, as without folds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Subset, random_split

from arcface_lightning.data.datasets import DataError, check_labels, select_classes
from arcface_lightning.data.tensors import targets

if TYPE_CHECKING:
    from arcface_lightning.data.sources.base import Source


def is_size(value: Any) -> bool:
    """A split size: a count ≥ 1, or a fraction of the pool in (0, 1)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, float) and 0 < value < 1
    )


def split_sizes(n: int, val_size: int | float, test_size: int | float | None, unit: str = "images") -> tuple[int, int]:
    """Validation and held-out test counts out of a pool of n (images, or classes for by_class splits): counts, or
    fractions rounded (at least 1). Test 0: the set has its own test set; None: as val_size."""
    val, test = (size if isinstance(size, int) else max(1, round(size * n)) for size in (val_size, test_size or 0))
    test = val if test_size is None else test
    if test and val + test >= n:
        raise DataError(
            f"data.val_size={val_size} and data.test_size={test_size} (null: val_size) leave no training data; "
            f"allowed: together fewer than the {n} {unit}"
        )
    if val >= n:
        of = "" if unit == "images" else f" ({unit})"
        raise DataError(f"data.val_size={val_size} leaves no training data; allowed: 1 ≤ val_size < {n}{of}")
    return val, test


def by_sample(full: Dataset, val_size: int | float, test_size: int | float | None, seed: int) -> list[Dataset]:
    """[train, validation, held-out test] subsets of `full` (test empty for test_size 0)."""
    val, test = split_sizes(len(full), val_size, test_size)
    return random_split(full, [len(full) - val - test, val, test], generator=torch.Generator().manual_seed(seed))


def by_class(
    labels: torch.Tensor, num_classes: int, val_size: int | float, test_size: int | float | None, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """(training, validation, test) class ids for a pool with these labels. Only classes with two images or more
    are held out: a held-out image is a retrieval query, and it needs a match."""
    counts = torch.bincount(labels, minlength=num_classes)
    present, eligible = int((counts > 0).sum()), torch.nonzero(counts >= 2).squeeze(1)
    val, test = split_sizes(present, val_size, test_size, unit="classes")
    if val + test > len(eligible):
        raise DataError(
            f"data.val_split=by_class holds out {val + test} classes, but only {len(eligible)} of the {present} have "
            "2 images or more (a held-out class needs a pair); lower data.val_size/test_size"
        )
    order = eligible[torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed))]
    held_val, held_test = sorted(order[:val].tolist()), sorted(order[val : val + test].tolist())
    held = set(held_val) | set(held_test)
    return [c for c in range(num_classes) if counts[c] > 0 and c not in held], held_val, held_test


def sample_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Each sample's fold (0..folds-1), stratified: a seeded shuffle, sorted by class (stably, so each class stays
    in random order), dealt round robin. Every class's images are spread over the folds ±1, the folds' sizes too."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[torch.sort(labels[order], stable=True).indices]
    fold = torch.empty_like(order)
    fold[order] = torch.arange(len(order)) % folds
    return fold


def class_folds(
    labels: torch.Tensor, num_classes: int, held_test: list[int], folds: int, fold: int, seed: int
) -> tuple[list[int], list[int]]:
    """(training, validation) class ids of fold `fold` of a by_class pool, its test classes `held_test` set aside:
    the classes with 2 images or more (a held-out image is a query that needs a match) dealt over the folds in a
    seeded order, the folds' class counts ±1; the other classes train in every fold."""
    counts, test = torch.bincount(labels, minlength=num_classes), set(held_test)
    eligible = [c for c in range(num_classes) if counts[c] >= 2 and c not in test]
    if folds > len(eligible):
        raise DataError(
            f"data.folds={folds} is more than the {len(eligible)} classes with 2 images or more outside the test "
            f"classes; allowed: 2 ≤ folds ≤ {len(eligible)} with data.val_split=by_class (a fold holds whole classes)"
        )
    order = torch.tensor(eligible)[torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed))]
    held_val = sorted(order[fold::folds].tolist())
    held = test | set(held_val)
    return [c for c in range(num_classes) if counts[c] > 0 and c not in held], held_val


class Split:
    """The splits of one source under the checked `data.*` settings (shared with the data module)."""

    def __init__(self, source: Source, settings: Any) -> None:
        self.source, self.settings = source, settings

    def class_ids(self) -> list[int] | None:
        """The training pool's class ids the head learns, in the head's order (None: all of them)."""
        return None

    def train_and_val(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def test(self) -> Dataset:
        raise NotImplementedError

    def open_set(self) -> Dataset | None:
        """Test images of classes never trained on, with their pool's labels (data.open_classes); None without."""
        return None


class Fixed(Split):
    def train_and_val(self) -> tuple[Dataset, Dataset]:
        return self.source.split("train"), self.source.split("val")

    def test(self) -> Dataset:
        return self.source.split("test")


class PoolSplit(Split):
    """What BySample and ByClass share: the pool split once (train, validation, held-out test), the open set."""

    def __init__(self, source: Source, settings: Any) -> None:
        super().__init__(source, settings)
        self._drawn: list[Dataset] | None = None  # train, validation, held-out test (empty where there is a test set)

    def drawn(self) -> list[Dataset]:
        if self._drawn is None:
            self._drawn = self.draw()
        return self._drawn

    def draw(self) -> list[Dataset]:
        raise NotImplementedError

    def train_and_val(self) -> tuple[Dataset, Dataset]:
        train, val, _ = self.drawn()
        return train, val

    def training_pool(self) -> Dataset:
        """The pool's classes the head learns, relabelled for it, their labels checked."""
        hp = self.settings
        full = select_classes(self.source.pool(train=True), self.class_ids(), hp.dataset)
        check_labels(full, hp.num_classes, f"{hp.dataset} train set")
        return full

    def open_set(self) -> Dataset | None:
        classes = self.settings.open_classes
        return self.select(self.source.pool(train=not self.source.has_test_set), classes) if classes else None

    def select(self, pool: Dataset, classes: list[int]) -> Dataset:
        """The samples of some classes with their pool's labels (held-out and open-set classes)."""
        return select_classes(pool, classes, self.settings.dataset, relabel=False)


class BySample(PoolSplit):
    def class_ids(self) -> list[int] | None:
        return self.settings.train_classes

    def draw(self) -> list[Dataset]:
        hp, full = self.settings, self.training_pool()
        test_size = 0 if self.source.has_test_set else hp.test_size
        if hp.folds is None:
            return by_sample(full, hp.val_size, test_size, hp.split_seed)
        if test_size == 0:
            rest, test = torch.arange(len(full)), Subset(full, [])
        else:  # the test split drawn as without folds; the folds share what remains
            train, val, test = by_sample(full, hp.val_size, test_size, hp.split_seed)
            rest = torch.tensor(sorted(train.indices + val.indices), dtype=torch.long)
        labels = targets(full)[rest]
        self.check_folds(torch.bincount(labels, minlength=hp.num_classes or 0))
        fold = sample_folds(labels, hp.folds, hp.split_seed)
        return [Subset(full, rest[fold != hp.fold].tolist()), Subset(full, rest[fold == hp.fold].tolist()), test]

    def check_folds(self, counts: torch.Tensor) -> None:
        """Every fold must hold every class: none may have fewer images than there are folds."""
        folds, present = self.settings.folds, torch.where(counts > 0, counts, counts.max() + 1)
        label = int(present.argmin())  # the smallest class
        smallest = int(counts[label])
        if smallest >= folds:
            return
        pool_id = self.settings.train_classes[label] if self.settings.train_classes else label
        raise DataError(
            f"data.folds={folds} is more than class {self.source.classes[pool_id]!r} has images in the training pool "
            f"({smallest}); allowed: 2 ≤ folds ≤ {smallest} with data.val_split=by_sample (every fold holds every "
            "class)" + ("" if smallest >= 2 else "; data.val_split=by_class folds by identity instead")
        )

    def test(self) -> Dataset:
        """The source's test set (its training classes), or the split held out of the pool."""
        hp = self.settings
        if self.source.has_test_set:
            test = select_classes(self.source.pool(train=False), hp.train_classes, hp.dataset)
        else:
            test = self.drawn()[2]
        check_labels(test, hp.num_classes, f"{hp.dataset} test set")
        return test


class ByClass(PoolSplit):
    def __init__(self, source: Source, settings: Any) -> None:
        super().__init__(source, settings)
        self._held: tuple[list[int], list[int], list[int]] | None = None

    def held_classes(self) -> tuple[list[int], list[int], list[int]]:
        """(training, validation, test) class ids of the training pool; a source whose test set holds identities
        of its own (a test folder) has no test classes drawn."""
        if self._held is None:
            hp, pool = self.settings, self.source.pool(train=True)
            test_size = 0 if self.source.separate_test_identities else hp.test_size
            labels, num_classes = targets(pool), len(pool.classes)
            if hp.folds is None:
                self._held = by_class(labels, num_classes, hp.val_size, test_size, hp.split_seed)
            else:  # the test classes drawn as without folds; the folds share the other classes
                held_test = []
                if test_size != 0:  # 0: the source's test set has identities of its own
                    held_test = by_class(labels, num_classes, hp.val_size, test_size, hp.split_seed)[2]
                train, held_val = class_folds(labels, num_classes, held_test, hp.folds, hp.fold, hp.split_seed)
                self._held = train, held_val, held_test
        return self._held

    def class_ids(self) -> list[int]:
        return self.held_classes()[0]

    def draw(self) -> list[Dataset]:
        pool, (_, held_val, held_test) = self.source.pool(train=True), self.held_classes()
        full = self.training_pool()
        test = self.select(pool, held_test) if held_test and not self.source.has_test_set else Subset(pool, [])
        return [full, self.select(pool, held_val), test]

    def test(self) -> Dataset:
        """Identities never trained on: the test set's own, the held-out classes' images in the source's test set,
        or the held-out classes' images of the pool."""
        if not self.source.has_test_set:
            return self.drawn()[2]
        pool = self.source.pool(train=False)
        return pool if self.source.separate_test_identities else self.select(pool, self.held_classes()[2])


def split_of(source: Source, settings: Any) -> Split:
    """The split for a source and data.val_split (a source with fixed splits keeps its own)."""
    if source.fixed_splits:
        return Fixed(source, settings)
    return {"by_sample": BySample, "by_class": ByClass}[settings.val_split](source, settings)
