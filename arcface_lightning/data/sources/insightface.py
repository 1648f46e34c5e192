"""insightface's training sets as they ship (`data=insightface data.root=<folder>`): MS1MV2/3, Glint360K, WebFace as
`train.rec`, `train.idx` and `property`, read without MXNet (data/recordio.py). Only the index (keys, offsets,
labels) stays in memory; each image's bytes are read and decoded in the loader's workers (JPEG or PNG,
data/files.decode) into the same uint8 (C, H, W) samples as every other source. Class names are the ids as text:
the sets carry none. `property`'s class count bounds the labels (checked when the folder is indexed).

`data.test_root=<folder>` names a second folder of the same layout as the test set (else a split is held out):
by_sample, its labels are the training folder's class ids (a closed set); by_class, its identities are its own."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from arcface_lightning.data.files import decode
from arcface_lightning.data.recordio import RecordFile, RecordIndex, unpack
from arcface_lightning.data.sources.base import UserFolder


class RecordImages(Dataset):
    """The images of a RecordIndex as (uint8 (C, H, W), label) samples; `targets`, `classes` and
    `target_transform` as torchvision's datasets have them (datasets.py selects and relabels classes through them)."""

    def __init__(self, index: RecordIndex, in_channels: int, image_size: int) -> None:
        self.file = RecordFile(index.folder / "train.rec", index.key)  # each worker opens its own (it pickles)
        self.keys, self.offsets = index.keys, index.offsets
        self.targets = torch.as_tensor(index.labels, dtype=torch.long)
        self.classes = [str(c) for c in range(index.classes)]
        self.in_channels, self.image_size = in_channels, image_size
        self.target_transform = None

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, i: int) -> str:
        """The i-th record as an error names it (pack lists skipped records by it too)."""
        return f"{self.file.path} key {int(self.keys[i])}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        _, data = unpack(self.file.record(int(self.offsets[i])))
        image = torch.from_numpy(decode(data, self.in_channels, self.image_size, self.name(i)))
        label = int(self.targets[i])
        return image, self.target_transform(label) if self.target_transform is not None else label


class InsightFaceRecord(UserFolder):
    """The folder at data.root, and optionally a test folder at data.test_root."""

    root_is = "a folder with insightface's train.rec, train.idx and property"

    def load(self, train: bool) -> Dataset:
        hp = self.settings
        folder, key = self.where(train)
        return RecordImages(RecordIndex.read(folder, key), hp.in_channels, hp.image_size)
