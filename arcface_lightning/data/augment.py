"""Training augmentation: the `data.augment` settings, and their batched form on the training device.

torchvision's RandomAffine and RandomCrop + RandomHorizontalFlip draw their parameters once per call; here each
image of the batch gets its own draw from a seeded generator, applied to the whole batch in one grid_sample, so a
resumed run augments as an uninterrupted one. `per_sample_transforms` gives the same settings as torchvision's
per-sample transforms, for the data module's per-sample pipeline.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import transforms

from arcface_lightning.core.checks import check_choice, check_int, check_number, require

KINDS = ("affine", "crop_flip")
DEFAULTS: dict[str, Any] = {"kind": None, "degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1), "crop_padding": 4}


def settings(
    owner: str, augment: str | Mapping[str, Any] | None, legacy: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The `data.augment` node, checked and completed with the defaults. A kind alone (`data.augment=affine`, the
    key's older form) or null stands for that kind with the default ranges. `legacy`: values of the flat keys the
    node replaced (`data.degrees`, ...; None where not given), folded in with a FutureWarning."""
    if legacy := {k: v for k, v in (legacy or {}).items() if v is not None}:
        warnings.warn(
            f"data.{', data.'.join(legacy)}: deprecated, now data.augment.<key> (data.augment is one node)",
            FutureWarning,
            stacklevel=3,
        )
        augment = {**({"kind": augment} if augment is None or isinstance(augment, str) else augment), **legacy}
    if augment is None or isinstance(augment, str):
        check_choice(owner, "augment", augment, (None, *KINDS))
        return {**DEFAULTS, "kind": augment}
    keys = ", ".join(DEFAULTS)
    require(owner, "augment", augment, f"null, a kind, or a node of {keys}", lambda v: set(v) <= set(DEFAULTS))
    node = {**DEFAULTS, **augment}
    check_choice(owner, "augment.kind", node["kind"], (None, *KINDS))
    check_number(owner, "augment.degrees", node["degrees"], "0 ≤ degrees ≤ 180", lambda v: 0 <= v <= 180)
    check_number(owner, "augment.translate", node["translate"], "0 ≤ translate < 1", lambda v: 0 <= v < 1)
    ok_scale = lambda v: len(v) == 2 and 0 < v[0] <= v[1]  # noqa: E731
    require(owner, "augment.scale", node["scale"], "[low, high] with 0 < low ≤ high", ok_scale)
    check_int(owner, "augment.crop_padding", node["crop_padding"], minimum=0)
    return {**node, "scale": tuple(node["scale"])}


class BatchPreparation:
    """uint8 (batch, C, H, W) → float in [0, 1] → augmented (when a generator is given) → normalised, on the device
    the batch is on. `generator(...)` gives the augmentation randomness, reseeded from (the run's shuffle seed,
    epoch, rank) at each epoch's first batch, so a resumed run augments as an uninterrupted one."""

    def __init__(self, node: Mapping[str, Any], normalize: bool, mean: Any, std: Any) -> None:
        self.node, self.normalize, self.mean, self.std = node, normalize, list(mean), list(std)
        self._generator: torch.Generator | None = None
        self._key: tuple[int, torch.device] | None = None  # (epoch, device) it was seeded for

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        images = images.float().div_(255)
        if generator is not None:
            images = augment_batch(images, generator, self.node)
        if self.normalize:  # torchvision's own normalize, batched: the same ops as the per-sample pipeline
            images = transforms.functional.normalize(images, self.mean, self.std, inplace=True)
        return images

    def generator(self, device: torch.device, seed: int, epoch: int, rank: int) -> torch.Generator:
        if self._key != (epoch, device):
            mixed = (seed * 1_000_003 + epoch) * 1_009 + rank
            self._generator = torch.Generator(device).manual_seed(mixed % 2**63)
            self._key = (epoch, device)
        return self._generator


def augment_batch(images: torch.Tensor, generator: torch.Generator, node: Mapping[str, Any]) -> torch.Tensor:
    """A float (batch, C, H, W) batch augmented as `node` (checked by `settings`) says; unchanged for kind null."""
    if node["kind"] == "affine":
        return random_affine(images, generator, node["degrees"], node["translate"], node["scale"])
    if node["kind"] == "crop_flip":
        return random_crop_flip(images, generator, node["crop_padding"])
    return images


def per_sample_transforms(node: Mapping[str, Any], image_size: int) -> list[Any]:
    """torchvision's per-sample transforms with the same settings (PIL in, PIL out)."""
    if node["kind"] == "affine":
        shift = (node["translate"], node["translate"])
        bilinear = transforms.InterpolationMode.BILINEAR
        return [transforms.RandomAffine(node["degrees"], translate=shift, scale=node["scale"], interpolation=bilinear)]
    if node["kind"] == "crop_flip":
        return [transforms.RandomCrop(image_size, padding=node["crop_padding"]), transforms.RandomHorizontalFlip()]
    return []


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
