"""A user's images (`data.dataset=image_folder|image_list`): a folder per class, or a CSV list of path,label rows, at
`data.root`; optionally a separate test set of the same layout at `data.test_root`. Indexed and each file decoded
once when first asked for (images.load: files that do not decode are skipped and listed); class ids follow the
sorted class names, which the data module keeps (classes.json, checkpoints)."""

from __future__ import annotations

from torch.utils.data import Dataset

from arcface_lightning.data import images
from arcface_lightning.data.sources.base import UserFolder


class ImageFiles(UserFolder):
    """The files at data.root (and data.test_root), indexed by the `data.dataset` named (files.SOURCES)."""

    keeps_class_names = True

    def load(self, train: bool) -> Dataset:
        """by_sample: the test set's classes get the training pool's ids, matched by name (a closed set); by_class:
        its own (identities never trained on)."""
        hp = self.settings
        where, key = self.where(train)
        closed_set = not train and hp.val_split == "by_sample"
        named = self.pool(train=True).classes if closed_set else None
        return images.load(hp.dataset, where, key, hp.in_channels, hp.image_size, named, hp.num_workers)


class ImageFolder(ImageFiles):
    root_is = "a folder"


class ImageList(ImageFiles):
    root_is = "a CSV file"
