"""Face-recognition backbones: aligned face crops (batch, channels, 112, 112) → embeddings (batch, embedding_size).

- `IResNet`: the ResNets of ArcFace (Deng et al., CVPR 2019, "LResNetE-IR"), as in insightface's
  recognition/arcface_torch/backbones/iresnet.py: IResNet-18/34/50/100 are blocks (2,2,2,2), (3,4,6,3),
  (3,4,14,3) and (3,13,30,3).
- `MobileFaceNet`: Chen et al. 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on
  Mobile Devices" (0.99 M parameters, 221 M multiply-adds at 112×112, embedding 128), as in insightface's
  arcface_torch/backbones/mobilefacenet.py, whose `scale=2` is arcface_torch's "mbf".

Both follow insightface's module names and shapes, so that one of its trained backbones (backbone.pth, at
image_size 112, in_channels 3) can be loaded with `load_state_dict`. Both downsample four times by stride-2
convolutions (3×3 with padding 1, or 1×1), each giving ⌈side/2⌉: 112 → 7, and any image_size ≥ 16 works (28 → 2,
32 → 2); the layer after the last stage is sized for it. Plain torch; initialisation is PyTorch's default
(insightface draws IResNet's convolutions from N(0, 0.1)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from arcface_lightning.core.checks import check_int, check_ints, check_number, is_int, require

STAGES = 4  # stride-2 stages of both networks


def final_side(image_size: int, halvings: int = STAGES) -> int:
    """The feature map's side after `halvings` stride-2 convolutions (3×3 with padding 1, or 1×1): ⌈side/2⌉ each."""
    for _ in range(halvings):
        image_size = (image_size + 1) // 2
    return image_size


def check_input(owner: str, embedding_size: int, in_channels: int, image_size: int) -> None:
    check_int(owner, "embedding_size", embedding_size)
    check_int(owner, "in_channels", in_channels)
    allowed = "an integer ≥ 16 (four stride-2 stages; aligned face crops are 112, MNIST's 28 and CIFAR's 32 work too)"
    require(owner, "image_size", image_size, allowed, lambda v: is_int(v) and v >= 16)


class IBasicBlock(nn.Module):
    """ArcFace's improved residual unit: BN → conv3×3 → BN → PReLU → conv3×3 (stride) → BN, plus the input (through
    conv1×1 (stride) → BN where the shape changes). No activation after the sum, and the stride sits on the second
    conv: the "BN-Conv-BN-PReLU-Conv-BN" block of the ArcFace paper."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """IResNet: stem conv3×3(64, stride 1) → BN → PReLU; four stages of `IBasicBlock`s with 64, 128, 256, 512
    channels, each opening with a stride-2 block (112 → 56 → 28 → 14 → 7); then the ArcFace "E" output:
    BN2d → flatten → dropout → FC(512·side² → embedding_size) → BatchNorm1d.

    The output BatchNorm1d's scale (γ) is fixed at 1 and not trained (`requires_grad=False`), as in insightface
    (which does not say why): the heads normalise the embedding, and the FC before it can already scale each
    dimension, so γ adds nothing but a redundant degree of freedom. Its shift (β) is trained.

    Args:
        blocks: blocks per stage; (2,2,2,2) IResNet-18, (3,4,6,3) -34, (3,4,14,3) -50, (3,13,30,3) -100.
        image_size: the input's side; 112 for aligned face crops (the FC input is then 512·7·7).
        dropout: probability of dropping FC inputs in training (insightface's default: 0).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        in_channels: int = 3,
        image_size: int = 112,
        blocks: Sequence[int] = (3, 4, 14, 3),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_input("IResNet", embedding_size, in_channels, image_size)
        check_ints("IResNet", "blocks", blocks)
        require("IResNet", "blocks", blocks, f"a list of {STAGES} integers ≥ 1", lambda v: len(v) == STAGES)
        check_number("IResNet", "dropout", dropout, "a number in [0, 1)", lambda v: 0 <= v < 1)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        channels = 64
        for stage, count in enumerate(blocks):
            out = 64 * 2**stage
            units = [IBasicBlock(channels, out, stride=2)] + [IBasicBlock(out, out, stride=1) for _ in range(count - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*units))
            channels = out
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * final_side(image_size) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        self.embedding_size = embedding_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


class Chain(nn.Module):
    """Modules applied in turn, held as `.layers`: the state-dict layout of insightface's MobileFaceNet."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    padding: int | None = None,
    activation: bool = True,
) -> Chain:
    """conv (no bias: BN follows) → BN → PReLU; without the PReLU (`activation=False`) a "linear" conv."""
    padding = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return Chain(*layers, *([nn.PReLU(out_channels)] if activation else []))


class Bottleneck(Chain):
    """MobileNetV2's inverted residual with PReLU: 1×1 expansion to `expanded` channels → 3×3 depthwise (stride) →
    1×1 linear projection (no activation: a ReLU-family function on the narrow output loses information), plus the
    input when `residual`."""

    def __init__(self, in_channels: int, out_channels: int, expanded: int, stride: int, residual: bool) -> None:
        super().__init__(
            conv_bn(in_channels, expanded),
            conv_bn(expanded, expanded, 3, stride=stride, groups=expanded),
            conv_bn(expanded, out_channels, activation=False),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


def repeated(channels: int, count: int, expanded: int) -> Chain:
    return Chain(*(Bottleneck(channels, channels, expanded, stride=1, residual=True) for _ in range(count)))


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al. 2018, Table 1), at 112×112 (scale 1):

        conv3×3(64, stride 2) → depthwise conv3×3(64)                                   56×56
        → bottleneck(expand to 128, stride 2) + 4 × bottleneck(expand 128)              28×28, 64 channels
        → bottleneck(expand 256, stride 2) to 128 + 6 × bottleneck(expand 256)          14×14, 128 channels
        → bottleneck(expand 512, stride 2) + 2 × bottleneck(expand 256)                 7×7, 128 channels
        → conv1×1(512) → global depthwise conv 7×7 (linear, "GDC") → FC(embedding_size) → BatchNorm1d

    with BN and PReLU after every conv but the linear ones. The paper's embedding is 128-d; 0.99 M parameters.
    The GDC weighs each position of the last map instead of averaging it (faces are aligned: the centre matters
    more than the corners); its kernel is the map's side (7 at 112).

    Args:
        blocks: the repeated bottlenecks of the four stages (the first stage's 1 is the plain depthwise conv).
        scale: width multiplier of the 64/128-channel stages; the expansion widths (128, 256, 512) stay as they are.
            2 is insightface arcface_torch's "mbf" (with embedding_size 512); blocks (2, 8, 12, 4) with scale 4 its
            "mbf_large".
    """

    def __init__(
        self,
        embedding_size: int = 128,
        in_channels: int = 3,
        image_size: int = 112,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 1,
    ) -> None:
        super().__init__()
        check_input("MobileFaceNet", embedding_size, in_channels, image_size)
        check_ints("MobileFaceNet", "blocks", blocks)
        require("MobileFaceNet", "blocks", blocks, f"a list of {STAGES} integers ≥ 1", lambda v: len(v) == STAGES)
        check_int("MobileFaceNet", "scale", scale)
        narrow, wide = 64 * scale, 128 * scale
        # insightface's grouping: 64 groups whatever the scale (depthwise at scale 1), or a residual stage
        first = conv_bn(narrow, narrow, 3, groups=64) if blocks[0] == 1 else repeated(narrow, blocks[0], 128)
        self.layers = nn.ModuleList(
            [
                conv_bn(in_channels, narrow, 3, stride=2),
                first,
                Bottleneck(narrow, narrow, 128, stride=2, residual=False),
                repeated(narrow, blocks[1], 128),
                Bottleneck(narrow, wide, 256, stride=2, residual=False),
                repeated(wide, blocks[2], 256),
                Bottleneck(wide, wide, 512, stride=2, residual=False),
                repeated(wide, blocks[3], 256),
            ]
        )
        self.conv_sep = conv_bn(wide, 512)
        side = final_side(image_size)
        self.features = Chain(
            conv_bn(512, 512, side, groups=512, padding=0, activation=False),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.embedding_size = embedding_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))
