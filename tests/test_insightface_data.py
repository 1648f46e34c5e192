"""An insightface folder as `pack`'s source (→ data=streaming) and under DDP, on the MXNet-written fixture
(tests/data/insightface/write_with_mxnet.py): the packed splits and the ranks' shards against data=insightface's
own, single-process splits."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ranks import free_port, join, leave, start_ranks
from torch.utils.data import Dataset

from arcface_lightning.data import DataError, ImageDataModule
from arcface_lightning.data.recordio import FRAME, HEADER
from arcface_lightning.data.streaming import StreamingDataModule
from arcface_lightning.pack import pack
from conftest import cli

FIXTURES = Path(__file__).parent / "data" / "insightface"


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def train_one_rank(rank: int, world: int, port: int, results: str) -> None:
    """One DDP rank (gloo): data=insightface's training loader for two epochs."""
    join(port, rank, world)
    dm = ImageDataModule(dataset="insightface", root=str(FIXTURES / "header"), val_size=4, test_size=4, batch_size=4,
                         num_workers=0, shuffle_seed=3, in_channels=1, image_size=28, num_classes=None)  # fmt: skip
    world_now, rank_now = torch.distributed.get_world_size(), torch.distributed.get_rank()
    dm.trainer = SimpleNamespace(world_size=world_now, global_rank=rank_now)  # what Lightning's DDP trainer gives
    dm.setup("fit")
    loader, epochs = dm.train_dataloader(), []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # as Lightning does before every epoch
        epochs.append([[(digest(x), int(y)) for x, y in zip(*batch, strict=True)] for batch in loader])
    Path(results, f"{rank}.json").write_text(json.dumps(epochs))
    leave()


SHAPE = {"in_channels": 1, "image_size": 28, "num_classes": None}


def samples(dataset: Dataset) -> list[tuple[int, bytes]]:
    """Every (label, decoded pixels) of a split, sorted: `pack` writes a split in a seeded random order of its own."""
    return sorted((int(label), image.numpy().tobytes()) for image, label in (dataset[i] for i in range(len(dataset))))


def splits(dm: ImageDataModule) -> dict[str, list[tuple[int, bytes]]]:
    dm.count_classes()
    train, val = dm.split.train_and_val()
    return {"train": samples(train), "val": samples(val), "test": samples(dm.split.test())}


CASES = {
    "by_sample": {"val_size": 4, "test_size": 4},
    "by_class": {"val_split": "by_class", "val_size": 2, "test_size": 2},
    "test_root": {"val_size": 4, "test_root": FIXTURES / "plain"},  # the same digits, a folder without header
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_packed_insightface_folder_serves_exactly_data_insightfaces_splits(case: str, tmp_path: Path) -> None:
    """Same split semantics (keys, seed, sets): every split holds exactly the labels and decoded pixels that
    data=insightface serves, and the classes are its ids."""
    settings = CASES[case]
    manifest = pack(FIXTURES / "header", tmp_path / "packed", workers=1, chunk_bytes="8KB", **settings)
    direct = ImageDataModule(
        dataset="insightface",
        root=str(FIXTURES / "header"),
        **SHAPE,
        **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
    )
    packed = StreamingDataModule(
        root=str(tmp_path / "packed"), val_split=settings.get("val_split", "by_sample"), **SHAPE
    )
    expected, found = splits(direct), splits(packed)
    assert {split: len(rows) for split, rows in found.items()} == manifest["samples"]
    assert found == expected
    held = {"by_sample": (22, 4, 4), "by_class": None, "test_root": (26, 4, 30)}[case]
    if held:
        assert tuple(manifest["samples"].values()) == held
    assert manifest["classes"] == packed.classes == [str(c) for c in direct.split.class_ids() or range(10)]
    present = len(set(direct.source.pool(train=True).targets.tolist()))  # by_class holds 2 + 2 of them out
    assert packed.count_classes() == direct.count_classes() == (present - 4 if case == "by_class" else 10)


def test_pack_lists_an_insightface_record_that_does_not_decode(tmp_path: Path) -> None:
    """A record whose image bytes are broken (its framing intact) is skipped, named by its key, and the rest packed."""
    folder = Path(shutil.copytree(FIXTURES / "plain", tmp_path / "plain"))
    offset = dict(line.split("\t") for line in (folder / "train.idx").read_text().splitlines())["5"]
    data = bytearray((folder / "train.rec").read_bytes())
    start = int(offset) + FRAME.size + HEADER.size + 8  # past the frame, MXNet's image header and PNG's signature
    data[start : start + 64] = bytes(64)
    (folder / "train.rec").write_bytes(bytes(data))
    result = cli("pack", str(folder), str(tmp_path / "packed"), "--val-size", "4", "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "10 classes; skipped 1" in result.stdout
    assert sum(json.loads((tmp_path / "packed" / "arcface.json").read_text())["samples"].values()) == 30 - 1
    (line,) = (tmp_path / "packed" / "skipped.txt").read_text().splitlines()
    assert line.startswith(f"{folder / 'train.rec'} key 5\tunreadable image {folder / 'train.rec'} key 5: ")


def test_pack_names_its_own_argument_for_a_damaged_insightface_folder(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(FIXTURES / "plain", tmp_path / "plain"))
    (folder / "property").unlink()
    result = cli("pack", str(folder), str(tmp_path / "packed"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: source={folder} has no property; allowed: insightface's train.rec, train.idx and property"
    )
    assert not (tmp_path / "packed").exists()


def test_a_test_folder_of_another_layout_is_named_by_its_key(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    dm = ImageDataModule(
        dataset="insightface", root=str(FIXTURES / "header"), test_root=str(tmp_path / "test"), **SHAPE
    )
    with pytest.raises(DataError, match=r"^data\.test_root=.*test has no train\.rec, train\.idx, property; allowed"):
        dm.setup("test")


def test_ddp_ranks_read_disjoint_shards_that_cover_the_training_split(tmp_path: Path) -> None:
    """2 gloo ranks: per epoch the ranks' images are disjoint and together exactly the single-process training
    split (22 images: 11 each, no padding), in a new order each epoch."""
    single = ImageDataModule(dataset="insightface", root=str(FIXTURES / "header"), val_size=4, test_size=4, **SHAPE)
    single.setup("fit")
    whole = sorted((digest(x), int(y)) for x, y in (single.train_set[i] for i in range(len(single.train_set))))
    assert len(whole) == len(set(whole)) == 22
    start_ranks(train_one_rank, (2, free_port(), str(tmp_path)), 2)
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for epoch in range(2):
        shards = [[tuple(sample) for batch in rank[epoch] for sample in batch] for rank in ranks]
        assert [len(shard) for shard in shards] == [11, 11]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == whole
    assert ranks[0][0] != ranks[0][1]  # reshuffled by set_epoch
