"""Seeded splits of a training pool: by sample (validation and held-out test images from every class) or by class
(whole classes held out, for identity data). The generator is seeded with data.split_seed alone, so every run,
stage and process draws the same split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, random_split

from arcface_lightning.data.datasets import DataError


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
