"""Argument checks for the heads, backbones and data module, and the user errors the entry points say in one line
(plain Python, no framework imports: a command that imports these imports nothing else).

A bad value raises `BadValue`, a ValueError that names the argument, the value and what is allowed. Used directly,
the message reads `ArcFaceHead: s=-1 is invalid; allowed: a finite number > 0`; the entry points catch it and
name the config key instead (`head.s=-1 ...`, see config.py).

The user errors (`USER_ERRORS`: runs.run prints their first line, no traceback) live here so that a command catches
them without importing the modules that raise them (Lightning, torchvision); each is also importable from the module
it belongs to (`ConfigError` from config.py, `DataError` from data/, `ModelError` from checkpoints.py and
inference.py, `DivergedError` from module.py, `TargetNotAllowed` from registry.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A bad value on the command line or in a config file, found before any training starts."""


class DataError(RuntimeError):
    """Data missing, unreadable or inconsistent with the config: the message says where and how to fix it."""


class ModelError(ValueError):
    """A model file, an embeddings file, an input that does not fit them, or an output path that cannot be written:
    said in one line."""


class DivergedError(FloatingPointError):
    """The training loss stopped being finite: the run stops at once rather than train on NaNs."""


class TargetNotAllowed(ValueError):
    """A `_target_` outside the allow-list: said in one line, nothing imported or called."""


class Terminated(SystemExit):
    """SIGTERM outside Lightning's loops (writing.sigterm_raises where Lightning is not loaded): runs.run records
    the run as interrupted, as it does Lightning's own SIGTERMException."""


USER_ERRORS = (ConfigError, DataError, DivergedError, ModelError, TargetNotAllowed)  # one line, no traceback


def sigterm_exception() -> type[BaseException]:
    """What a SIGTERM raises in this process: Lightning's SIGTERMException where Lightning is loaded (its loops stop
    at a step boundary on it), else `Terminated`. Looked up in sys.modules, so nothing imports Lightning for it."""
    lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return lightning.SIGTERMException if lightning is not None else Terminated


class BadValue(ValueError):
    def __init__(self, owner: str, name: str, value: Any, allowed: str) -> None:
        self.owner, self.name, self.value, self.allowed = owner, name, value, allowed
        super().__init__(f"{owner}: {name}={value!r} is invalid; allowed: {allowed}")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when the message is empty). An error re-raised from a
    DataLoader worker ("Caught DataError in DataLoader worker process 0." and the worker's traceback) gives the
    worker's own message: the traceback's last line, without its `module.Type: ` prefix."""
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "worker process" in lines[0] and len(lines) > 1:
        return lines[-1].partition(": ")[2] or lines[-1]
    return lines[0]


def require(owner: str, name: str, value: Any, allowed: str, ok: Callable[[Any], bool]) -> None:
    """Raise BadValue unless ok(value); a value ok cannot even compare (a string for a number) is bad too."""
    try:
        good = bool(ok(value))
    except (TypeError, ValueError):
        good = False
    if not good:
        raise BadValue(owner, name, value, allowed)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    require(owner, name, value, f"an integer ≥ {minimum}", lambda v: is_int(v) and v >= minimum)


def check_ints(owner: str, name: str, values: Sequence[Any], minimum: int = 1) -> None:
    allowed = f"a non-empty list of integers ≥ {minimum}"
    require(owner, name, values, allowed, lambda vs: len(vs) > 0 and all(is_int(v) and v >= minimum for v in vs))


def check_number(owner: str, name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    """A finite int or float for which ok(value) holds."""
    require(owner, name, value, allowed, lambda v: is_number(v) and ok(v))


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    allowed = ", ".join("null" if c is None else str(c) for c in choices)
    require(owner, name, value, allowed, lambda v: v in choices)


class OneLineParser(argparse.ArgumentParser):
    """argparse for the commands that are not Hydra's (pack, report): a bad argument is one line naming the way to
    `--help`, without the usage argparse prints above its error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")
