"""Backbones: images (batch, channels, height, width) → embeddings (batch, embedding_size). Plain torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from arcface_lightning.checks import check_int, check_ints


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
