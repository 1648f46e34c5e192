"""A user's own images: class folders and CSV lists, decoded by torchvision.io, through the data module and training.

The images are real MNIST digits written as PNG files where ARCFACE_DATA_DIR holds MNIST (as in CI), otherwise the
synthetic digits of conftest, in the same formats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torchvision.io import encode_png, write_png
from torchvision.transforms.v2 import functional as TF

from arcface_lightning.core.checks import first_line
from arcface_lightning.core.runs import run
from arcface_lightning.data import DataError, ImageDataModule, files
from arcface_lightning.data.files import read_list, scan_folder
from arcface_lightning.data.images import ImageFiles
from arcface_lightning.evaluate import evaluate
from arcface_lightning.train import train
from conftest import class_images, compose_config, tiny_config, write_mnist

DATA_DIR = os.environ.get("ARCFACE_DATA_DIR", "")
PER_CLASS = 30


def read_image(path: str, in_channels: int, image_size: int) -> torch.Tensor:
    """files.read_image (a NumPy uint8 array) as the tensor the datasets serve."""
    return torch.from_numpy(files.read_image(path, in_channels, image_size))


def digits(n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels): the first n of each digit of real MNIST's training set, or synthetic."""
    raw = Path(DATA_DIR) / "MNIST" / "raw"
    if (raw / "train-images-idx3-ubyte").is_file():
        images = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
        labels = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
        keep = np.concatenate([np.flatnonzero(labels == d)[:n_per_class] for d in range(10)])
        return images[keep], labels[keep]
    labels = np.repeat(np.arange(10), n_per_class)
    return class_images(labels, 28, 1, seed=3)[..., 0], labels


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str] | None = None) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / (names[label] if names else f"digit_{label}")
        folder.mkdir(parents=True, exist_ok=True)
        write_png(torch.from_numpy(image.copy())[None], str(folder / f"{i:05d}.png"))
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images, labels = digits(PER_CLASS)
    root = write_folder(tmp_path / "faces", images, labels)
    (root / "digit_3" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    return root


def test_a_class_folder_is_indexed_in_sorted_order_with_skips_reported(folder: Path) -> None:
    index = scan_folder(folder)
    assert index.classes == [f"digit_{d}" for d in range(10)]  # empty_class has no id
    assert len(index.paths) == 10 * PER_CLASS and index.labels == sorted(index.labels)
    assert index.paths[:2] == [str(folder / "digit_0" / "00000.png"), str(folder / "digit_0" / "00001.png")]
    assert index.notes == [
        "1 class folder(s) with no images skipped (first: empty_class)",
        "1 file(s) that are not images ignored",
    ]
    assert scan_folder(folder) == index  # deterministic


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "nope", r"^data.root=.*nope is not a folder; give a folder with one sub-folder"),
        (lambda root: root, r"^data.root=.* has no class sub-folders; expected .*/<class>/<images> \(ImageFolder\)$"),
        (lambda root: (root / "a").mkdir() or root, r"^data.root=.* has no images in its class folders \(read: "),
    ],
    ids=["missing", "no class folders", "no images"],
)
def test_a_folder_that_cannot_be_used_says_why(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError, match=message):
        scan_folder(make(root))


def test_a_csv_list_reads_relative_paths_and_maps_sparse_labels_in_order(folder: Path) -> None:
    (folder / "list.csv").write_text(
        "path,label\ndigit_0/00000.png,7\ndigit_1/00030.png,42\n\ndigit_0/00001.png,7\nempty_class/../digit_2/00060.png,3\n"
    )
    index = read_list(folder / "list.csv")
    assert index.classes == ["3", "7", "42"] and index.labels == [1, 2, 1, 0]
    assert index.paths[0] == os.path.join(folder, "digit_0/00000.png")


@pytest.mark.parametrize(
    "text, message",
    [
        ("digit_0/00000.png,seven\n", r"list.csv:1: label 'seven' is not an integer$"),
        ("digit_0/00000.png,1\ndigit_0/00001.png\n", r"list.csv:2: expected path,label, got 1 field\(s\): 'digit_0/"),
        ("digit_0/00000.png,1\nnope.png,1\nnope2.png,2\n", r"list.csv names 2 missing file\(s\), the first .*/nope.pn"),
        ("path,label\n", r"list.csv lists no images$"),
    ],
    ids=["label", "fields", "missing", "empty"],
)
def test_a_bad_csv_list_fails_in_one_line_naming_the_row(folder: Path, text: str, message: str) -> None:
    (folder / "list.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        read_list(folder / "list.csv")


def test_images_are_converted_resized_and_centre_cropped(tmp_path: Path) -> None:
    rgb = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    write_png(rgb, str(tmp_path / "wide.png"))
    out = read_image(str(tmp_path / "wide.png"), in_channels=3, image_size=28)
    expected = TF.center_crop(TF.resize(rgb, 28, antialias=True), [28, 28])  # shorter side 40 → 28, then 28 × 28
    assert out.dtype == torch.uint8 and torch.equal(out, expected)
    gray = read_image(str(tmp_path / "wide.png"), in_channels=1, image_size=28)
    assert gray.shape == (1, 28, 28)
    (tmp_path / "digit.png").write_bytes(encode_png(rgb[:1, :28, :28]).numpy().tobytes())
    assert torch.equal(read_image(str(tmp_path / "digit.png"), 1, 28), rgb[:1, :28, :28])  # no resize: exact
    assert read_image(str(tmp_path / "digit.png"), 3, 28).shape == (3, 28, 28)  # grayscale → RGB


def test_an_unreadable_image_is_named_also_from_a_loader_worker(folder: Path) -> None:
    bad = folder / "digit_5" / "00155.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=rf"^unreadable image {bad}: "):
        read_image(str(bad), 1, 28)
    dataset = ImageFiles(scan_folder(folder), in_channels=1, image_size=28)
    loader = torch.utils.data.DataLoader(dataset, batch_size=400, num_workers=1)
    with pytest.raises(DataError) as error:
        next(iter(loader))
    assert first_line(error.value).startswith(f"unreadable image {bad}: ")  # what the entry points print


def image_module(root: Path, **kwargs) -> ImageDataModule:
    settings = {"dataset": "image_folder", "root": str(root), "num_classes": None, "val_size": 0.1}
    settings.update(in_channels=1, image_size=28, mean=None, std=None, batch_size=50, eval_batch_size=100)
    return ImageDataModule(**{**settings, **kwargs})


def test_folder_splits_are_seeded_disjoint_and_cached_or_streamed_alike(folder: Path) -> None:
    streamed, cached = image_module(folder), image_module(folder, cache="memory")
    assert streamed.count_classes() == 10 and streamed.classes == [f"digit_{d}" for d in range(10)]
    for dm in (streamed, cached):
        dm.setup()
    assert (len(streamed.train_set), len(streamed.val_set), len(streamed.test_set)) == (240, 30, 30)
    splits = [set(s.indices) for s in (streamed.train_set, streamed.val_set, streamed.test_set)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    for split in ("train", "val", "test"):
        a = next(iter(getattr(streamed, f"{split}_dataloader")()))
        b = next(iter(getattr(cached, f"{split}_dataloader")()))
        assert a[0].dtype == torch.uint8 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), split
    images, _ = streamed.on_after_batch_transfer(a, 0)
    assert images.dtype == torch.float32 and -1 <= images.min() and images.max() <= 1  # mean = std = 0.5
    assert streamed.state_dict() == {"classes": streamed.classes}


def test_a_test_folder_gets_the_training_classes_ids_by_name(folder: Path, tmp_path: Path) -> None:
    images, labels = digits(3)
    keep = labels >= 5  # a test folder with only some of the classes
    test = write_folder(tmp_path / "test", images[keep], labels[keep])
    dm = image_module(folder, test_root=str(test))
    dm.setup()
    assert len(dm.test_set) == 15 and len(dm.train_set) + len(dm.val_set) == 300
    assert sorted(set(dm.test_set.targets.tolist())) == [5, 6, 7, 8, 9]  # digit_5 is class 5 of the training set
    (test / "digit_x").mkdir()
    write_png(torch.zeros(1, 28, 28, dtype=torch.uint8), str(test / "digit_x" / "a.png"))
    with pytest.raises(DataError, match=r"data.test_root=.* has 1 class\(es\) the training data lacks \(first: digit_"):
        image_module(folder, test_root=str(test)).setup("test")


def test_image_folder_trains_counts_its_classes_and_saves_their_names(folder: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        tmp_path / "run",
        "data=image_folder",
        f"data.root={folder}",
        "data.in_channels=1",
        "data.image_size=28",
        "data.val_size=30",
        "data.num_workers=0",
        "trainer.max_epochs=6",
        "optimizer.lr=0.01",
        "head.s=10",
        "head.m=0.1",
    )
    metrics = run(train, cfg)
    names = json.loads((tmp_path / "run" / "classes.json").read_text())
    assert names == [f"digit_{d}" for d in range(10)] and metrics["test/acc"] > 0.5, metrics
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    assert checkpoint["ImageDataModule"] == {"classes": names}
    assert checkpoint["state_dict"]["head.weight"].shape == (10, 16)
    cfg = compose_config(
        f"ckpt_path={metrics['best_checkpoint']}",
        f"data.root={folder}",  # where the folder is now; every other data setting comes from the checkpoint
        "trainer=cpu",
        "logger=csv",
        config_name="eval",
    )
    cfg.paths.output_dir = str(tmp_path / "eval")
    evaluated = run(evaluate, cfg)  # the same held-out test split, from the folder and the checkpoint alone
    for key in ("test/acc", "test/loss", "test/map_at_r"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_an_image_list_in_mnist_order_trains_exactly_as_the_mnist_files(tmp_path: Path) -> None:
    """The same images, in the same order, through data=image_list (PNG files, torchvision.io) and data=mnist (IDX
    files, the tensor pipeline): the same splits and batches, so the same trained model and test numbers."""
    mnist = write_mnist(tmp_path / "data")
    lists = {}
    for split, train_split in (("train", True), ("test", False)):
        dataset = __import__("torchvision").datasets.MNIST(str(mnist), train=train_split)
        rows = []
        for i, (image, label) in enumerate(zip(dataset.data, dataset.targets, strict=True)):
            path = tmp_path / "png" / split / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(image[None], str(path))
            rows.append(f"{split}/{i:05d}.png,{int(label)}")
        lists[split] = tmp_path / "png" / f"{split}.csv"
        lists[split].write_text("\n".join(rows) + "\n")
    common = ["trainer.max_epochs=2", "data.val_size=100"]
    reference = run(train, tiny_config(mnist, tmp_path / "mnist", *common))
    from_list = run(
        train,
        tiny_config(
            mnist,
            tmp_path / "list",
            *common,
            "data=image_list",
            f"data.root={lists['train']}",
            f"data.test_root={lists['test']}",
            "data.in_channels=1",
            "data.image_size=28",
            "data.mean=[0.1307]",
            "data.std=[0.3081]",
            "data.num_workers=0",
        ),
    )
    for key in ("test/acc", "test/loss", "val/acc_best", "test/map_at_r"):
        assert from_list[key] == pytest.approx(reference[key], abs=1e-6), key


def test_by_class_holds_out_whole_identities_and_selects_on_retrieval(folder: Path, tmp_path: Path) -> None:
    """data.val_split=by_class: validation and test identities are never trained on; validation measures
    precision@1, which picks the checkpoint; there is no closed-set accuracy on held-out classes."""
    dm = image_module(folder, val_split="by_class", val_size=2, test_size=0.2)
    dm.setup()
    train_ids = set(dm.train_set.dataset.targets[dm.train_set.indices].tolist())
    val_ids, test_ids = (set(s.dataset.targets[s.indices].tolist()) for s in (dm.val_set, dm.test_set))
    assert len(val_ids) == len(test_ids) == 2 and len(train_ids) == 6 and dm.count_classes() == 6
    assert not (train_ids & val_ids or train_ids & test_ids or val_ids & test_ids)
    assert len(dm.val_set) == len(dm.test_set) == 2 * PER_CLASS and len(dm.train_set) == 6 * PER_CLASS
    assert dm.classes == [f"digit_{d}" for d in sorted(train_ids)]
    assert sorted(set(targets_of(dm.train_set))) == list(range(6))  # relabelled for the head

    cfg = tiny_config(
        tmp_path,
        tmp_path / "run",
        "data=image_folder",
        f"data.root={folder}",
        "data.val_split=by_class",
        "data.val_size=2",
        "data.test_size=2",
        "data.in_channels=1",
        "data.image_size=28",
        "data.num_workers=0",
        "trainer.max_epochs=2",
    )
    metrics = run(train, cfg)
    assert metrics["status"] == "ok" and "test/acc" not in metrics and "val/acc" not in metrics
    for key in ("val/precision_at_1", "val/precision_at_1_best", "test/precision_at_1", "test/verification_auc"):
        assert 0 <= metrics[key] <= 1, key
    assert (
        Path(metrics["best_checkpoint"]).name.startswith("epoch_")
        and "val_precision_at_1_" in metrics["best_checkpoint"]
    )
    assert len(json.loads((tmp_path / "run" / "classes.json").read_text())) == 6


def test_by_class_needs_held_out_classes_with_pairs(tmp_path: Path) -> None:
    images, labels = digits(2)
    root = write_folder(tmp_path / "few", images[::2], labels[::2])  # one image per class
    with pytest.raises(DataError, match=r"holds out 2 classes, but only 0 of the 10 have 2 images or more"):
        image_module(root, val_split="by_class", val_size=1, test_size=1).setup()


def targets_of(dataset) -> list[int]:
    from arcface_lightning.data.tensors import targets

    return targets(dataset).tolist()


def test_mixed_sizes_and_channel_counts_become_one_batch_shape(tmp_path: Path) -> None:
    """Grayscale, RGB and RGBA files of different sizes in one folder: each converted and resized, one batch."""
    shapes = [(1, 20, 30), (3, 50, 50), (4, 64, 40), (3, 32, 32)]
    for i, shape in enumerate(shapes):
        (tmp_path / "mixed" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        image = torch.randint(0, 256, shape, dtype=torch.uint8)
        path = tmp_path / "mixed" / f"class_{i % 2}" / f"{i}.png"
        if shape[0] == 4:  # torchvision writes no RGBA; matplotlib does
            matplotlib.image.imsave(path, image.permute(1, 2, 0).contiguous().numpy())  # C order: matplotlib 3.8
        else:
            write_png(image, str(path))
    for channels in (1, 3):
        dm = image_module(tmp_path / "mixed", in_channels=channels, image_size=32, val_size=1, test_size=1)
        dm.setup("fit")
        images, labels = next(iter(dm.train_dataloader()))
        assert images.shape == (2, channels, 32, 32) and images.dtype == torch.uint8 and labels.shape == (2,)
