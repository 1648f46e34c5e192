"""Data: which samples (sources/, one file per `data.dataset`), how they are split (splits.py) and how they become
batches (pipelines.py: the in-memory uint8 set of tensors.py, batched augmentation on the device of augment.py),
composed by the data module (datamodule.py).

`ImageDataModule` is imported on first use (PEP 562): it brings Lightning and torchvision, and a command that only
decodes a user's images (data/images.py: verify, search, embed with an export) must not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from arcface_lightning.core.checks import DataError

if TYPE_CHECKING:
    from arcface_lightning.data.datamodule import ImageDataModule

__all__ = ["DataError", "ImageDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ImageDataModule":
        from arcface_lightning.data.datamodule import ImageDataModule

        return ImageDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
