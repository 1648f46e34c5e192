"""Data: a LightningDataModule that composes a source of samples, a split and a pipeline, all chosen by the
`data.*` keys:

- the source (`data.dataset`, sources/): which samples, with which labels: torchvision's MNIST-format sets and
  CIFAR10, a user's images (a folder per class, or a CSV list), a packed set streamed with LitData, or a source a
  user adds (one file and one config);
- the split (`data.val_split`, splits.py): fixed, seeded train / validation / test splits and the open set, so
  model selection never sees the test set (used once, at the end);
- the pipeline (`data.pipeline`, pipelines.py): what the loaders iterate, and the batches made ready (normalised,
  augmented in training) on the device.

The module itself owns what is the same for every source: the loaders (the training order a function of
(shuffle_seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would), the stages' setup, the
class count, and the class names in checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from arcface_lightning.data.datasets import DataError
from arcface_lightning.data.pipelines import Pipeline, TensorPipeline, TorchvisionPipeline
from arcface_lightning.data.settings import LEGACY_AUGMENT_KEYS, check_settings
from arcface_lightning.data.sources import SOURCES
from arcface_lightning.data.splits import split_of
from arcface_lightning.data.tensors import TensorImages, ready_batch


class ImageDataModule(L.LightningDataModule):
    """Serves (images, labels) batches of one data set: train / validation / test splits, open-set classes."""

    def __init__(
        self,
        dataset: str = "MNIST",
        data_dir: str = "data",
        num_classes: int | None = 10,
        in_channels: int = 1,
        image_size: int = 28,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_size: int | float = 5000,
        split_seed: int = 0,
        shuffle_seed: int | None = 0,
        train_classes: list[int] | None = None,
        open_classes: list[int] | None = None,
        download: bool = True,
        normalize: bool = True,
        mean: tuple[float, ...] | None = (0.1307,),
        std: tuple[float, ...] | None = (0.3081,),
        num_workers: int = 0,
        pin_memory: bool = False,
        pipeline: str = "tensor",
        on_device: bool = False,
        augment: str | Mapping[str, Any] | None = None,
        degrees: float | None = None,
        translate: float | None = None,
        scale: tuple[float, float] | None = None,
        crop_padding: int | None = None,
        root: str | None = None,
        test_root: str | None = None,
        test_size: int | float | None = None,
        cache: str = "none",
        val_split: str = "by_sample",
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        """`dataset`: a source's name (sources/__init__.py): a torchvision set (files under `data_dir`),
        `image_folder` / `image_list` (files under `root`, a folder or a CSV list; `test_root` the same for a
        separate test set, else `test_size`, default `val_size`, is held out), or `streaming` (a packed set).
        `num_classes`: null counts them from the data (`count_classes`). `mean`, `std`: null is 0.5 per channel,
        i.e. [0, 255] → [-1, 1]. `cache`: a user's images decoded once into memory (`memory`) or in the loader's
        workers at every epoch (`none`). `val_split`: `by_sample` draws validation
        (and held-out test) images from every class; `by_class` holds out whole classes (identities) for them, so
        `val_size`/`test_size` count classes, and only classes with ≥ 2 images are held out (a retrieval query
        needs a match). `folds`, `fold`: k-fold cross-validation, validating on fold `fold` of `folds` (null: none);
        the test set is the one drawn without folds (splits.py).
        `pipeline`: tensor or torchvision (pipelines.py). `augment`: the `data.augment` node (augment.py: kind,
        degrees, translate, scale, crop_padding) or a kind alone. `degrees`, `translate`, `scale`, `crop_padding`:
        deprecated spellings of its keys (older configs and checkpoints), folded into it with a warning."""
        super().__init__()
        # Lightning records the arguments as the hyper-parameters checkpoints rebuild the module from; everything
        # below reads them from there (the deprecated augment keys are folded into data.augment, not recorded).
        self.save_hyperparameters(ignore=LEGACY_AUGMENT_KEYS)
        legacy = {"degrees": degrees, "translate": translate, "scale": scale, "crop_padding": crop_padding}
        self.hparams.update(check_settings(type(self).__name__, self.hparams, legacy))  # the values in use
        hp = self.hparams  # shared with the parts: num_classes counted from the data is seen by all of them
        self.source = SOURCES[hp.dataset](hp)
        self.split = split_of(self.source, hp)
        self.pipeline: Pipeline = (
            TensorPipeline(hp, self.source.in_memory) if hp.pipeline == "tensor" else TorchvisionPipeline(hp)
        )
        self.prepare = self.pipeline.prepare  # uint8 images → model input: dm.prepare(images[, generator])
        self.seed: int | None = None  # the shuffle seed in use, fixed by setup("fit") (see train_seed)
        self.classes: list[str] | None = None  # class id → name (a source that names them; saved in checkpoints)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.open_set: Dataset | None = None  # test images of classes never trained on (open-set protocol)
        self.predict_split = "test"  # what Trainer.predict embeds (predict_dataloader)

    def prepare_data(self) -> None:
        """Download (rank zero only, Lightning's rule) when the source fetches its files and data.download=true."""
        self.source.prepare()

    def count_classes(self) -> int:
        """num_classes, counted from the data when the config leaves it null (a user's images); fixes it. A source
        that names its classes gives the data module its names (those the head learns, in its order)."""
        hp, chosen = self.hparams, self.split.class_ids()
        if self.source.keeps_class_names and self.classes is None:
            names = self.source.classes
            self.classes = [names[c] for c in chosen] if chosen else list(names)
        if hp.num_classes is None:
            hp.num_classes = len(chosen) if chosen else len(self.source.classes)
        elif hp.val_split == "by_class" and chosen is not None and len(chosen) != hp.num_classes:
            raise DataError(f"data.num_classes={hp.num_classes} but by_class leaves {len(chosen)} training classes")
        return hp.num_classes

    def setup(self, stage: str | None = None) -> None:
        self.count_classes()
        predicting_train = stage == "predict" and self.predict_split in ("train", "val")
        if (stage in (None, "fit", "validate") or predicting_train) and self.train_set is None:
            train, self.val_set = self.split.train_and_val()
            self.train_set = train if stage == "predict" else self.pipeline.training(train)  # predict: unaugmented
            self.seed = self.train_seed()
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set, self.open_set = self.split.test(), self.split.open_set()

    def train_seed(self) -> int:
        """data.shuffle_seed; without one (no run seed), one drawn for this run, the same on every DDP rank (rank
        zero's, broadcast): ranks that shuffled with different seeds would train on overlapping shards."""
        if self.hparams.shuffle_seed is not None:
            return self.hparams.shuffle_seed
        seed = int(torch.randint(2**31 - 1, ()).item())
        return self.trainer.strategy.broadcast(seed) if self.trainer is not None else seed

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 batches become normalised (and, in training, augmented) floats on the device (pipelines.py)."""
        if not isinstance(batch, (tuple, list)):  # the model summary's example input, a float image tensor
            return batch
        return self.pipeline.ready(batch, self.trainer, self.seed)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the class names of a user's images (the head's class id i is classes[i])."""
        return {"classes": self.classes} if self.classes is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.classes = state_dict.get("classes", self.classes)

    def _loader(self, split: str, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        dataset = getattr(self, f"{split}_set")
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        on_device = self.hparams.on_device and self.trainer is not None
        dataset = self.pipeline.serve(split, dataset, self.trainer.strategy.root_device if on_device else None)
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.hparams.pin_memory and not self.hparams.on_device,
            collate_fn=ready_batch if isinstance(dataset, TensorImages) else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (shuffle_seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would.

        The source's own loader where it has one (a packed set: LitData's, streamed). Otherwise the sampler is a
        DistributedSampler for any number of processes: one shard per rank under DDP (batch_size is per device),
        the whole set in a single process. Lightning calls its set_epoch before every epoch.
        """
        if (streamed := self.source.train_loader(self.seed)) is not None:
            return streamed
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self._loader("train", self.hparams.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The split named by `predict_split` (test unless set: train, val or test), unaugmented and in order, for
        Trainer.predict: its embeddings through the module's predict_step (arcface_lightning.embed)."""
        return self._loader(self.predict_split, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test set; with open_classes, also the open-set images as a second loader (dataloader_idx 1)."""
        closed = self._loader("test", self.hparams.eval_batch_size)
        return [closed, self._loader("open", self.hparams.eval_batch_size)] if self.open_set else closed
