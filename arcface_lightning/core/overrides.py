"""The command line before Hydra sees it: deprecated keys upgraded, bad overrides stopped with one line.

- `upgrade_overrides(argv)`: keys that moved keep working, with a deprecation line (`data.degrees=5` is
  `data.augment.degrees=5` since data.augment became one node).
- `check_overrides(argv)`: every config-group choice on the command line must name a file in conf/<group>/, a
  plugin it needs must be installed, and a single run's config must compose. The overrides are read with Hydra's
  own parser, so its whole grammar works (`+`, `++`, `~`, `group@pkg=`, lists for multi-select such as
  `logger=[csv,tensorboard]`, sweeps, `choice()`, `glob()`); only the membership test is ours, to say it in one
  line.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser hydra.main uses: which arguments are overrides
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from arcface_lightning.core.config import CONF_DIR

# config choices that need an optional plugin: (its module, the pyproject extra that installs it)
PLUGINS = {
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}
# keys that moved: old → new (the old ones are still accepted, with a deprecation line)
MOVED_KEYS = {f"data.{key}": f"data.augment.{key}" for key in ("degrees", "translate", "scale", "crop_padding")}
OVERRIDE_KEY = re.compile(r"^(~|\+\+|\+)?([\w.]+)(?=[=@]|$)")


def upgrade_overrides(argv: list[str]) -> list[str]:
    """`argv` with each moved key replaced by its new name; a line on stderr says so."""
    upgraded = []
    for text in argv:
        match = OVERRIDE_KEY.match(text)
        if match and match.group(2) in MOVED_KEYS:
            new = MOVED_KEYS[match.group(2)]
            print(f"warning: {match.group(2)} is deprecated; it is now {new}", file=sys.stderr)
            text = f"{match.group(1) or ''}{new}{text[match.end() :]}"
        upgraded.append(text)
    return upgraded


def group_values(override: Override, options: list[str]) -> list[str]:
    """The config names an override of a group selects (several for a list, a sweep or a glob)."""
    if override.is_sweep_override():
        if isinstance(override.value(), Glob):
            return override.value().filter(options)
        if isinstance(override.value(), ChoiceSweep):
            return list(override.sweep_string_iterator())
        return [override.input_line.partition("=")[2]]  # range() or interval() of a group: never a config name
    value = override.value()
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None and "${" not in str(v)]  # null deselects; ${..} resolves later


def check_overrides(argv: list[str], config_name: str, conf_dir: Path = CONF_DIR) -> None:
    """Exit with one line when a command-line override cannot be parsed, selects a config that conf/<group>/ does
    not have, needs a plugin that is not installed, or (single runs) does not compose. Groups of Hydra and its
    plugins (hydra/...) are left to Hydra."""
    args = get_args_parser().parse_args(argv)
    parser = OverridesParser.create()
    parsed = []
    for text in args.overrides:
        try:
            override = parser.parse_override(text)
            parsed.append(override)
        except HydraException as error:
            reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
            raise SystemExit(f"error: cannot parse the override {text!r}: {reason}") from None
        group = override.key_or_group
        folder = conf_dir / group
        if group.startswith("hydra/") or not folder.is_dir() or (override.is_delete() and override.value() is None):
            continue
        if override.value() is None and not override.is_delete():  # Hydra 1.3 only deselects with ~
            raise SystemExit(f"error: {text}: a config group is deselected with ~{group}, not {group}=null")
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if isinstance(override.value(), Glob) and not override.value().filter(options):
            raise SystemExit(f"error: {text} matches no config in conf/{group}/; allowed: {', '.join(options)}")
        for name in group_values(override, options):
            if name not in options:
                raise SystemExit(
                    f"error: {group}={name} is not a config in conf/{group}/; allowed: {', '.join(options)}"
                )
    for text in args.overrides:
        choice = text.lstrip("+~")
        if choice in PLUGINS and importlib.util.find_spec(PLUGINS[choice][0]) is None:
            raise SystemExit(
                f"error: {choice} needs the {PLUGINS[choice][1]!r} extra: pip install -e '.[{PLUGINS[choice][1]}]'"
            )
    plain_run = not (args.multirun or args.cfg or args.help or args.hydra_help or args.info or args.shell_completion)
    if plain_run and not (args.config_path or args.config_dir or args.config_name):
        points = [first_point(override, text) for override, text in zip(parsed, args.overrides, strict=True)]
        sweeps = [text for text, point in zip(args.overrides, points, strict=True) if point != text]
        check_composition([p for p in points if p is not None], config_name, conf_dir, sweeps)


def first_point(override: Override, text: str) -> str | None:
    """The override as the first job of a sweep sees it (`seed=0,1,2` → `seed=0`); None for a sweep the sweeper
    draws (interval()); the text itself when it is no sweep."""
    if not override.is_sweep_override():
        return text
    try:
        value = next(iter(override.sweep_string_iterator()))
    except Exception:  # interval(), or a glob over a group: nothing to take the first of here
        return None
    prefix = text[: len(text) - len(text.lstrip("+~"))]
    return f"{prefix}{override.get_key_element()}={value}"


def check_writable_folder(key: str, folder: str | None) -> None:
    """Exit with one line unless `folder` exists as a folder or can be made: its nearest existing ancestor is a
    folder this process can create entries in (tried with a temporary folder, removed at once, so a run dir whose
    name holds the time is not made ahead of Hydra)."""
    if folder is None:
        return
    path = Path(folder).absolute()
    ancestor = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if ancestor.is_dir() and ancestor == path:
        return
    if not ancestor.is_dir():
        raise SystemExit(f"error: {key}={folder} cannot be made: {ancestor} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(dir=ancestor).cleanup()
    except OSError as error:
        raise SystemExit(
            f"error: {key}={folder} cannot be made: no folder can be made in {ancestor} ({error.strerror})"
        ) from None


def check_composition(overrides: list[str], config_name: str, conf_dir: Path, sweeps: list[str] = ()) -> None:
    """Compose the config as hydra.main is about to (a sweep at its first point: a config such as sweep=s_m may set
    hydra.mode=MULTIRUN without -m), and say in one line why it does not compose (a key that the config does not
    have, a value of the wrong type for a typed node, a sweep in a single run)."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        try:
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as error:
            message = str(error)
        else:
            if sweeps and str(OmegaConf.select(cfg, "hydra.mode", default=None)) != "RunMode.MULTIRUN":
                raise SystemExit(f"error: {sweeps[0]} is a sweep, and this is a single run; allowed: -m (or a "
                                 "config that sets hydra.mode=MULTIRUN, such as sweep=s_m), or one value")  # fmt: skip
            check_writable_folder("hydra.run.dir", OmegaConf.select(cfg, "hydra.run.dir", default=None))
            return
        missing = re.match(r"Could not override '([^']+)'", message)
        if missing is None:
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            lines = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
            raise SystemExit(f"error: {'; '.join(lines[:3])}")
        key = missing.group(1)
        parent = key.rpartition(".")[0]
        others = [o for o in overrides if not o.lstrip("+~").startswith(key)]
        try:  # the keys the node does have, from the config composed without the offending override
            node = OmegaConf.select(compose(config_name=config_name, overrides=others), parent or "")
            keys = ", ".join(k for k in node if not str(k).startswith("_")) if isinstance(node, DictConfig) else "?"
        except (HydraException, OmegaConfBaseException):
            keys = "?"
        where = f"{parent} has" if parent else "the config has"
        raise SystemExit(f"error: {key}: no such key; {where}: {keys} (a new key needs a '+': +{key}=...)")
