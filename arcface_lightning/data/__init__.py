"""Data: which samples (datasets.py), how they become batches (datamodule.py), the in-memory uint8 set
(tensors.py) and batched augmentation on the device (augment.py)."""

from arcface_lightning.data.datamodule import ImageDataModule
from arcface_lightning.data.datasets import DataError

__all__ = ["DataError", "ImageDataModule"]
