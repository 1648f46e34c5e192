"""The sources of samples, by their `data.dataset` name: one line each. A new source is one file here (a `Source`
subclass, base.py) with its line below, and one conf/data/<name>.yaml; the splits, the pipelines and the data
module serve it unchanged. Only these names are accepted: a config or checkpoint never chooses what to import."""

from __future__ import annotations

from arcface_lightning.data.sources.base import Source
from arcface_lightning.data.sources.image_files import ImageFolder, ImageList
from arcface_lightning.data.sources.insightface import InsightFaceRecord
from arcface_lightning.data.sources.packed import PackedSet
from arcface_lightning.data.sources.torchvision_sets import DATASETS, TorchvisionSet

SOURCES: dict[str, type[Source]] = {
    **dict.fromkeys(DATASETS, TorchvisionSet),  # MNIST, FashionMNIST, KMNIST, CIFAR10
    "image_folder": ImageFolder,
    "image_list": ImageList,
    "streaming": PackedSet,
    "insightface": InsightFaceRecord,  # train.rec / train.idx / property, without MXNet
}


def register_source(name: str, source: type[Source]) -> None:
    """Add a source under `name` for this process (a source kept outside the package, or a test's)."""
    if not (isinstance(source, type) and issubclass(source, Source)):
        raise TypeError(f"a source is a subclass of arcface_lightning.data.sources.Source, not {source!r}")
    SOURCES[name] = source


__all__ = ["SOURCES", "Source", "register_source"]
