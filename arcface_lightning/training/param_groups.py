"""The optimiser's parameter groups: `optimizer.no_decay_norm_bias` and `optimizer.head_lr_scale`.

Both keys live in the optimizer's config (conf/optimizer/*.yaml) but are not torch.optim's: `split_optimizer_config`
takes them out before the rest is instantiated. With both at their defaults (false, 1) the optimiser gets the one
group it always had (plus the head's own, Partial FC's), unnamed, so checkpoints written before resume as they were.
Otherwise the model's parameters are split into named groups, in this order, empty ones left out:

    backbone | head             head_lr_scale ≠ 1: the head's parameters (the class centres) at lr × k
    <part>_no_decay             no_decay_norm_bias: weight_decay 0 for biases and normalisation parameters
    head_own                    the head's own groups (protocol.optimizer_groups: Partial FC's sampled rows), lr × k

(`model` and `model_no_decay` when only no_decay_norm_bias is set.) Exempt from weight decay: every parameter whose
name ends in `bias`, and every parameter of a normalisation layer — torch's batch, instance, layer, group and RMS
norms, and any other module whose class name contains "Norm" (timm's) — and of `nn.PReLU`: decay pulls its slopes
to 0, making it a ReLU (He et al. 2015 train PReLU without weight decay for that reason). The class centres are
weights: they keep their decay, as do Partial FC's rows.

A scheduler sets each group's learning rate from its own starting value, so the × k carries through cosine, step
and linear schedules as it is. Those given an absolute rate (OneCycleLR's `max_lr`, CyclicLR's `base_lr` and
`max_lr`, ReduceLROnPlateau's `min_lr`) would overwrite it with one number for every group: `per_group_rates`
turns such a number into the list of its per-group values. Plain torch: no Lightning, no Hydra.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from arcface_lightning.core.checks import check_number, require

log = logging.getLogger(__name__)

KEYS = ("no_decay_norm_bias", "head_lr_scale")
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
    nn.PReLU,
)
ABSOLUTE_RATES = ("max_lr", "base_lr", "min_lr")  # scheduler arguments that set a group's rate outright


@dataclass(frozen=True)
class GroupSettings:
    """`optimizer.no_decay_norm_bias` and `optimizer.head_lr_scale`."""

    no_decay_norm_bias: bool = False
    head_lr_scale: float = 1.0

    @property
    def split(self) -> bool:
        """Whether the model's parameters are split into named groups (either key away from its default)."""
        return self.no_decay_norm_bias or self.head_lr_scale != 1.0


def split_optimizer_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], GroupSettings]:
    """(the optimizer's config without KEYS, what torch.optim is built from; the settings, checked). A bad value
    raises checks.BadValue (owner `optimizer`, the key's name)."""
    config = dict(config)
    no_decay = config.pop("no_decay_norm_bias", False)
    scale = config.pop("head_lr_scale", 1.0)
    require("optimizer", "no_decay_norm_bias", no_decay, "true or false", lambda v: isinstance(v, bool))
    check_number("optimizer", "head_lr_scale", scale, "a finite number > 0", lambda v: v > 0)
    return config, GroupSettings(no_decay, float(scale))


def exempt_from_decay(module: nn.Module, name: str) -> bool:
    """Whether `module`'s own parameter `name` is a bias or a normalisation layer's (see the module doc)."""
    return name.endswith("bias") or isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


@dataclass
class ParamGroup:
    """One group: its name, its parameters and their names in the model, its lr factor and whether it decays."""

    name: str
    lr_scale: float = 1.0
    no_decay: bool = False
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "name": self.name, **({"weight_decay": 0.0} if self.no_decay else {})}


def plan(
    model: nn.Module, settings: GroupSettings, exclude: Sequence[str] = (), head: str = "head"
) -> list[ParamGroup]:
    """The model's groups (the head's own groups aside): every parameter but those named in `exclude`, once each,
    in the model's order within a group. `head`: the name of the head's submodule."""
    if not settings.split:
        group = ParamGroup("model")
        for name, param in model.named_parameters():
            if name not in exclude:
                group.names.append(name)
                group.params.append(param)
        return [group]
    parts = ("backbone", "head") if settings.head_lr_scale != 1.0 else ("model",)
    groups = {
        f"{part}{suffix}": ParamGroup(
            f"{part}{suffix}", settings.head_lr_scale if part == "head" else 1.0, bool(suffix)
        )
        for part in parts
        for suffix in ("", "_no_decay")
    }
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            if name in exclude or id(param) in seen:
                continue
            seen.add(id(param))
            part = "model" if len(parts) == 1 else "head" if name.startswith(f"{head}.") else "backbone"
            no_decay = settings.no_decay_norm_bias and exempt_from_decay(module, local)
            group = groups[f"{part}{'_no_decay' if no_decay else ''}"]
            group.names.append(name)
            group.params.append(param)
    order = [f"{part}{suffix}" for part in parts for suffix in ("", "_no_decay")]
    return [groups[name] for name in order if groups[name].params]


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer],
    groups: list[ParamGroup],
    head_groups: list[dict[str, Any]],
    settings: GroupSettings,
) -> tuple[torch.optim.Optimizer, list[float]]:
    """The optimiser over `groups` then the head's own groups (last: Partial FC steps its rows in the last), and
    each param group's lr factor. Without `settings.split`, exactly the optimiser the module always built."""
    if not settings.split:
        params = groups[0].params
        optimizer = factory(params=[{"params": params}, *head_groups] if head_groups else params)
        return optimizer, [1.0] * len(optimizer.param_groups)
    own = [{"name": "head_own" if len(head_groups) == 1 else f"head_own_{i}", **g} for i, g in enumerate(head_groups)]
    optimizer = factory(params=[group.as_dict() for group in groups] + own)
    scales = [group.lr_scale for group in groups] + [settings.head_lr_scale] * len(own)
    for group, scale in zip(optimizer.param_groups, scales, strict=True):
        if scale != 1.0:
            group["lr"] = group["lr"] * scale
    return optimizer, scales


def describe(optimizer: torch.optim.Optimizer, groups: list[ParamGroup], head_local: Mapping[str, int]) -> list[str]:
    """One line per param group: name, tensors, values, lr, weight_decay. The head's own groups are described by
    the parameters they step (`head_local`: name → values on this rank), their slot being empty until a step."""
    lines = []
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name") or (groups[i].name if i < len(groups) else "head_own")
        if i < len(groups):
            tensors = len(group["params"])
            what = f"{tensors} tensor{'s' * (tensors != 1)}, {sum(p.numel() for p in group['params']):,} values"
        else:
            rows = ", ".join(f"head.{n} ({v:,} values on this rank)" for n, v in head_local.items())
            what = f"stepped through the head: {rows or 'its own parameters'}"
        lines.append(
            f"optimizer group {name}: {what}, lr {group['lr']:g}, weight_decay {group.get('weight_decay', 0):g}"
        )
    return lines


def per_group_rates(factory: Mapping[str, Any], scales: Sequence[float]) -> dict[str, list[float]]:
    """The scheduler's absolute rates (ABSOLUTE_RATES) given as one number, as one value per param group (× the
    group's lr factor), to call its factory with, so the schedule keeps the groups' ratio. Empty when every factor is
    1; a rate given as a list already is the user's."""
    if all(scale == 1.0 for scale in scales):
        return {}
    numbers = {key: factory[key] for key in ABSOLUTE_RATES if isinstance(factory.get(key), (int, float))}
    return {key: [value * scale for scale in scales] for key, value in numbers.items() if not isinstance(value, bool)}
