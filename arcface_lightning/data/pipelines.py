"""How a split's samples reach the model (`data.pipeline`): what a loader iterates, and the batch made ready on
the device. Two pipelines serve the same samples in the same order (same split, same sampler):

- `tensor` (default, fast): the files are read once; the whole split is kept as one uint8 tensor (60,000 MNIST
  images are 47 MB), batches are index lookups, and scaling, normalisation and augmentation run as batched tensor
  ops on the training device (`ready`, from the data module's `on_after_batch_transfer`). With `on_device=true` the
  uint8 set itself lives on the GPU, so no batch ever crosses the bus. The storage is tensors.py, the batched
  augmentation augment.py. A source that is not kept in memory (a user's images with `cache=none`, a packed set)
  is decoded per sample in the loader's workers into the same uint8 batches, and prepared on the device the same way.
- `torchvision` (torchvision's sets only): the classic per-sample path (PIL image → torchvision's random
  transforms → ToTensor → Normalize) through the DataLoader and its workers. It stays as the reference the fast
  path is held to: the textbook pipeline every torchvision user knows, with torchvision's own random transforms,
  so a test can prove the tensor pipeline serves the same batches, and a user who doubts a number can rerun it the
  classic way.

Both give bit-identical batches without augmentation (a test checks it). Augmentation draws its random parameters
per sample in both, from different generators: same distribution, different draws. The tensor pipeline seeds its
generator with (shuffle_seed, epoch, rank), so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from arcface_lightning.data import augment as augmentation
from arcface_lightning.data.datasets import with_transform
from arcface_lightning.data.tensors import TensorImages


def sample_transform(settings: Any, train: bool) -> transforms.Compose:
    """The per-sample transforms of a PIL image: torchvision's random ones in training (with the `data.augment`
    node's settings), then ToTensor and Normalize: what the tensor pipeline does batched in `ready`."""
    steps = augmentation.per_sample_transforms(settings.augment, settings.image_size) if train else []
    steps.append(transforms.ToTensor())
    if settings.normalize:
        steps.append(transforms.Normalize(settings.mean, settings.std))
    return transforms.Compose(steps)


class Pipeline:
    """What both pipelines share: a uint8 batch becomes floats on the device, augmented in training, normalised."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        # uint8 batches on the device → floats, augmented in training, normalised: prepare(images[, generator])
        self.prepare = augmentation.BatchPreparation(settings.augment, settings.normalize, settings.mean, settings.std)

    def training(self, dataset: Dataset) -> Dataset:
        """The training split as its loader reads it."""
        return dataset

    def serve(self, split: str, dataset: Dataset, device: torch.device | None) -> Dataset:
        """What a loader of `split` (train, val, test, open) iterates; `device`: where to keep it (data.on_device),
        None: in host memory."""
        return dataset

    def ready(self, batch: tuple[torch.Tensor, torch.Tensor], trainer: Any, seed: int | None) -> Any:
        """A batch as the model takes it: uint8 images prepared on their device, augmented while training with a
        generator seeded by (seed, epoch, rank); batches the per-sample transforms made ready pass through."""
        images, labels = batch
        if images.dtype != torch.uint8:
            return batch
        if trainer is None or not trainer.training:
            return self.prepare(images), labels
        generator = self.prepare.generator(images.device, seed, trainer.current_epoch, trainer.global_rank)
        return self.prepare(images, generator), labels


class TensorPipeline(Pipeline):
    """Each split as one uint8 tensor (made once) where the source may be kept in memory (`in_memory`)."""

    def __init__(self, settings: Any, in_memory: bool) -> None:
        super().__init__(settings)
        self.in_memory = in_memory
        self._tensors: dict[str, TensorImages] = {}  # split name → its uint8 copy

    def serve(self, split: str, dataset: Dataset, device: torch.device | None) -> Dataset:
        if not self.in_memory:
            return dataset
        if split not in self._tensors:
            tensors = TensorImages.from_dataset(dataset, num_workers=self.settings.num_workers)
            if device is not None:
                tensors = tensors.to(device)
            self._tensors[split] = tensors
        return self._tensors[split]


class TorchvisionPipeline(Pipeline):
    """torchvision's per-sample transforms in the loader's workers; the training split augmented per sample."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.train_transform = sample_transform(settings, train=True)

    def training(self, dataset: Dataset) -> Dataset:
        """Augmented per sample (a shallow copy: validation keeps the plain transform of the shared pool)."""
        return with_transform(dataset, self.train_transform) if self.settings.augment["kind"] else dataset
