"""Which classes a model's settings may name: the allow-list every model is built from.

A checkpoint stores the model's parts as `_target_` dicts (conf/model/arcface.yaml), and rebuilding the model used to
hand them to Hydra's `instantiate`, which imports and calls whatever a dict names: a checkpoint whose optimizer was
`{_target_: torch.load, _args_: [other file], weights_only: false}` ran the other file's pickle. Hydra's own
blocklist is best-effort by its own account, so nothing a file names is called unless it is listed here:

- backbone: the project's backbones; head: the project's heads;
- optimizer: a `torch.optim` optimizer class; scheduler: a `torch.optim.lr_scheduler` class;
- and, for a user's own classes, the dotted names given with `allowed_targets=[...]` (on the command line or in a
  config file: the user's word, never the file's).

A target must stand at the top of its part: a `_target_` nested anywhere inside (an argument that would itself be
built) is refused. Names are checked as text before anything is imported. The same check runs when a model is built
for training, so a config that trains is a config that loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from arcface_lightning.core.checks import TargetNotAllowed

BACKBONES = frozenset(
    {
        "arcface_lightning.models.backbones.SimpleCNN",
        "arcface_lightning.models.backbones.ResNet",
        "arcface_lightning.models.backbones.TimmBackbone",
        "arcface_lightning.models.face_backbones.IResNet",
        "arcface_lightning.models.face_backbones.MobileFaceNet",
    }
)
HEADS = frozenset(
    {
        f"arcface_lightning.models.heads.{name}"
        for name in ("ArcFaceHead", "CosFaceHead", "SphereFaceHead", "CombinedMarginHead", "SoftmaxHead")
    }
    | {
        f"arcface_lightning.models.recent_heads.{name}"
        for name in ("SubCenterArcFaceHead", "AdaFaceHead", "ElasticFaceHead", "CurricularFaceHead")
    }
)
ALLOWED_BY_PART = {"backbone": BACKBONES, "head": HEADS}
# The model's parts moved into arcface_lightning.models; checkpoints written before name them at the old paths.
MOVED_MODULES = {
    f"arcface_lightning.{name}.": f"arcface_lightning.models.{name}."
    for name in ("heads", "recent_heads", "backbones", "face_backbones")
}
_user_targets: set[str] = set()


def current_target(config: Any) -> Any:
    """`config` with a `_target_` that names a class at its path before the package was grouped, renamed to where
    the class lives now (anything else is returned as it is, for check_part to judge)."""
    target = config.get("_target_") if isinstance(config, Mapping) else None
    for old, new in MOVED_MODULES.items():
        if isinstance(target, str) and target.startswith(old) and "." not in target[len(old) :]:
            return {**config, "_target_": new + target[len(old) :]}
    return config


def allow(targets: Iterable[str] | None) -> None:
    """Add a user's own classes (dotted names) to the allow-list of this process: `allowed_targets=[...]`."""
    for target in targets or ():
        if not isinstance(target, str) or not target.replace("_", "a").replace(".", "a").isalnum():
            raise TargetNotAllowed(f"allowed_targets: {target!r} is invalid; allowed: dotted class names")
        _user_targets.add(target)


def _torch_class(target: str, namespace: Any, base: type) -> bool:
    """Whether `target` is `<namespace>.<Name>` for a subclass of `base` that torch already defines there."""
    prefix = namespace.__name__ + "."
    if not target.startswith(prefix) or "." in target[len(prefix) :]:
        return False
    found = getattr(namespace, target[len(prefix) :], None)
    return isinstance(found, type) and issubclass(found, base)


def is_allowed(target: Any, part: str) -> bool:
    if not isinstance(target, str):
        return False
    if target in _user_targets or target in ALLOWED_BY_PART.get(part, ()):
        return True
    if part in ("optimizer", "scheduler"):
        import torch  # a training config: torch is loaded already
    if part == "optimizer":
        return _torch_class(target, torch.optim, torch.optim.Optimizer)
    if part == "scheduler":
        return _torch_class(target, torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
    return False


def allowed_text(part: str) -> str:
    kinds = {
        "backbone": "the project's backbones (conf/backbone/)",
        "head": "the project's heads (conf/head/)",
        "optimizer": "a torch.optim optimizer class",
        "scheduler": "a torch.optim.lr_scheduler class",
    }
    return f"{kinds.get(part, 'nothing')}, or a class named in allowed_targets=[...]"


def check_part(config: Any, part: str) -> None:
    """Raise TargetNotAllowed unless the config's `_target_` is allowed for `part` and nothing inside names one."""
    if not isinstance(config, Mapping):
        raise TargetNotAllowed(f"{part}={config!r} is invalid; allowed: the config of a {part} (a _target_ dict)")
    target = config.get("_target_")
    if not is_allowed(target, part):
        raise TargetNotAllowed(f"{part}._target_={target!r} is not allowed; allowed: {allowed_text(part)}")
    for key, value in config.items():
        _check_nested(value, f"{part}.{key}")


def check_lr_scheduler(config: Any) -> None:
    """Lightning's lr-scheduler dict (`{scheduler: <a scheduler's config>, interval: step, ...}`): its `scheduler`
    entry is checked as a scheduler; nothing else in it may build anything."""
    if not isinstance(config, Mapping):
        raise TargetNotAllowed(f"scheduler={config!r} is invalid; allowed: null or Lightning's lr-scheduler dict")
    check_part(config.get("scheduler"), "scheduler")
    _check_nested({k: v for k, v in config.items() if k != "scheduler"}, "scheduler")


def _check_nested(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        if "_target_" in value:
            target = value["_target_"]
            raise TargetNotAllowed(f"{where}._target_={target!r} is not allowed; allowed: no object inside {where}")
        for key, item in value.items():
            _check_nested(item, f"{where}.{key}")
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for i, item in enumerate(value):
            _check_nested(item, f"{where}[{i}]")
