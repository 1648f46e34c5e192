"""The data module's settings (the `data.*` keys), checked before any work: a bad value raises a `BadValue` that
names the key, the value and what is allowed (checks.py); a bad combination, a ValueError saying which keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arcface_lightning.core.checks import check_choice, check_int, is_int, is_number, require
from arcface_lightning.data import augment as augmentation
from arcface_lightning.data import splits
from arcface_lightning.data.datasets import check_class_split
from arcface_lightning.data.sources import SOURCES

PIPELINES = ("tensor", "torchvision")
CACHES = ("none", "memory")
VAL_SPLITS = ("by_sample", "by_class")
LEGACY_AUGMENT_KEYS = ("degrees", "translate", "scale", "crop_padding")  # now data.augment.<key>


def check_settings(owner: str, given: Mapping[str, Any], legacy: Mapping[str, Any]) -> dict[str, Any]:
    """Check ImageDataModule's arguments (`given`, by name; `legacy`: the deprecated flat augment keys); return what
    is completed from them: the full augment node (the flat keys folded in), mean and std (null: 0.5 per channel)."""
    dataset, pipeline, channels = given["dataset"], given["pipeline"], given["in_channels"]
    check_choice(owner, "dataset", dataset, list(SOURCES))
    check_choice(owner, "pipeline", pipeline, PIPELINES)
    check_choice(owner, "cache", given["cache"], CACHES)
    check_choice(owner, "val_split", given["val_split"], VAL_SPLITS)
    if given["val_split"] == "by_class" and (given["train_classes"] or given["open_classes"]):
        raise ValueError(
            "data.val_split=by_class holds out classes itself; it takes no data.train_classes/open_classes"
        )
    source = SOURCES[dataset]
    if source.root_is is not None:
        require(owner, "root", given["root"], f"the path of {source.root_is}", bool)
    if pipeline != "tensor" and not source.per_sample_pipeline:
        raise ValueError(f"data.pipeline={pipeline} reads torchvision's sets; {dataset} uses pipeline=tensor")
    augment = augmentation.settings(owner, given["augment"], dict(legacy))
    for name in ("batch_size", "eval_batch_size", "in_channels", "image_size"):
        check_int(owner, name, given[name])
    counted = "null (counted from the data) or an integer ≥ 1"
    require(owner, "num_classes", given["num_classes"], counted, lambda v: v is None or (is_int(v) and v > 0))
    sizes = "an integer ≥ 1, or a fraction 0 < f < 1 of the training pool"
    require(owner, "val_size", given["val_size"], sizes, splits.is_size)
    require(
        owner, "test_size", given["test_size"], f"null (val_size) or {sizes}", lambda v: v is None or splits.is_size(v)
    )
    check_folds(owner, given)
    check_int(owner, "num_workers", given["num_workers"], minimum=0)
    check_int(owner, "split_seed", given["split_seed"], minimum=0)
    seed_ok = lambda v: v is None or (is_int(v) and v >= 0)  # noqa: E731
    require(owner, "shuffle_seed", given["shuffle_seed"], "null or an integer ≥ 0", seed_ok)
    mean = [0.5] * channels if given["mean"] is None else given["mean"]
    std = [0.5] * channels if given["std"] is None else given["std"]
    if given["normalize"]:
        per_channel = f"{channels} numbers (one per input channel)"
        for name, values in (("mean", mean), ("std", std)):
            require(owner, name, values, per_channel, lambda v: len(v) == channels and all(map(is_number, v)))
        require(owner, "std", std, "numbers > 0", lambda v: min(v) > 0)
    if given["on_device"] and (pipeline != "tensor" or given["num_workers"]):
        raise ValueError("data.on_device=true needs data.pipeline=tensor and data.num_workers=0")
    check_class_split(given["train_classes"], given["open_classes"], given["num_classes"])
    return {"augment": augment, "mean": mean, "std": std}


def check_folds(owner: str, given: Mapping[str, Any]) -> None:
    """data.folds (null: no cross-validation) and data.fold, the fold validated on; a source whose splits are fixed
    (a packed set) has no pool to fold."""
    folds, fold = given["folds"], given["fold"]
    allowed = "null (no cross-validation) or an integer ≥ 2"
    require(owner, "folds", folds, allowed, lambda v: v is None or (is_int(v) and v >= 2))
    if folds is None:
        without = "0 without data.folds (set data.folds=K ≥ 2 to cross-validate)"
        require(owner, "fold", fold, without, lambda v: is_int(v) and v == 0)
        return
    allowed = f"an integer 0 ≤ fold < {folds} (data.folds={folds})"
    require(owner, "fold", fold, allowed, lambda v: is_int(v) and 0 <= v < folds)
    if SOURCES[given["dataset"]].fixed_splits:
        raise ValueError(
            f"data.folds={folds} cannot fold data.dataset={given['dataset']}: its splits were drawn when it was made; "
            "allowed: data.folds=null, or folds of the images it was made from (data=image_folder)"
        )
