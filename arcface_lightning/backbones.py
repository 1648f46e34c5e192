"""Backbones: images (batch, channels, height, width) → embeddings (batch, embedding_size). Plain torch."""

from __future__ import annotations

import torch
from torch import nn


class SimpleCNN(nn.Module):
    """The seed script's network: two 3×3 conv blocks (conv → max-pool 2 → ReLU) and a linear embedding.

    Defaults reproduce the seed exactly for 1×28×28 MNIST (flatten 64·7·7 = 3136 → 128). `in_channels` and
    `image_size` adapt it to other inputs, e.g. 3×32×32 CIFAR10 (flatten 64·8·8 = 4096).
    """

    def __init__(
        self,
        embedding_size: int = 128,
        in_channels: int = 1,
        image_size: int = 28,
        channels: tuple[int, int] = (32, 64),
    ) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("in_channels", in_channels)):
            if int(value) != value or value < 1:
                raise ValueError(f"SimpleCNN: {name}={value!r} is out of range; allowed: an integer ≥ 1")
        if int(image_size) != image_size or image_size < 4:
            raise ValueError(f"SimpleCNN: image_size={image_size!r} is out of range; allowed: an integer ≥ 4")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
        )
        side = image_size // 2 // 2
        self.embedding = nn.Linear(c2 * side * side, embedding_size)
        self.embedding_size = embedding_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.features(images))
