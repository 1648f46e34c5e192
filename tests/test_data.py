"""The data module on synthetic files in torchvision's own formats, read through torchvision's own classes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from arcface_lightning.data import DataError, ImageDataModule
from arcface_lightning.data.augment import DEFAULTS as augment_defaults
from arcface_lightning.data.augment import _warp, random_affine, random_crop_flip
from arcface_lightning.data.sources import SOURCES, Source, register_source
from arcface_lightning.data.sources.torchvision_sets import TorchvisionSet
from arcface_lightning.train import train
from conftest import tiny_config, write_mnist


def test_mnist_split_sizes_batches_and_normalisation(mnist_root: Path) -> None:
    dm = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100, batch_size=32, eval_batch_size=50)
    dm.prepare_data()  # download off: touches nothing
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (500, 100)
    assert dm.test_set is None  # fit does not load the test set
    dm.setup("test")
    assert len(dm.test_set) == 200
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.uint8  # the tensor pipeline's raw batch
    images, labels = dm.on_after_batch_transfer((images, labels), 0)  # what Lightning does on the device
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
    images, labels = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and labels.max() < 10


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


def test_labels_are_checked_once_when_the_splits_are_built(tmp_path: Path) -> None:
    """The heads skip the label-range check on accelerators (a host sync per step); the data module makes it once."""
    root = write_mnist(tmp_path / "data", num_classes=12)  # IDX labels 10 and 11 in a 10-class MNIST
    dm = ImageDataModule(data_dir=str(root), download=False, val_size=100)
    with pytest.raises(DataError, match=r"^MNIST train set has label 10; allowed: 0 ≤ label < data.num_classes=10$"):
        dm.setup("fit")
    with pytest.raises(DataError, match=r"^MNIST test set has label 10; "):
        dm.setup("test")


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
    with pytest.raises(DataError, match=r"^data.val_size=600 leaves no training data; allowed: 1 ≤ val_size < 600$"):
        ImageDataModule(data_dir=str(mnist_root), download=False, val_size=600).setup("fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "SVHN"}, r"^ImageDataModule: dataset='SVHN' is invalid; allowed: MNIST, FashionMNIST, KMNIST, "),
        ({"batch_size": 0}, r"^ImageDataModule: batch_size=0 is invalid; allowed: an integer ≥ 1$"),
        ({"mean": (0.1, 0.2)}, r"^ImageDataModule: mean=\(0.1, 0.2\) is invalid; allowed: 1 numbers \(one per input"),
        ({"std": (0.0,)}, r"^ImageDataModule: std=\(0.0,\) is invalid; allowed: numbers > 0$"),
        ({"batch_size": "abc"}, r"^ImageDataModule: batch_size='abc' is invalid; allowed: an integer ≥ 1$"),
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
    # the tensor pipeline serves the same samples with the same labels
    for split, loader in ((dm.test_set, closed), (dm.open_set, open_)):
        assert torch.cat([labels for _, labels in loader]).tolist() == labels_of(split)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"train_classes": [0, 1], "open_classes": [1, 2], "num_classes": 2},
            r"share \[1\]; open classes must be unseen",
        ),
        ({"train_classes": [], "num_classes": 1}, r"data.train_classes=\[\] must be a non-empty list"),
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


def batches(dm: ImageDataModule, loader: str, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first batches of a loader as the model receives them (after on_after_batch_transfer)."""
    iterator = iter(getattr(dm, f"{loader}_dataloader")())
    return [dm.on_after_batch_transfer(next(iterator), 0) for _ in range(count)]


@pytest.mark.parametrize("dataset", ["MNIST", "CIFAR10"])
def test_tensor_and_torchvision_pipelines_give_identical_batches(
    dataset: str, mnist_root: Path, cifar10_root: Path
) -> None:
    settings = {"MNIST": {"data_dir": str(mnist_root)}, "CIFAR10": {"data_dir": str(cifar10_root), "in_channels": 3}}
    extra = {"image_size": 32, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)} if dataset == "CIFAR10" else {}
    kwargs = {"dataset": dataset, "download": False, "val_size": 100, "batch_size": 16, "eval_batch_size": 40}
    modules = {
        pipeline: ImageDataModule(pipeline=pipeline, shuffle_seed=3, **kwargs, **settings[dataset], **extra)
        for pipeline in ("tensor", "torchvision")
    }
    for dm in modules.values():
        dm.setup()
    for loader in ("train", "val", "test"):
        for (fast, fast_labels), (classic, classic_labels) in zip(
            batches(modules["tensor"], loader), batches(modules["torchvision"], loader), strict=True
        ):
            assert fast.dtype == classic.dtype == torch.float32 and fast.shape == classic.shape
            assert torch.equal(fast, classic) and torch.equal(fast_labels, classic_labels)


def test_tensor_pipeline_loads_the_decoded_arrays_not_pil(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100)
    dm.setup()
    monkeypatch.setattr(datasets.MNIST, "__getitem__", lambda *_: pytest.fail("per-sample PIL path used"))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and len(labels) == 64


def test_crop_flip_moves_whole_pixels_and_mirrors() -> None:
    images = torch.rand(64, 3, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for image, result in zip(padded, out, strict=True):
        crops = [image[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        plain = any(torch.equal(result, crop) for crop in crops)
        mirrored = any(torch.equal(result, crop.flip(-1)) for crop in crops)
        assert plain or mirrored  # exactly some padded crop of the input, possibly flipped
        flips += mirrored and not plain
    assert 16 < flips < 48  # about half are flipped


def test_affine_with_no_range_is_the_identity_and_rotation_is_a_rotation() -> None:
    images = torch.rand(4, 1, 12, 12)
    same = random_affine(images, torch.Generator().manual_seed(0), degrees=0, translate=0, scale=(1.0, 1.0))
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    quarter = torch.full((4,), math.pi / 2)
    no_flip = torch.zeros(4, dtype=torch.bool)
    rotated = _warp(images, quarter, torch.ones(4), (torch.zeros(4), torch.zeros(4)), no_flip)
    torch.testing.assert_close(rotated, images.rot90(1, (2, 3)), atol=1e-5, rtol=0)
    shifted = _warp(images, torch.zeros(4), torch.ones(4), (torch.full((4,), 2 / 12), torch.zeros(4)), no_flip)
    torch.testing.assert_close(shifted[..., 2:], images[..., :-2], atol=1e-5, rtol=0)  # content moves right
    assert shifted[..., :2].abs().max() < 1e-6  # zero fill


def test_the_augment_node_its_kind_alone_and_the_deprecated_keys_are_one_setting() -> None:
    """data.augment is one node; a kind alone takes the default ranges; the flat keys it replaced still work, with
    a FutureWarning, and checkpoints hold the whole node only."""
    node = {"kind": "affine", "degrees": 0.0, "translate": 0.0, "scale": [1.0, 1.0], "crop_padding": 4}
    full = ImageDataModule(augment=node, normalize=False)
    with pytest.warns(FutureWarning, match=r"^data.degrees, data.translate, data.scale: deprecated, now data.augm"):
        legacy = ImageDataModule(augment="affine", degrees=0.0, translate=0.0, scale=[1.0, 1.0], normalize=False)
    assert full.hparams.augment == legacy.hparams.augment == {**node, "scale": (1.0, 1.0)}
    assert not {"degrees", "translate", "scale", "crop_padding"} & set(legacy.hparams)
    assert ImageDataModule(augment="crop_flip").hparams.augment == {**augment_defaults, "kind": "crop_flip"}
    assert ImageDataModule(augment={"kind": "crop_flip"}).hparams.augment["crop_padding"] == 4
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    plain = full.prepare(images.clone())
    for dm in (full, legacy):  # the node's ranges reach the batch: no range at all is the identity
        torch.testing.assert_close(
            dm.prepare(images.clone(), torch.Generator().manual_seed(0)), plain, atol=1e-5, rtol=0
        )
    default = ImageDataModule(augment="affine", normalize=False)
    assert not torch.allclose(default.prepare(images.clone(), torch.Generator().manual_seed(0)), plain, atol=1e-2)


@pytest.mark.parametrize("augment", ["affine", "crop_flip"])
def test_augmentation_only_in_training_and_seeded_per_epoch(mnist_root: Path, augment: str) -> None:
    dm = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100, augment=augment, normalize=False)
    dm.setup()
    raw = next(iter(dm.train_dataloader()))
    plain, _ = dm.on_after_batch_transfer(raw, 0)  # no trainer, or not training: no augmentation
    torch.testing.assert_close(plain, raw[0].float() / 255)
    trainer = SimpleNamespace(training=True, current_epoch=0, global_rank=0)
    dm.trainer = trainer
    first, _ = dm.on_after_batch_transfer(raw, 0)
    second, _ = dm.on_after_batch_transfer(raw, 0)
    assert not torch.equal(first, plain) and not torch.equal(first, second)  # fresh draws per batch
    trainer.current_epoch = 1
    dm.on_after_batch_transfer(raw, 0)
    trainer.current_epoch = 0  # back to epoch 0 (a resumed run): the same draws again
    assert torch.equal(dm.on_after_batch_transfer(raw, 0)[0], first)
    assert 0 <= first.min() and first.max() <= 1


def test_torchvision_pipeline_augments_the_training_split_only(mnist_root: Path) -> None:
    dm = ImageDataModule(
        data_dir=str(mnist_root), download=False, val_size=100, pipeline="torchvision", augment="affine"
    )
    dm.setup("fit")
    assert any(isinstance(t, transforms.RandomAffine) for t in dm.train_set.dataset.transform.transforms)
    assert not any(isinstance(t, transforms.RandomAffine) for t in dm.val_set.dataset.transform.transforms)
    assert len(dm.train_set) == 500 and not set(dm.train_set.indices) & set(dm.val_set.indices)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pipeline": "dali"}, r"^ImageDataModule: pipeline='dali' is invalid; allowed: tensor, torchvision$"),
        ({"augment": "mixup"}, r"^ImageDataModule: augment='mixup' is invalid; allowed: null, affine, crop_flip$"),
        ({"on_device": True, "pipeline": "torchvision"}, r"data.on_device=true needs data.pipeline=tensor"),
        ({"on_device": True, "num_workers": 2}, r"and data.num_workers=0"),
        (
            {"augment": {"degrees": 200}},
            r"^ImageDataModule: augment.degrees=200 is invalid; allowed: 0 ≤ degrees ≤ 180$",
        ),
        (
            {"augment": {"scale": (1.2, 0.8)}},
            r"^ImageDataModule: augment.scale=\(1.2, 0.8\) is invalid; allowed: \[low, high\] with 0 < ",
        ),
        (
            {"augment": {"kind": "affine", "angle": 3}},
            r"^ImageDataModule: augment=\{'kind': 'affine', 'angle': 3\} is ",
        ),
    ],
)
def test_bad_pipeline_settings_raise_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageDataModule(**kwargs)


def test_without_a_seed_every_rank_shuffles_with_rank_zeros_draw(mnist_root: Path) -> None:
    """shuffle_seed=null: one seed for the run, broadcast from rank zero (different seeds per rank would make the
    DistributedSampler's shards overlap), kept for every epoch's loader."""
    drawn = []

    def broadcast(value: int, src: int = 0) -> int:
        drawn.append(value)
        return 12345  # what rank zero drew

    dm = ImageDataModule(data_dir=str(mnist_root), download=False, val_size=100, shuffle_seed=None)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=broadcast), world_size=2, global_rank=1)
    dm.setup("fit")
    assert len(drawn) == 1 and dm.seed == 12345
    first, again = dm.train_dataloader(), dm.train_dataloader()
    assert first.sampler.seed == again.sampler.seed == 12345 and first.sampler.rank == 1
    assert len(first.sampler) == 250  # half of the 500 training images


def test_the_open_set_and_the_test_set_share_one_load(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = ImageDataModule(
        data_dir=str(mnist_root), download=False, num_classes=5, train_classes=[0, 1, 2, 3, 4], open_classes=[5, 6]
    )
    loads = []
    original = TorchvisionSet.load  # the source reads its files here, once per pool
    monkeypatch.setattr(TorchvisionSet, "load", lambda self, train: loads.append(train) or original(self, train))
    dm.setup("test")
    assert loads == [False]
    assert sorted(set(labels_of(dm.test_set))) == [0, 1, 2, 3, 4]  # relabelled for the head
    assert sorted(set(labels_of(dm.open_set))) == [5, 6]  # the original ids


class Squares(Dataset):
    """A toy data set: 28×28 grey noise with a bright square whose row is the class (10 classes), as uint8 (1, H, W)
    samples with torchvision's dataset attributes (`targets`, `classes`, `target_transform`)."""

    def __init__(self, per_class: int) -> None:
        self.targets = torch.arange(10).repeat(per_class)
        self.images = torch.randint(0, 60, (len(self.targets), 1, 28, 28), generator=torch.Generator().manual_seed(0))
        for image, label in zip(self.images, self.targets.tolist(), strict=True):
            image[:, 2 * label : 2 * label + 6, 10:16] = 255
        self.images = self.images.to(torch.uint8)
        self.classes = [f"square_{c}" for c in range(10)]
        self.target_transform = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = int(self.targets[i])
        return self.images[i], self.target_transform(label) if self.target_transform else label


class SquaresSource(Source):
    """A new source, whole: its pool and that its class names are the data module's. No test set of its own: the
    split holds one out of the pool."""

    keeps_class_names = True

    def load(self, train: bool) -> Dataset:
        return Squares(per_class=30)


@pytest.fixture
def squares_source():
    register_source("squares", SquaresSource)
    yield
    del SOURCES["squares"]


def test_a_new_source_is_one_class_and_one_registration(squares_source, tmp_path: Path) -> None:
    """A source added outside the package trains through the data module, splits, pipeline and train command as
    they are: `data.dataset=<its name>` is all the config needs."""
    dm = ImageDataModule(dataset="squares", num_classes=None, val_size=50, mean=None, std=None)
    assert dm.count_classes() == 10 and dm.classes == [f"square_{c}" for c in range(10)]
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (200, 50, 50)  # test held out of the pool
    drawn = [set(split.indices) for split in (dm.train_set, dm.val_set, dm.test_set)]
    assert len(set.union(*drawn)) == 300  # disjoint
    images, labels = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32 and labels.max() < 10

    cfg = tiny_config(
        tmp_path, tmp_path / "run", "data.dataset=squares", "data.num_classes=null", "trainer.fast_dev_run=2"
    )
    metrics = train(cfg)
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test/acc"] <= 1.0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == [f"square_{c}" for c in range(10)]
