"""k-fold cross-validation (`data.folds=K data.fold=i`, `sweep=kfold`): the folds against their definition (disjoint,
covering the training pool, stratified or by identity), the test set untouched, the same folds in other processes
and on DDP ranks, the defaults unchanged, each bad value's one line, and a 3-fold multirun."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ranks import free_port, join, leave, start_ranks
from torch.utils.data import random_split
from torchvision.io import write_png

from arcface_lightning.data import ImageDataModule
from arcface_lightning.data.tensors import targets, unwrap

# conftest and the train command are imported in the tests that use them: other processes import this file for
# fold_indices and one_rank, and should pay for no more than the data module.
ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("ARCFACE_DATA_DIR", "")
HAS_MNIST = bool(DATA_DIR) and (Path(DATA_DIR) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
SIZES = [8, 9, 11, 13, 15, 10, 12]  # images per class: uneven, so that "±1 per fold" has something to say
IDENTITIES = [2, 3, 1, 4, 2, 5, 3, 2, 1, 6, 2, 3]  # by_class: classes of 1 image can never be held out


def write_folder(root: Path, sizes: list[int]) -> Path:
    """A class folder per size, of tiny distinct PNGs."""
    for c, size in enumerate(sizes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for k in range(size):
            write_png(torch.full((3, 8, 8), (7 * c + k) % 256, dtype=torch.uint8), str(root / f"c{c:02d}/{k}.png"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("kfold") / "uneven", SIZES)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("kfold") / "people", IDENTITIES)


def folder_module(root: Path, **settings) -> ImageDataModule:
    base = dict(dataset="image_folder", root=str(root), num_classes=None, in_channels=3, image_size=8, mean=None)
    dm = ImageDataModule(**{**base, "std": None, "val_size": 0.2, **settings})
    dm.count_classes()
    return dm


def splits(dm: ImageDataModule) -> dict[str, list[int]]:
    """The pool indices of each split (what the split drew, before any pipeline wraps it)."""
    train, val = dm.split.train_and_val()
    return {name: unwrap(ds)[1].tolist() for name, ds in (("train", train), ("val", val), ("test", dm.split.test()))}


def fold_indices(root: str, folds: int, **settings) -> list[list[int]]:
    """Each fold's validation indices for the folder at `root` (also run in other processes and on ranks)."""
    return [splits(folder_module(Path(root), folds=folds, fold=i, **settings))["val"] for i in range(folds)]


# -- the folds against their definition ----------------------------------------------------------------------------


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_by_sample_folds_partition_the_pool_left_by_the_test_split_stratified(folder: Path, folds: int) -> None:
    """No test_root: the held-out test split is the one drawn without folds; the folds partition the rest, each
    class's images spread over them ±1, and each fold trains on exactly the others."""
    plain = splits(folder_module(folder))
    labels = targets(folder_module(folder).source.pool(train=True))
    rest = sorted(set(range(len(labels))) - set(plain["test"]))
    vals = []
    for i in range(folds):
        split = splits(folder_module(folder, folds=folds, fold=i))
        assert split["test"] == plain["test"]  # the test set untouched, in the same order
        assert sorted(split["train"] + split["val"]) == rest and not set(split["train"]) & set(split["val"])
        vals.append(split["val"])
    assert sorted(k for fold in vals for k in fold) == rest  # disjoint folds covering the pool
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1
    for c in range(len(SIZES)):
        in_pool = sum(int(labels[k]) == c for k in rest)
        per_fold = [sum(int(labels[k]) == c for k in v) for v in vals]
        assert sorted(set(per_fold)) in ([in_pool // folds], [in_pool // folds, in_pool // folds + 1]), (c, per_fold)


def test_by_sample_folds_of_a_set_with_its_own_test_set_leave_that_test_set_alone(mnist_root: Path) -> None:
    """MNIST: the whole training pool is folded (data.val_size sizes nothing); the official test set is served."""
    kwargs = dict(data_dir=str(mnist_root), download=False, val_size=100)
    plain = ImageDataModule(**kwargs)
    plain.setup()
    vals = []
    for i in range(3):
        dm = ImageDataModule(**kwargs, folds=3, fold=i)
        dm.setup()
        split = splits(dm)
        vals.append(split["val"])
        assert sorted(split["train"] + split["val"]) == list(range(600))
        for (images, labels), (plain_images, plain_labels) in zip(
            dm.test_dataloader(), plain.test_dataloader(), strict=True
        ):
            assert torch.equal(images, plain_images) and torch.equal(labels, plain_labels)
        assert split["test"] == list(range(200))  # the official test set, whole
        assert len(dm.train_set) == 400 and len(dm.val_set) == 200  # through the pipeline as without folds
    assert sorted(k for fold in vals for k in fold) == list(range(600))
    labels = targets(plain.source.pool(train=True))
    for v in vals:  # 60 images a class: 20 in each fold
        assert torch.bincount(labels[v], minlength=10).tolist() == [20] * 10


def test_by_class_folds_hold_disjoint_whole_classes_and_keep_the_test_classes(people: Path) -> None:
    plain = folder_module(people, val_split="by_class", val_size=2, test_size=2)
    _, _, test_classes = plain.split.held_classes()
    eligible = [c for c, n in enumerate(IDENTITIES) if n >= 2 and c not in test_classes]
    val_classes = []
    for i in range(3):
        dm = folder_module(people, val_split="by_class", val_size=2, test_size=2, folds=3, fold=i)
        train, val, test = dm.split.held_classes()
        assert test == test_classes and splits(dm)["test"] == splits(plain)["test"]  # the test identities untouched
        assert not set(train) & set(val) and not set(train) & set(test)
        assert sorted(train + val + test) == list(range(len(IDENTITIES)))
        assert {c for c, n in enumerate(IDENTITIES) if n == 1} <= set(train)  # never a query without a match
        assert sorted(set(targets(dm.split.train_and_val()[1]).tolist())) == val  # the images: whole classes
        assert dm.count_classes() == len(train)  # the head learns this fold's training classes
        val_classes.append(val)
    assert sorted(k for fold in val_classes for k in fold) == eligible  # disjoint folds covering the eligible classes
    assert max(map(len, val_classes)) - min(map(len, val_classes)) <= 1


def test_folds_depend_on_the_split_seed_alone(folder: Path) -> None:
    first = fold_indices(str(folder), 3)
    assert fold_indices(str(folder), 3, shuffle_seed=7) == first  # the run's seed: the same folds
    assert fold_indices(str(folder), 3, split_seed=1) != first


@pytest.mark.slow
def test_the_same_folds_in_another_process(folder: Path) -> None:
    """Another interpreter, with a hash seed other than this one's (set and dict order), draws the folds this one
    draws."""
    code = "import json, sys; from test_kfold import fold_indices; print(json.dumps(fold_indices(sys.argv[1], 3)))"
    hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # this process: random, or the one it was given
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    other = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    expected = fold_indices(str(folder), 3)
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 0
    assert json.loads(out.strip().splitlines()[-1]) == expected


def one_rank(rank: int, world: int, port: int, root: str, expected: list[list[int]]) -> None:
    join(port, rank, world)
    mine = fold_indices(root, 3)
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    assert gathered == [expected] * world
    leave()


def test_the_same_folds_on_two_gloo_ranks(folder: Path) -> None:
    expected = fold_indices(str(folder), 3)
    start_ranks(one_rank, (2, free_port(), str(folder), expected), 2)


def test_without_folds_the_split_is_the_seeded_random_split_of_before(mnist_root: Path, folder: Path) -> None:
    """The default (folds null, fold 0) draws what torch's random_split draws with data.split_seed, as before k-fold
    existed; an image folder's test split too."""
    dm = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100, split_seed=3)
    expected = random_split(range(600), [500, 100, 0], generator=torch.Generator().manual_seed(3))
    assert splits(dm)["train"] == list(expected[0]) and splits(dm)["val"] == list(expected[1])
    explicit = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100, split_seed=3, folds=None)
    assert splits(explicit) == splits(dm)
    n = sum(SIZES)
    val = test = round(0.2 * n)
    expected = random_split(range(n), [n - val - test, val, test], generator=torch.Generator().manual_seed(0))
    assert list(splits(folder_module(folder)).values()) == [list(part) for part in expected]


@pytest.mark.real_data
@pytest.mark.skipif(not HAS_MNIST, reason="ARCFACE_DATA_DIR has no MNIST/raw")
def test_five_folds_of_real_mnist() -> None:
    labels = None
    vals = []
    for i in range(5):
        dm = ImageDataModule(data_dir=DATA_DIR, download=False, folds=5, fold=i)
        split = splits(dm)
        assert len(split["train"]) + len(split["val"]) == 60_000 and not set(split["train"]) & set(split["val"])
        labels = targets(dm.source.pool(train=True)) if labels is None else labels
        vals.append(split["val"])
    assert sorted(k for fold in vals for k in fold) == list(range(60_000))
    counts = np.array([torch.bincount(labels[v], minlength=10).tolist() for v in vals])
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all() and len(split["test"]) == 10_000


# -- bad values: one line, before training ---------------------------------------------------------------------------

BAD = [
    (["data.folds=1"], "data.folds=1 is invalid; allowed: null (no cross-validation) or an integer ≥ 2 (ImageDataMod"),
    (["data.folds=abc"], "data.folds='abc' is invalid; allowed: null (no cross-validation) or an integer ≥ 2 (Image"),
    (["data.folds=3", "data.fold=3"], "data.fold=3 is invalid; allowed: an integer 0 ≤ fold < 3 (data.folds=3) (Ima"),
    (["data.folds=3", "data.fold=-1"], "data.fold=-1 is invalid; allowed: an integer 0 ≤ fold < 3 (data.folds=3)"),
    (["data.fold=2"], "data.fold=2 is invalid; allowed: 0 without data.folds (set data.folds=K ≥ 2 to cross-validate)"),
    (
        ["data.folds=61"],
        "data.folds=61 is more than class '0 - zero' has images in the training pool (60); allowed: 2 ≤ folds ≤ 60 "
        "with data.val_split=by_sample (every fold holds every class)",
    ),
    (
        ["data=streaming", "data.root=/no/such", "data.folds=3"],
        "data.folds=3 cannot fold data.dataset=streaming: its splits were drawn when it was made; allowed: data.folds",
    ),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_fold_values_fail_in_one_line(mnist_root: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    from arcface_lightning.core.runs import run
    from arcface_lightning.train import train
    from conftest import tiny_config

    cfg = tiny_config(mnist_root, tmp_path / "run", *overrides)
    with pytest.raises(SystemExit) as exit_info:
        run(train, cfg)
    line = str(exit_info.value)
    assert line.startswith(f"error: {message}") and "\n" not in line, line
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and f"error: {record['error']}" == line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_by_class_folds_than_classes_is_one_line_on_the_command_line(people: Path, tmp_path: Path) -> None:
    from conftest import cli

    result = cli(
        "train", f"hydra.run.dir={tmp_path / 'run'}", "data=image_folder", f"data.root={people}",
        "data.val_split=by_class", "data.val_size=2", "data.folds=9",
    )  # fmt: skip
    line = (
        "error: data.folds=9 is more than the 8 classes with 2 images or more outside the test classes; allowed: "
        "2 ≤ folds ≤ 8 with data.val_split=by_class (a fold holds whole classes)"
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == line, result.stderr[-2000:]


# -- sweep=kfold ---------------------------------------------------------------------------------------------------


def test_the_preset_sweeps_data_fold_over_data_folds() -> None:
    from conftest import compose_config

    cfg = compose_config("sweep=kfold", return_hydra_config=True)
    assert cfg.data.folds == 5 and cfg.hydra.sweeper.params["data.fold"] == "range(0,5)"
    cfg = compose_config("sweep=kfold", "data.folds=3", "head.s=16", "seed=2", return_hydra_config=True)
    assert cfg.hydra.sweeper.params["data.fold"] == "range(0,3)" and cfg.hydra.mode.name == "MULTIRUN"


@pytest.mark.slow
def test_a_three_fold_multirun_runs_one_job_per_fold(tmp_path: Path) -> None:
    from conftest import TINY, cli, write_mnist

    root = write_mnist(tmp_path / "data", n_train=300, n_test=100)
    sweep = tmp_path / "sweep"
    result = cli(
        "train", "sweep=kfold", "data.folds=3", f"hydra.sweep.dir={sweep}", f"paths.data_dir={root}", "~experiment",
        *TINY, "trainer.limit_train_batches=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"]
    for job in jobs:
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert f"data.fold={job}" in overrides and "data.folds=3" in overrides
        record = json.loads((sweep / job / "metrics.json").read_text())
        assert record["status"] == "ok" and 0 <= record["test/acc"] <= 1, record
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert (config["data"]["folds"], config["data"]["fold"]) == (3, int(job))
    # the report at the end: one row for the one grid point, its three folds as replicates, mean and std over them
    with open(sweep / "summary_seeds.csv", newline="") as file:
        (row,) = list(csv.DictReader(file))
    accuracies = [json.loads((sweep / job / "metrics.json").read_text())["val/acc_best"] for job in jobs]
    assert (row["folds"], row["n"], row["failed"]) == ("3", "3", "0")
    assert float(row["val/acc_best mean"]) == pytest.approx(statistics.mean(accuracies), abs=1e-4)
    assert float(row["val/acc_best std"]) == pytest.approx(statistics.stdev(accuracies), abs=1e-4)
