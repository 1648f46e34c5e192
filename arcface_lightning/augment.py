"""Batched augmentation on the training device: per-sample random parameters, one grid_sample for the whole batch.

torchvision's RandomAffine and RandomCrop + RandomHorizontalFlip draw their parameters once per call; here each
image of the batch gets its own draw from a seeded generator, so a resumed run augments as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    degrees: float,
    translate: float,
    scale: tuple[float, float],
) -> torch.Tensor:
    """Per-sample random rotation (±degrees), translation (± translate · side) and scale, bilinear, zero fill.

    torchvision's RandomAffine with the same ranges, drawn per image but applied to the whole batch in one
    grid_sample (torchvision's v2 transforms draw one set of parameters per call, i.e. per batch).
    """
    n = len(images)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=images.device)

    angle = uniform(-degrees, degrees) * (math.pi / 180)
    factor = uniform(*scale)
    shift = uniform(-translate, translate), uniform(-translate, translate)
    return _warp(images, angle, factor, shift, flip=torch.zeros(n, dtype=torch.bool, device=images.device))


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int) -> torch.Tensor:
    """Per-sample random crop of the zero-padded image (shifts of -padding..padding pixels) and horizontal flip
    with probability 1/2: torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, batched."""
    n, _, height, width = images.shape
    device = images.device
    dx = torch.randint(-padding, padding + 1, (n,), generator=generator, device=device) / width
    dy = torch.randint(-padding, padding + 1, (n,), generator=generator, device=device) / height
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    ones = torch.ones(n, device=device)
    return _warp(images, torch.zeros(n, device=device), ones, (dx, dy), flip, mode="nearest")


def _warp(
    images: torch.Tensor,
    angle: torch.Tensor,
    factor: torch.Tensor,
    shift: tuple[torch.Tensor, torch.Tensor],
    flip: torch.Tensor,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Moves each image's content by (shift · side), rotates it by `angle` (radians, counter-clockwise as displayed,
    torchvision's convention) and scales it by `factor` about the centre, after an optional horizontal flip.
    affine_grid maps output to input coordinates, hence the inverse transform."""
    cos, sin = torch.cos(angle) / factor, -torch.sin(angle) / factor  # minus: image rows grow downwards
    mirror = 1.0 - 2.0 * flip.to(images.dtype)
    dx, dy = shift[0] * 2, shift[1] * 2  # fractions of the side → normalised [-1, 1] coordinates
    theta = torch.stack(
        [
            torch.stack([cos * mirror, sin * mirror, -(cos * dx + sin * dy) * mirror], 1),
            torch.stack([-sin, cos, sin * dx - cos * dy], 1),
        ],
        1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
