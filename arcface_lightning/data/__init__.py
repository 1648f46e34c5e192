"""Data: which samples (datasets.py), how they become batches (datamodule.py), the in-memory uint8 set
(tensors.py) and batched augmentation on the device (augment.py).

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
