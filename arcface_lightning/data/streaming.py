"""`StreamingDataModule`: the data module of a packed set (`data=streaming`; the source is sources/packed.py).

Kept as its own class, with no behaviour of its own, because configs (`conf/data/streaming.yaml`) and checkpoints
name it: Lightning saves a data module's state under its class name, and checkpoints.Checkpoint.data_module reads
it back from there."""

from __future__ import annotations

from typing import Any

from arcface_lightning.data.datamodule import ImageDataModule


class StreamingDataModule(ImageDataModule):
    """`data=streaming data.root=<packed set>`: ImageDataModule with `dataset="streaming"` (training streamed by
    LitData, validation and test read by index; the splits were drawn when packing)."""

    def __init__(self, root: str, **settings: Any) -> None:
        super().__init__(**{**settings, "dataset": "streaming", "root": root})
