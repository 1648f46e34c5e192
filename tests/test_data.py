"""The data module on synthetic files in torchvision's own formats, read through torchvision's own classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import datasets

from arcface_lightning.data import DataError, ImageDataModule
from conftest import write_mnist


def test_mnist_split_sizes_batches_and_normalisation(mnist_root: Path) -> None:
    dm = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100, batch_size=32, eval_batch_size=50)
    dm.prepare_data()  # download off: touches nothing
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (500, 100)
    assert dm.test_set is None  # fit does not load the test set
    dm.setup("test")
    assert len(dm.test_set) == 200
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() < 0  # normalised with MNIST's mean and std
    images, _ = next(iter(dm.test_dataloader()))
    assert images.shape == (50, 1, 28, 28)


def test_split_is_fixed_by_split_seed_and_disjoint(mnist_root: Path) -> None:
    def split(seed: int) -> tuple[list[int], list[int]]:
        dm = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100, split_seed=seed)
        dm.setup("fit")
        return list(dm.train_set.indices), list(dm.val_set.indices)

    train, val = split(0)
    assert split(0) == (train, val)
    assert split(1)[1] != val
    assert not set(train) & set(val) and len(set(train) | set(val)) == 600


def test_seed_recipe_keeps_to_tensor_only(mnist_root: Path) -> None:
    dm = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100, normalize=False)
    dm.setup("fit")
    image, _ = dm.train_set[0]
    assert 0.0 <= image.min() and image.max() <= 1.0


@pytest.mark.parametrize("name", ["FashionMNIST", "KMNIST"])
def test_other_mnist_format_sets(tmp_path: Path, name: str) -> None:
    root = write_mnist(tmp_path, name=name, n_train=300, n_test=50)
    dm = ImageDataModule(dataset=name, data_dir=str(root), download=False, val_size=50)
    dm.setup("fit")
    assert isinstance(dm.train_set.dataset, getattr(datasets, name))
    assert (len(dm.train_set), len(dm.val_set)) == (250, 50)


def test_cifar10_format(cifar10_root: Path) -> None:
    dm = ImageDataModule(
        dataset="CIFAR10",
        data_dir=str(cifar10_root),
        download=False,
        in_channels=3,
        image_size=32,
        val_size=100,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        batch_size=16,
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (400, 100, 100)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and labels.max() < 10


def test_missing_data_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    dm = ImageDataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "MNIST train set not found in" in message and str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "paths.data_dir=" in message and "data.download=true" in message and "\n" not in message


def test_corrupt_file_is_reported_as_unreadable(mnist_root: Path) -> None:
    images = mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # truncated
    with pytest.raises(DataError, match=r"MNIST train set unreadable \(.*\) in .*; delete those files"):
        ImageDataModule(data_dir=str(mnist_root), download=False).setup("fit")


def test_failed_download_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed loopback port: the download fails at once, and nothing leaves the machine.
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    dm = ImageDataModule(data_dir=str(tmp_path / "data"), download=True)
    with pytest.raises(DataError, match=r"could not download MNIST into .*MNIST/raw: .*data.download=false"):
        dm.prepare_data()


def test_config_must_match_the_files(mnist_root: Path) -> None:
    with pytest.raises(DataError, match=r"data.num_classes=5 but MNIST has 10"):
        ImageDataModule(data_dir=str(mnist_root), download=False, num_classes=5).setup("fit")
    with pytest.raises(DataError, match=r"images are \(1, 28, 28\) but the data config says \(3, 28, 28\)"):
        ImageDataModule(data_dir=str(mnist_root), download=False, in_channels=3, mean=(0,) * 3, std=(1,) * 3).setup()
    with pytest.raises(ValueError, match=r"data.val_size=600 leaves no training data"):
        ImageDataModule(data_dir=str(mnist_root), download=False, val_size=600).setup("fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "SVHN"}, r"data.dataset='SVHN' is not supported; allowed: MNIST, FashionMNIST"),
        ({"batch_size": 0}, r"data.batch_size=0 is out of range"),
        ({"mean": (0.1, 0.2)}, r"data.mean/std need 1 values"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageDataModule(**kwargs)


def labels_of(dataset) -> list[int]:
    return [int(label) for _, label in dataset]


def test_open_set_split_keeps_unseen_classes_out_of_training(mnist_root: Path) -> None:
    dm = ImageDataModule(
        data_dir=str(mnist_root),
        download=False,
        val_size=50,
        num_classes=3,
        train_classes=[7, 2, 5],
        open_classes=[0, 9],
    )
    dm.setup()
    # training and validation see only 7, 2, 5 — relabelled 0, 1, 2 for the 3-class head
    assert len(dm.train_set) + len(dm.val_set) == 180 and set(labels_of(dm.train_set)) == {0, 1, 2}
    assert set(labels_of(dm.val_set)) <= {0, 1, 2}
    raw = dm.train_set.dataset.dataset.targets  # Subset (split) of Subset (classes) of MNIST
    kept = [dm.train_set.dataset.indices[i] for i in dm.train_set.indices]
    assert set(raw[kept].tolist()) == {7, 2, 5}
    assert set(labels_of(dm.test_set)) == {0, 1, 2} and len(dm.test_set) == 60
    assert set(labels_of(dm.open_set)) == {0, 9} and len(dm.open_set) == 40  # original ids, unseen classes only
    closed, open_ = dm.test_dataloader()
    assert len(closed.dataset) == 60 and len(open_.dataset) == 40


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"train_classes": [0, 1], "open_classes": [1, 2], "num_classes": 2},
            r"share \[1\]; open classes must be unseen",
        ),
        ({"train_classes": [], "num_classes": 0}, r"data.train_classes=\[\] must be a non-empty list"),
        (
            {"train_classes": [0, 1], "open_classes": [], "num_classes": 2},
            r"data.open_classes=\[\] must be a non-empty",
        ),
        ({"train_classes": [0, 0], "num_classes": 2}, r"distinct class ids"),
        ({"train_classes": [0, 1, 2], "num_classes": 10}, r"data.num_classes=10 but data.train_classes has 3"),
        ({"open_classes": [5]}, r"data.open_classes needs data.train_classes"),
    ],
)
def test_bad_class_splits_raise_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageDataModule(**kwargs)


def test_a_class_the_dataset_lacks_is_one_clear_error(mnist_root: Path) -> None:
    dm = ImageDataModule(data_dir=str(mnist_root), download=False, num_classes=2, train_classes=[3, 12])
    with pytest.raises(DataError, match=r"^class 12 is not in MNIST \(classes 0..9\)$"):
        dm.setup("fit")
