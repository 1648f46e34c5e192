"""The backbones: the seed network exactly by default, the recipe options' shapes, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from arcface_lightning.models.backbones import ResNet, SimpleCNN


def test_simple_cnn_defaults_are_the_seed_network() -> None:
    net = SimpleCNN()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64)]
    assert net.embedding.in_features == 64 * 7 * 7 and net.embedding.out_features == 128
    assert sum(p.numel() for p in net.parameters()) == 320 + 18_496 + 3136 * 128 + 128


@pytest.mark.parametrize("channels, convs, batch_norm", [([4, 8, 16], 2, True), ([8], 1, False)])
def test_simple_cnn_options_shape_the_embedding(channels: list[int], convs: int, batch_norm: bool) -> None:
    net = SimpleCNN(
        embedding_size=5, in_channels=3, image_size=32, channels=channels, convs_per_block=convs, batch_norm=batch_norm
    )
    assert net(torch.rand(4, 3, 32, 32)).shape == (4, 5)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == convs * len(channels)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == batch_norm


def test_resnet18_has_the_cifar_stem_and_resnet18_size() -> None:
    net = ResNet(embedding_size=16)
    assert net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    body = sum(p.numel() for name, p in net.named_parameters() if not name.startswith("embedding"))
    assert 11.1e6 < body < 11.2e6  # ResNet-18 without its classifier
    assert ResNet(embedding_size=6, width=4, blocks=[1, 1])(torch.rand(2, 3, 32, 32)).shape == (2, 6)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: SimpleCNN(channels=[]),
            r"^SimpleCNN: channels=\[\] is invalid; allowed: a non-empty list of integers ≥ 1$",
        ),
        (lambda: SimpleCNN(channels=[8, 0]), r"^SimpleCNN: channels=\[8, 0\] is invalid"),
        (lambda: SimpleCNN(convs_per_block=0), r"^SimpleCNN: convs_per_block=0 is invalid; allowed: an integer"),
        (
            lambda: SimpleCNN(image_size=4, channels=[4, 4, 4]),
            r"^SimpleCNN: image_size=4 is invalid; allowed: an integer ≥ 8$",
        ),
        (
            lambda: ResNet(blocks=[2, 0]),
            r"^ResNet: blocks=\[2, 0\] is invalid; allowed: a non-empty list of integers ≥ 1$",
        ),
        (lambda: ResNet(width=0), r"^ResNet: width=0 is invalid; allowed: an integer ≥ 1$"),
    ],
)
def test_bad_backbone_settings_are_one_line_errors(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
