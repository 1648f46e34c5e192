"""A packed set (`data.dataset=streaming`, made by python -m arcface_lightning.pack): sets larger than memory,
streamed with LitData.

A packed set is a folder: `train/`, `val/`, `test/`, each a LitData optimised set (index.json + chunk-*.bin) of
samples `{"image": <the original encoded file>, "label": int}`, and `arcface.json`, this project's manifest
(format version, sample counts, class names, how it was split). Why LitData (not WebDataset): it is Lightning's
own; its `StreamingDataset` reads local folders in place through memory maps (nothing is copied, resident memory
does not grow with the set) and object stores through a bounded cache; it shards by DDP rank itself, and its
`StreamingDataLoader` has a `state_dict` that Lightning stores in checkpoints, so a resumed run continues mid-epoch
where it stopped. WebDataset's tar shards give no random access (the validation and test splits here use it),
no exact mid-epoch resume, and leave rank sharding and epoch sizes to the user.

- Training (`PackedSet.train_loader`): `StreamingDataset(shuffle=True, seed=shuffle seed)`: chunks
  in a seeded random order, then samples within a window of them, a new order each epoch. Under DDP each rank
  reads its own share of the chunks; LitData then drops the remainder so that every rank makes the same number of
  steps: fewer than world_size × batch_size samples per epoch, nothing in one process. Which ones changes with the
  chunk order each epoch when every rank reads several chunks (with one or two chunks per rank the same few can be
  left out every epoch: pack small sets with a smaller --chunk-bytes). `pack` shuffles the samples before writing,
  so that a chunk mixes classes.
- Validation and test: the same files read by index (`PackedImages`), through the loaders every other source uses.
- Decoding (data/files.decode: any format to `in_channels`) runs in the loader's workers; batches are uint8 and
  are normalised and augmented on the device as for every source (pipelines.py). `pack` decoded every image once,
  so a packed set holds only images that decode.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from arcface_lightning.core.checks import DataError, first_line
from arcface_lightning.data.files import decode
from arcface_lightning.data.sources.base import Source

# LitData asks PyPI for a newer release of itself whenever a dataset is built (30 s timeout): not on clusters
# without network, nor in every loader worker. Read when litdata is first imported, which happens below, lazily.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

FORMAT, VERSION = "arcface-lightning packed set", 1
PACKED_FORMAT = ["bytes", "int"]  # LitData's data_format of a sample {"image": encoded file, "label": int}
SPLITS = ("train", "val", "test")


def read_manifest(root: Path, key: str = "data.root") -> dict[str, Any]:
    """arcface.json of a packed set, checked against its files: one line says what is wrong."""
    path = root / "arcface.json"
    if not path.is_file():
        raise DataError(
            f"{key}={root} is not a packed set (no arcface.json); make one with "
            f"python -m arcface_lightning.pack <image folder or list> {root}"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(
            f"{key}={root} was packed as format {manifest.get('format')!r} version {manifest.get('version')}; "
            f"this code reads version {VERSION}: pack the images again"
        )
    for split in SPLITS:
        check_chunks(root / split, manifest["samples"][split], key)
    return manifest


def check_chunks(folder: Path, samples: int, key: str) -> None:
    """LitData's index against the manifest and the chunk files on disk (a missing or truncated chunk would
    otherwise only fail when an epoch reaches it)."""
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise DataError(f"{key}: {index_path} is missing; the packed set is incomplete: pack the images again")
    try:
        index = json.loads(index_path.read_text())
        chunks, config = index["chunks"], index["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{key}: {index_path} is not LitData's index ({first_line(error)}): pack the images again"
        ) from None
    # LitData picks each field's deserializer by the name the index gives, and its `pickle` one runs pickle.loads:
    # a packed set from elsewhere is read only in the formats `pack` writes (the encoded file's bytes, an int).
    written = {"data_format": PACKED_FORMAT, "item_loader": "PyTreeLoader", "compression": None, "encryption": None}
    for name, value in written.items():
        if config.get(name) != value:
            raise DataError(
                f"{key}: {index_path} has {name}={config.get(name)!r}; allowed: {value!r}, what "
                "python -m arcface_lightning.pack writes (other formats could run code when read)"
            )
    found = sum(chunk["chunk_size"] for chunk in chunks)
    if found != samples:
        raise DataError(f"{key}: {folder} holds {found} samples, arcface.json says {samples}: pack the images again")
    for chunk in chunks:
        file = folder / chunk["filename"]
        if not file.is_file() or file.stat().st_size != chunk["chunk_bytes"]:
            raise DataError(f"{key}: {file} is missing or truncated: pack the images again")


class Decode:
    """A packed sample → (uint8 (C, H, W), label); picklable, for loader workers."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        self.in_channels, self.image_size = in_channels, image_size

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        name = f"packed sample of label {sample['label']}"
        return torch.from_numpy(decode(bytes(sample["image"]), self.in_channels, self.image_size, name)), int(
            sample["label"]
        )


class PackedImages(Dataset):
    """One split of a packed set, read by index (validation and test: samplers, DDP padding as for any set)."""

    def __init__(self, folder: Path, in_channels: int, image_size: int) -> None:
        from litdata import StreamingDataset

        self.stream = StreamingDataset(str(folder), transform=Decode(in_channels, image_size))

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.stream[i]


@functools.cache
def resumable_loader() -> type:
    """LitData's `StreamingDataLoader`, fixed for the epoch after a mid-epoch resume under Lightning.

    After `load_state_dict` the loader sets `restore` and clears it only when an epoch's generator runs to its end.
    Lightning stops taking batches once it has the epoch's count and never runs it to the end, so the next epoch
    would resume again from the saved position (the end of the epoch) and come out empty (lightning 2.6.6, litdata
    0.2.76). A restore whose epoch was already consumed is over: the next epoch starts afresh."""
    from litdata import StreamingDataLoader

    class ResumableStreamingDataLoader(StreamingDataLoader):
        def __iter__(self) -> Any:
            if self.restore and self._num_samples_yielded_streaming >= len(self) * self.batch_size:
                self.restore = False
            return super().__iter__()

    return ResumableStreamingDataLoader


class PackedSet(Source):
    """The packed set at data.root: its manifest's classes, its three splits read by index, and LitData's streamed,
    resumable training loader. The splits were drawn when packing, so data.val_size, test_size, split_seed and
    test_root do not apply; data.val_split must be the one it was packed with."""

    root_is = "a packed set"
    keeps_class_names = True
    fixed_splits = True

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._manifest: dict[str, Any] | None = None
        self._splits: dict[str, PackedImages] = {}

    @property
    def in_memory(self) -> bool:
        return False  # decoded in the loader's workers: the set may not fit in memory

    @property
    def manifest(self) -> dict[str, Any]:
        """arcface.json, read and checked (with the chunks of every split) once."""
        if self._manifest is None:
            manifest = read_manifest(self.folder)
            split = self.settings.val_split
            if (manifest["val_split"] == "by_class") != (split == "by_class"):
                raise DataError(
                    f"data.val_split={split} but {self.folder} was packed with --val-split {manifest['val_split']}"
                )
            self._manifest = manifest
        return self._manifest

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def split(self, name: str) -> Dataset:
        """Opening a split reads only its index."""
        if name not in self._splits:
            hp, _ = self.settings, self.manifest  # a damaged set fails here, in one line, before LitData reads it
            self._splits[name] = PackedImages(self.folder / name, hp.in_channels, hp.image_size)
        return self._splits[name]

    def train_loader(self, seed: int | None) -> DataLoader:
        """Built when Lightning asks for it, after DDP's process group exists: LitData reads the world size and
        rank from it."""
        from litdata import StreamingDataset

        hp = self.settings
        stream = StreamingDataset(
            str(self.folder / "train"),
            shuffle=True,
            seed=seed,
            transform=Decode(hp.in_channels, hp.image_size),
        )
        workers = hp.num_workers
        return resumable_loader()(
            stream,
            batch_size=hp.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=hp.pin_memory,
        )
