"""arcface-lightning: angular-margin embedding models (ArcFace and its family) with Lightning and Hydra.

The layers, each a subpackage (docs/architecture.md is the map; tests/test_architecture.py holds the import rules):

    models/      the margin math (heads.py: ψ), the newer heads, Partial FC, the backbones: plain nn.Modules
    data/        which samples, how they become batches (ImageDataModule, StreamingDataModule)
    training/    the LightningModule, the callbacks, embed's prediction loop
    evaluation/  retrieval and verification metrics, figures, a sweep's jobs read back
    serving/     the preprocessing contract, checkpoints opened once, a .onnx/.pt/.ckpt as an embedding function
    core/        what every command shares: user errors, configs, the command line, the runner, the allow-list
    train.py evaluate.py embed.py export.py search.py verify.py pack.py report.py compare.py align.py: the commands

The public classes below are importable from here (`from arcface_lightning import ArcFaceHead`), each on first use:
importing the package imports neither torch nor Lightning, so the serving commands stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

PUBLIC = {
    "Head": "models.protocol",
    "HeadStep": "models.protocol",
    "psi": "models.heads",
    "ArcFaceHead": "models.heads",
    "CosFaceHead": "models.heads",
    "SphereFaceHead": "models.heads",
    "CombinedMarginHead": "models.heads",
    "SoftmaxHead": "models.heads",
    "MarginHead": "models.heads",
    "SubCenterArcFaceHead": "models.recent_heads",
    "AdaFaceHead": "models.recent_heads",
    "ElasticFaceHead": "models.recent_heads",
    "CurricularFaceHead": "models.recent_heads",
    "PartialFC": "models.partial_fc",
    "SimpleCNN": "models.backbones",
    "ResNet": "models.backbones",
    "TimmBackbone": "models.backbones",
    "IResNet": "models.face_backbones",
    "MobileFaceNet": "models.face_backbones",
    "ArcFaceModule": "training.module",
    "ImageDataModule": "data.datamodule",
    "StreamingDataModule": "data.streaming",
    "Contract": "serving.contract",
    "Checkpoint": "serving.checkpoints",
    "load_model": "serving.inference",
}
__all__ = sorted(PUBLIC)


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])
