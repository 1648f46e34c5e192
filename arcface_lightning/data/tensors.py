"""The in-memory tensor pipeline's storage: a whole image set as one uint8 tensor, served a batch per index lookup.

`TensorImages.from_dataset` reads a torchvision MNIST/CIFAR set's decoded `.data` array (no PIL), or decodes a
user's images once; `targets` gives any such set's labels (a `.targets` attribute and an optional
`target_transform`, torchvision's convention) without decoding an image (the data module's label check uses it).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset


class TensorImages(Dataset):
    """A whole image set as one uint8 tensor (N, C, H, W) and its int64 labels; a batch is one index lookup.

    DataLoader fetches batches through `__getitems__` (one fancy-indexing op instead of N `__getitem__` calls) and
    `ready_batch` passes the result through, so samplers, DDP sharding and workers work as for any map dataset.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"TensorImages needs uint8 (N, C, H, W) images and N labels, got {tuple(images.shape)}")
        self.images, self.labels = images, labels

    @classmethod
    def from_dataset(cls, dataset: Dataset, num_workers: int = 0) -> TensorImages:
        """The samples of a dataset (or nested Subsets of one), in the same order, with its target_transform
        applied. A torchvision MNIST/CIFAR set is read from its decoded `.data` array, not through PIL; any other
        set of uint8 (C, H, W) samples (a user's images) is decoded once, batch by batch, in `num_workers` loader
        workers."""
        base, indices = unwrap(dataset)
        if not hasattr(base, "data"):
            loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
            batches = [images for images, _ in loader]
            return cls(torch.cat(batches) if batches else torch.empty(0, 1, 1, 1, dtype=torch.uint8), targets(dataset))
        images = torch.as_tensor(base.data)[indices]
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # MNIST NHW, CIFAR NHWC
        return cls(images.contiguous(), targets(dataset))

    def to(self, device: torch.device | str) -> TensorImages:
        return TensorImages(self.images.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, device=self.images.device)
        return self.images[index], self.labels[index]


def unwrap(dataset: Dataset) -> tuple[Dataset, torch.Tensor]:
    """The torchvision dataset under nested Subsets, and the indices of the samples `dataset` serves, in order."""
    indices = torch.arange(len(dataset))
    while isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices)[indices]
        dataset = dataset.dataset
    return dataset, indices


def targets(dataset: Dataset) -> torch.Tensor:
    """The labels (int64) of a torchvision MNIST/CIFAR dataset or nested Subsets of one, with its target_transform
    applied, without decoding any image."""
    base, indices = unwrap(dataset)
    labels = torch.as_tensor(base.targets)[indices]
    if base.target_transform is not None:
        labels = torch.tensor([base.target_transform(int(t)) for t in labels], dtype=torch.long)
    return labels.long()


def ready_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for TensorImages: `__getitems__` already returns the batch."""
    return batch
