"""Backbones: images (batch, channels, height, width) → embeddings (batch, embedding_size). Plain torch."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arcface_lightning.core.checks import BadValue, check_int, check_ints, first_line, require


class SimpleCNN(nn.Module):
    """A stack of 3×3 conv blocks, each ending in a 2× max-pool, then a linear embedding.

    The defaults are the seed script's network, exactly: conv(32) → pool → ReLU → conv(64) → pool → ReLU → flatten
    (64·7·7 = 3136 for 1×28×28) → linear 128. Options for the faster and stronger recipes:

    - `channels`: one block per entry (the spatial side halves per block: 28 → 14 → 7 → 3);
    - `convs_per_block`: conv layers per block, the pool after the last;
    - `batch_norm`: BatchNorm after every conv (whose bias is then dropped) and on the embedding, the
      "BN → FC → BN" embedding of the ArcFace paper, which centres the embeddings before they are normalised.

    Pooling comes before the ReLU: the two commute (ReLU is monotone), and the ReLU then runs on a 4× smaller map.
    """

    def __init__(
        self,
        embedding_size: int = 128,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64),
        convs_per_block: int = 1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("in_channels", in_channels)):
            check_int("SimpleCNN", name, value)
        check_int("SimpleCNN", "convs_per_block", convs_per_block)
        check_ints("SimpleCNN", "channels", channels)
        check_int("SimpleCNN", "image_size", image_size, minimum=2 ** len(channels))  # the side halves per block
        side = image_size // 2 ** len(channels)
        layers: list[nn.Module] = []
        width = in_channels
        for out in channels:
            for i in range(convs_per_block):
                layers.append(nn.Conv2d(width, out, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                if i < convs_per_block - 1:
                    layers.append(nn.ReLU())
                width = out
            layers += [nn.MaxPool2d(2), nn.ReLU()]
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.embedding = nn.Linear(width * side * side, embedding_size, bias=not batch_norm)
        self.embedding_norm = nn.BatchNorm1d(embedding_size) if batch_norm else nn.Identity()
        self.embedding_size = embedding_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding_norm(self.embedding(self.features(images)))


class BasicBlock(nn.Module):
    """ResNet's two 3×3 convs with an identity (or 1×1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with the CIFAR stem (one 3×3 conv, no max-pool: 32×32 inputs keep their resolution into stage 1).

    `blocks=(2, 2, 2, 2)` and `width=64` is ResNet-18 (11.2 M parameters before the embedding). The embedding is
    global average pooling → linear → BatchNorm, as in the ArcFace paper's "BN-FC-BN" output (no dropout).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        in_channels: int = 3,
        blocks: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
    ) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("in_channels", in_channels), ("width", width)):
            check_int("ResNet", name, value)
        check_ints("ResNet", "blocks", blocks)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        channels = width
        for stage, count in enumerate(blocks):
            out = width * 2**stage
            for i in range(count):
                stages.append(BasicBlock(channels, out, stride=2 if stage > 0 and i == 0 else 1))
                channels = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embedding = nn.Linear(channels, embedding_size, bias=False)
        self.embedding_norm = nn.BatchNorm1d(embedding_size)
        self.embedding_size = embedding_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding_norm(self.embedding(self.pool(self.stages(self.stem(images)))))


class TimmBackbone(nn.Module):
    """Any timm image model (`timm.list_models()`: ResNets, EfficientNets, MobileNets, ConvNeXts, ViTs...) without
    its classifier, then the embedding: linear → BatchNorm1d, the "BN → FC → BN" output of the ArcFace paper (the
    timm model's last norm is the first BN).

    timm builds the model with `num_classes=0` (its pooled features, `head_hidden_size` wide) and
    `in_chans=in_channels`. Weights, by priority:

    - `checkpoint_path`: a local weights file of this model (.pth / .bin / .safetensors, a state dict or a checkpoint
      dict holding one), e.g. one downloaded from the Hugging Face hub or `timm.create_model(name).state_dict()`.
      It goes through timm's own pretrained loader (`pretrained_cfg_overlay`), which drops the classifier and adapts
      the first conv to `in_channels` (an RGB stem summed for 1 channel); nothing is downloaded.
    - `pretrained`: timm's published weights, downloaded (or read from the Hugging Face cache).
    - neither: random initialisation.

    Args:
        name: a timm model name, optionally with a weights tag (`resnet18.a1_in1k`) or `hf-hub:<repo>`.
        model_kwargs: more keywords for `timm.create_model`: `drop_rate`, `drop_path_rate`, and for ViTs on small
            images `img_size` and `patch_size` (a ViT's input size is fixed when it is built).
    """

    def __init__(
        self,
        name: str = "resnet18",
        embedding_size: int = 512,
        in_channels: int = 3,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("embedding_size", embedding_size), ("in_channels", in_channels)):
            check_int("TimmBackbone", key, value)
        require("TimmBackbone", "pretrained", pretrained, "true or false", lambda v: isinstance(v, bool))
        self.model = create_timm_model(name, in_channels, pretrained, checkpoint_path, dict(model_kwargs or {}))
        # the pooled output's width: num_features, or the width of a pre-logits layer after it (MobileNetV3's 1×1 conv)
        width = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        self.embedding = nn.Linear(width, embedding_size, bias=False)
        self.embedding_norm = nn.BatchNorm1d(embedding_size)
        self.embedding_size = embedding_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding_norm(self.embedding(self.model(images)))


def create_timm_model(
    name: str, in_channels: int, pretrained: bool, checkpoint_path: str | None, kwargs: dict[str, Any]
) -> nn.Module:
    """`timm.create_model(name, num_classes=0, in_chans=in_channels)` with the weights TimmBackbone describes; a
    one-line BadValue naming the argument for anything timm cannot do with them."""
    try:
        import timm
    except ImportError as error:
        raise ImportError("backbone=timm needs the timm package: pip install timm") from error
    if not (isinstance(name, str) and (name.startswith("hf-hub:") or timm.is_model(name))):
        raise BadValue("TimmBackbone", "name", name, unknown_model_hint(timm, name))
    state_dict = None if checkpoint_path is None else read_weights(timm, checkpoint_path)
    overlay = None if state_dict is None else {"state_dict": state_dict}  # timm's pretrained loader reads it there
    try:
        model = timm.create_model(
            name,
            pretrained=pretrained or state_dict is not None,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            in_chans=in_channels,
            **kwargs,
        )
    except TypeError as error:  # a keyword the model's constructor does not take
        allowed = f"keywords of {name} ({first_line(error)})"
        raise BadValue("TimmBackbone", "model_kwargs", kwargs, allowed) from error
    except RuntimeError as error:  # shapes that do not fit: another model's weights
        if state_dict is None:
            raise
        lines = str(error).strip().splitlines()  # "Error(s) in loading state_dict for X:", then the first error
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise BadValue("TimmBackbone", "checkpoint_path", checkpoint_path, f"{name}'s weights ({detail})") from error
    except OSError as error:  # no network and no cached copy
        if state_dict is not None or not pretrained:
            raise
        allowed = f"false, or true where timm can download the weights ({first_line(error)}); else checkpoint_path"
        raise BadValue("TimmBackbone", "pretrained", pretrained, allowed) from error
    if state_dict is not None:  # timm loads non-strictly once it has dropped the classifier: check what it got
        # BatchNorm's step counters may be absent (timm's published weights drop them): torch loads without them
        missing = [k for k in model.state_dict() if k not in state_dict and not k.endswith("num_batches_tracked")]
        if missing:
            found = f"{len(missing)} of {len(model.state_dict())} tensors are not in the file, e.g. {missing[0]}"
            raise BadValue("TimmBackbone", "checkpoint_path", checkpoint_path, f"{name}'s weights ({found})")
    return model


def unknown_model_hint(timm: Any, name: Any) -> str:
    """What to pass instead of an unknown model name: the closest names, and how to list them all."""
    text = str(name)
    close = difflib.get_close_matches(text.split(".")[0], timm.list_models(), n=3, cutoff=0.6)
    stem = re.match(r"[a-z]*", text.lower()).group() or text  # "resnet" of "resnet1000"
    suggestion = f" (closest: {', '.join(close)})" if close else ""
    return f"a timm model name{suggestion}; list them with timm.list_models('*{stem}*')"


def read_weights(timm: Any, path: Any) -> dict[str, torch.Tensor]:
    """A pretrained weights file's state dict, read by timm's own loader (safetensors, or torch with weights_only; it
    unwraps a `state_dict` or `model` entry). Not a training checkpoint: those are opened by checkpoints.py alone."""
    if not (isinstance(path, (str, os.PathLike)) and Path(path).is_file()):
        raise BadValue("TimmBackbone", "checkpoint_path", path, "null or an existing weights file (.pth, .safetensors)")
    try:
        return timm.models.load_state_dict(os.fspath(path), weights_only=True)  # explicit: no code from a file
    except Exception as error:  # not a torch or safetensors file
        raise BadValue("TimmBackbone", "checkpoint_path", path, f"a weights file ({first_line(error)})") from error
