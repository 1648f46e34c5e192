"""Configs at run time: registration, and bad values turned into one line that names the config key.

The command line itself is checked before Hydra starts, in overrides.py.

- `instantiate_node(cfg, key)`: `hydra.utils.instantiate` whose errors name the config key. A `BadValue` from a
  head, backbone or the data module (checks.py) becomes `head.s=-1 is invalid; allowed: ...`, or names the
  top-level key a value was interpolated from (`embedding_size=...` for `backbone.embedding_size: ${embedding_size}`).
- `check_run_keys(cfg)`: the top-level keys of conf/train.yaml and conf/eval.yaml.
- `print_config(cfg)`: the composed config at start (`extras.print_config`), as a rich tree where rich is installed.
- `register_configs()`: what conf/ needs besides its files (the trainer/lightning node, the resolvers).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from arcface_lightning.core.checks import BadValue, ConfigError, first_line, is_int, require

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
INTERPOLATION = re.compile(r"\$\{([\w.]+)\}")


def native_bf16_precision(cpuinfo: Path = Path("/proc/cpuinfo"), capability: str | None = None) -> str:
    """`bf16-mixed` where the default device computes bfloat16 natively (a CUDA GPU that supports it; a CPU with
    AVX512-BF16 or AMX, read from /proc/cpuinfo), `32-true` elsewhere, where emulated bf16 is slower than fp32.
    bf16 changes float rounding, not the recipe (`trainer.precision: ${native_bf16:}`).

    On the CPU, PyTorch's own limits count too: `ATEN_CPU_CAPABILITY=avx2` (or `default`) keeps ATen's kernels
    below AVX512, and `ONEDNN_MAX_CPU_ISA=AVX2` (or lower) keeps oneDNN's convolutions and matmuls there; with
    either, bf16 is emulated as on a CPU without AVX512, so the choice is fp32. `capability`: ATen's, as
    torch.backends.cpu.get_cpu_capability() reports it (which honours ATEN_CPU_CAPABILITY)."""
    import torch  # here: the training configs resolve it, the serving commands' configs do not

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    aten_limited = capability.upper() in ("DEFAULT", "AVX2", "NO AVX")
    onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    onednn_limited = not onednn_isa.startswith(("ALL", "AVX512", "AVX10", "AMX"))
    native = re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) and not (aten_limited or onednn_limited)
    return "bf16-mixed" if native else "32-true"


PAIR_SELECTION = re.compile(r"^pairs/([\w.-]+/)?(verification_acc|verification_auc|tar_at_far_1e-3|tar_at_far_1e-4)$")


def selection_metric(val_split: str, form: str = "name", select: str | None = None) -> str:
    """The metric that selects checkpoints: for a data.val_split, val/acc (or val/precision_at_1 for by_class); or
    `evaluation.select`, a pair set's metric at validation (pairs/lfw/verification_acc). As `filename`,
    ModelCheckpoint's pattern for it (val_acc_{val/acc:.4f})."""
    from arcface_lightning.evaluation.metrics import SELECTION  # torch: only where a training config is resolved

    if val_split not in SELECTION:
        raise ConfigError(f"data.val_split={val_split!r} is invalid; allowed: {', '.join(SELECTION)}")
    if select is not None and not PAIR_SELECTION.match(str(select)):
        raise ConfigError(f"evaluation.select={select!r} is invalid; allowed: null, or pairs/[<set>/]<metric> with "
                          "metric verification_acc, verification_auc, tar_at_far_1e-3 or tar_at_far_1e-4")  # fmt: skip
    name = select if select is not None else SELECTION[val_split]
    return f"{name.replace('/', '_')}_{{{name}:.4f}}" if form == "filename" else name


def register_configs() -> None:
    """What conf/ needs besides its own files; call it before composing a config and before resolving one. The
    entry points call it in their cli() and again in each job (launchers run jobs in fresh processes).

    - config `trainer/lightning`: every Lightning Trainer flag at its default, which trainer/default.yaml extends,
      so `trainer.<any flag>=...` works without `+` and stays in step with the installed Lightning;
    - `${repo_root:}`: data/ and logs/ default to the repository, wherever the command is run from;
    - `${native_bf16:}`: see native_bf16_precision;
    - `${selection:<data.val_split>,name,<evaluation.select>}`: the validation metric that picks the checkpoint
      (metrics.SELECTION, or a pair set's metric), and `${selection:...,filename,...}` the file name's pattern;
    - `${pid:}` in run and sweep dir names: two runs started in the same second never share a folder. Cached, so
      the jobs of a sweep, sent to other processes by launchers, see the launching process's value.
    """
    ConfigStore.instance().store(
        group="trainer", name="lightning", node={"_target_": "lightning.pytorch.Trainer", **trainer_flags()}
    )
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)
    OmegaConf.register_new_resolver("native_bf16", native_bf16_precision, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("selection", selection_metric, replace=True)


PLAIN_DEFAULT = (bool, int, float, str)  # the Trainer flags conf/ can set: defaults None or of these types


@functools.cache
def trainer_flags() -> dict[str, Any]:
    """Every flag of Lightning's `Trainer` whose default is None, a bool, an int, a float or a str, at that default
    (what `inspect.signature(lightning.pytorch.Trainer.__init__)` gives; a test holds the two equal). Read with `ast`
    from the installed Lightning's source, lightning/pytorch/trainer/trainer.py, without importing it: importing
    Lightning takes seconds, and the commands that never build a Trainer (search, verify, embed with an export)
    compose configs too. Where that file cannot be read (Lightning installed otherwise), the signature itself."""
    spec = importlib.util.find_spec("lightning")  # a top-level name: finding it imports nothing
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    source = Path(folders[0], "pytorch", "trainer", "trainer.py") if folders else None
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), str(source))  # type: ignore[union-attr]
        trainer = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Trainer")
        init = next(node for node in trainer.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    except (AttributeError, OSError, StopIteration, SyntaxError, UnicodeDecodeError):
        import lightning as L

        parameters = inspect.signature(L.Trainer.__init__).parameters.items()
        defaults = {name: p.default for name, p in parameters if p.default is not inspect.Parameter.empty}
        return {k: v for k, v in defaults.items() if v is None or isinstance(v, PLAIN_DEFAULT)}
    args = init.args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True))
    keyword = zip(args.kwonlyargs, args.kw_defaults, strict=True)
    pairs += [(arg, default) for arg, default in keyword if default is not None]  # None: no default
    flags = {}
    for arg, default in pairs:
        try:
            value = ast.literal_eval(default)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # a name or a call: not plain data
            continue
        if value is None or isinstance(value, PLAIN_DEFAULT):
            flags[arg.arg] = value
    return flags


def root_cause(error: BaseException) -> BaseException:
    """The error under Hydra's InstantiationException wrappers."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def one_line(error: BaseException) -> str:
    """The message a user needs: the root cause of Hydra's wrapped instantiation errors, first line only."""
    return first_line(root_cause(error))


def source_key(cfg: DictConfig, key: str, name: str) -> str:
    """The key a user sets for argument `name` of the node at `key`: the key it is interpolated from, if any."""
    node = OmegaConf.select(cfg, key)
    raw = OmegaConf.to_container(node, resolve=False).get(name) if isinstance(node, DictConfig) else None
    match = INTERPOLATION.fullmatch(raw) if isinstance(raw, str) else None
    return match.group(1) if match else f"{key}.{name}"


def named_error(cfg: DictConfig, key: str, error: BaseException) -> ConfigError:
    """A ConfigError whose one line names the config key the bad value came from."""
    cause = root_cause(error)
    if isinstance(cause, MissingMandatoryValue):
        where = f"{key}.{cause.full_key}" if cause.full_key else key
        return ConfigError(f"{where} is required (the config has ???); set {where}=...")
    if isinstance(cause, BadValue):
        where = source_key(cfg, key, cause.name)
        return ConfigError(f"{where}={cause.value!r} is invalid; allowed: {cause.allowed} ({cause.owner})")
    line = first_line(cause)
    return ConfigError(line if line.startswith(f"{key}.") else f"{key}: {line}")  # named already, or name it


def instantiate_node(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """instantiate(cfg.<key>) with any error turned into a ConfigError that names the key."""
    node = OmegaConf.select(cfg, key)
    check_types(node, key)
    try:  # from a plain copy: Hydra resolves the node it instantiates in place, and named_error needs cfg intact
        return instantiate(OmegaConf.to_container(node, resolve=True), **kwargs)
    except Exception as error:
        raise named_error(cfg, key, error) from error


PRIMITIVES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def accepts(hint: Any, value: Any) -> bool:
    """Whether a plain config value fits a type hint; hints this cannot judge (classes, containers) accept."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool or hint is type(None) or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return not isinstance(value, (int, float, str, bool)) or value is None or hint is typing.Any or origin is None


def describe(hint: Any) -> str:
    """`Optional[int]` → "an integer or null"; a union of Literals → its values, once each."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        literals = [a for arg in args if typing.get_origin(arg) is typing.Literal for a in typing.get_args(arg)]
        others = [describe(arg) for arg in args if typing.get_origin(arg) is not typing.Literal]
        return " or ".join(dict.fromkeys(([", ".join(dict.fromkeys(map(str, literals)))] if literals else []) + others))
    if origin is typing.Literal:
        return ", ".join(map(str, args))
    return PRIMITIVES.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(node: Any, key: str) -> None:
    """Plain values of a third-party `_target_` (Lightning's Trainer, callbacks, loggers, torch optimizers) checked
    against its constructor's type hints: `trainer.max_epochs=abc` fails now, naming the key, not mid-run.
    The project's own classes check their arguments themselves, with more to say (checks.py)."""
    if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
        return
    if node._target_.startswith("arcface_lightning."):
        return
    try:
        hints = typing.get_type_hints(get_class(node._target_).__init__)
    except Exception:  # a function target, or hints that do not resolve: nothing to check against
        return
    for name, value in node.items():
        if name in hints and not OmegaConf.is_config(value) and not accepts(hints[name], value):
            raise ConfigError(f"{key}.{name}={value!r} is invalid; allowed: {describe(hints[name])}")


def check_run_keys(cfg: DictConfig) -> None:
    """The top-level keys every entry point reads, checked before any work."""
    precisions = ("highest", "high", "medium")
    checks = [
        ("seed", "null or an integer ≥ 0", lambda v: v is None or (is_int(v) and v >= 0)),
        ("embedding_size", "an integer ≥ 2", lambda v: is_int(v) and v >= 2),
        ("matmul_precision", ", ".join(precisions), lambda v: v in precisions),
        ("channels_last", "true or false", lambda v: isinstance(v, bool)),
        ("extras.print_config", "true or false", lambda v: isinstance(v, bool)),
        ("resume", "auto or null", lambda v: v == "auto"),
        (
            "tags",
            "a list of strings, e.g. tags=[baseline,s16]",
            lambda v: all(isinstance(t, str) for t in v) and isinstance(v, list),
        ),
    ]
    for key, allowed, ok in checks:
        value = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_list(value):
            value = OmegaConf.to_container(value)
        if value is None:  # absent, or null: the default
            continue
        try:
            require("config", key, value, allowed, ok)
        except BadValue as error:
            raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}") from error


def print_config(cfg: DictConfig) -> None:
    """The composed config, resolved where it can be; a rich tree when rich is installed, YAML otherwise."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    text = OmegaConf.to_yaml(container)
    try:
        import rich
        from rich.syntax import Syntax
        from rich.tree import Tree
    except ImportError:
        print(text, flush=True)
        return
    tree = Tree("config", guide_style="dim")
    for key, value in container.items():
        branch = tree.add(str(key))
        body = OmegaConf.to_yaml(value) if isinstance(value, (dict, list)) else str(value)
        branch.add(Syntax(body.rstrip(), "yaml", theme="ansi_dark"))
    rich.print(tree)
