"""The README and docs/ checked like code, without training anything:

- every relative link (and image) resolves to a file of the repository, and a `#anchor` into a Markdown page to one
  of its headings (GitHub's slugs);
- every source path named in backticks (`arcface_lightning/...`, `conf/...`, `tests/...`, ...) exists;
- every command example in their fenced code blocks is checked the way its command line checks it before any work:
  the Hydra commands' overrides through `upgrade_overrides` and `check_overrides` (as `runs.entry_point`'s `cli`
  does), then composed as one job (a sweep's first point) with its required keys given; the argparse commands'
  (`pack`, `report`, ...) arguments by their own parsers, stopped right after parsing; `make <target> ...` through
  `make -n`, whose `python -m arcface_lightning...` lines are checked in turn.

Examples are lines starting `python -m arcface_lightning.<command>` or `make <target>`, also after `$ ` or
environment assignments (`ARCFACE_DATA_DIR=/datasets make train`), joined across `\\` continuations; a line
`NAME=value` of the same block sets `$NAME` for the lines after it. A whole-word placeholder such as `<overrides>`
stands for "any overrides" and is left out; a placeholder inside an argument is not Hydra's grammar: write a path.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import OmegaConf

from arcface_lightning.core import overrides
from arcface_lightning.core.checks import OneLineParser
from arcface_lightning.core.config import CONF_DIR, register_configs
from arcface_lightning.core.overrides import upgrade_overrides

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "arcface_lightning"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
SOURCE_PATH = re.compile(r"^(?:arcface_lightning|conf|tests|benchmarks|notebooks|docs|constraints|\.ci)/[\w./-]*$")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\S*)$")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
PLACEHOLDER = re.compile(r"^<[^<>]+>$")


class BadExample(Exception):
    """An example that its command would refuse."""


# ---------------------------------------------------------------------------------------------------- the pages


def split_fences(text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The page's lines with fenced code blanked out, and its fenced blocks as (first line number, lines)."""
    prose, blocks, block, start = [], [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block, start = [], number + 1
            else:
                blocks.append((start, block))
                block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def blank_code_spans(text: str) -> str:
    """Inline code blanked (newlines kept, so line numbers hold): a link inside backticks is not a link."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text, lower-cased, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"\*\*|__", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for line in prose:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `page` that does not resolve, as 'line N: target: why'."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    text = blank_code_spans("\n".join(prose))
    problems = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)  # [text](target), or a reference's [name]: target
        if SCHEME.match(target):
            continue
        line = text.count("\n", 0, match.start()) + 1
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            problems.append(f"line {line}: {target}: no such file")
        elif root.resolve() not in (path, *path.parents):
            problems.append(f"line {line}: {target}: outside the repository")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"line {line}: {target}: {path.name} has no heading #{anchor}")
    return problems


def path_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Each repository path named in backticks (`arcface_lightning/models/heads.py`) that does not exist."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    text = "\n".join(prose)
    problems = []
    for match in CODE_SPAN.finditer(text):
        name = match.group(2).strip()
        if SOURCE_PATH.match(name) and not (root / name).exists():
            problems.append(f"line {text.count(chr(10), 0, match.start()) + 1}: {name}: no such file or folder")
    return problems


@dataclass(frozen=True)
class Example:
    page: str  # relative to the repository
    line: int
    text: str  # as written, continuations joined
    argv: tuple[str, ...]  # variables expanded, comments and environment assignments dropped
    env: tuple[tuple[str, str], ...]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def expand(text: str, variables: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` of the block's own assignments replaced (others left as they are)."""
    return VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def examples(page: Path, root: Path = ROOT) -> list[Example]:
    """The `python -m arcface_lightning...` and `make ...` lines of the page's fenced code blocks."""
    _, blocks = split_fences(page.read_text(encoding="utf-8"))
    found = []
    for start, lines in blocks:
        variables: dict[str, str] = {}
        index = 0
        while index < len(lines):
            number, text = start + index, lines[index]
            while text.rstrip().endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text.rstrip()[:-1] + " " + lines[index].strip()
            index += 1
            text = text.strip().removeprefix("$ ")
            expanded = expand(text, variables)
            try:
                words = shlex.split(expanded, comments=True)
            except ValueError:
                continue
            env = []
            while words and ASSIGNMENT.match(words[0]):
                env.append(ASSIGNMENT.match(words[0]).groups())
                words = words[1:]
            if not words:
                variables.update(env)  # RUN=logs/train/runs/...: used by the lines below
                continue
            is_python = words[0] in ("python", "python3") and words[1:2] == ["-m"]
            if (is_python and words[2:3] and words[2].startswith("arcface_lightning.")) or words[0] == "make":
                argv = tuple(w for w in words if not PLACEHOLDER.match(w))
                found.append(Example(str(page.relative_to(root)), number, text, argv, tuple(env)))
    return found


# ------------------------------------------------------------------------------------------ checking a command


def hydra_entry(command: str) -> tuple[str, str | None]:
    """(config name, rewrite function's name) of a Hydra command, read from its `entry_point(...)` line."""
    source = PACKAGE / f"{command}.py"
    match = re.search(r"entry_point\(\s*\"(\w+)\"\s*,\s*\w+\s*(?:,\s*rewrite=(\w+))?", source.read_text())
    if match is None:
        raise BadExample(f"arcface_lightning.{command} is not a command with an entry point")
    return match.group(1), match.group(2)


def first_job(argv: list[str]) -> list[str]:
    """The overrides of one job: each sweep at its first value (an Optuna interval is the sweeper's to choose)."""
    args = get_args_parser().parse_args(argv)
    job = []
    for override in OverridesParser.create().parse_overrides(args.overrides):
        if not override.is_sweep_override():
            job.append(override.input_line)
        elif not isinstance(override.value(), IntervalSweep):
            job.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
    return job


def check_hydra_command(command: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """What `cli()` does before any work, then the required keys (`???`) of the job it composed; for a sweep, whose
    jobs the command line does not compose, its first job composed here."""
    config_name, rewrite = hydra_entry(command)
    register_configs()
    argv = upgrade_overrides(argv)
    if rewrite:
        argv = getattr(importlib.import_module(f"arcface_lightning.{command}"), rewrite)(argv)
    composed = []

    def composing(*args, **kwargs):
        composed.append(compose(*args, **kwargs))
        return composed[-1]

    with monkeypatch.context() as patch:
        patch.setattr(overrides, "compose", composing)  # the config the check composes, kept (one compose, not two)
        try:
            overrides.check_overrides(argv, config_name=config_name)
        except SystemExit as stop:
            raise BadExample(str(stop.code)) from None
    if not composed:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            try:
                composed.append(compose(config_name=config_name, overrides=first_job(argv)))
            except Exception as error:  # Hydra's and OmegaConf's errors, in one line
                raise BadExample(f"{type(error).__name__}: {error}") from None
    cfg = composed[0]
    missing = [key for key in cfg if key != "hydra" and OmegaConf.is_missing(cfg, key)]
    if missing:
        raise BadExample(f"{missing[0]} is required (??? in conf/{config_name}.yaml)")


class Parsed(Exception):
    """Raised by the parser once the arguments are read: the command stops before doing anything."""


def check_parser_command(command: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`main(argv)` of pack or report, stopped as soon as its parser has read the arguments."""
    module = importlib.import_module(f"arcface_lightning.{command}")
    parse_args = OneLineParser.parse_args

    def parse_then_stop(self: OneLineParser, args: list[str] | None = None, namespace=None) -> argparse.Namespace:
        raise Parsed(parse_args(self, args, namespace))

    def error(self: OneLineParser, message: str):
        raise BadExample(message)

    with monkeypatch.context() as patch:
        patch.setattr(OneLineParser, "parse_args", parse_then_stop)
        patch.setattr(OneLineParser, "error", error)
        try:
            module.main(argv)
        except Parsed:
            return
    raise AssertionError(f"arcface_lightning.{command}.main did not read its arguments with OneLineParser")


def check_make(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`make -n` of the example (the target must exist); the commands it would run are checked in turn."""
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", *argv[1:], "INSTALLED=true", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise BadExample(f"make -n: {done.stderr.strip()}")
    for line in done.stdout.splitlines():
        words = shlex.split(line)
        if words[:1] == [sys.executable] and words[1:2] == ["-m"] and words[2].startswith("arcface_lightning."):
            check_command(words, env, monkeypatch)


def check_command(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    if argv[0] == "make":
        return check_make(argv, env, monkeypatch)
    command = argv[2].removeprefix("arcface_lightning.")
    source = PACKAGE / f"{command}.py"
    if not source.is_file():
        raise BadExample(f"no command arcface_lightning.{command}")
    if "entry_point(" in source.read_text():  # a Hydra command
        return check_hydra_command(command, argv[3:], monkeypatch)
    return check_parser_command(command, argv[3:], monkeypatch)  # pack, report, align: checks.OneLineParser


# ------------------------------------------------------------------------------------------------------- tests

EXAMPLES = [example for page in PAGES for example in examples(page)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_source_paths_exist(page: Path) -> None:
    assert path_problems(page) == []


def test_every_page_is_reached_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    assert lines[2] == "```bash" and lines[3].startswith("make train   #") and lines[5].startswith("make test    #")


@pytest.mark.parametrize("example", [pytest.param(e, id=e.id) for e in EXAMPLES])
def test_example_composes(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a hydra.run.dir=... of an example is checked for writability here
    check_command(list(example.argv), dict(example.env), monkeypatch)


# ---------------------------------------------------------------------------- the checks can fail (controls)

CONTROL_PAGE = """# A page

## Its section

[fine](#its-section) [fine too](other.md#a-heading) [no file](missing.md) [no heading](other.md#nothing)
![no image](missing.png) `[not a link](missing.md)` [web](https://example.org/x) `arcface_lightning/nope.py`

[reference]: gone.md

```bash
RUN=logs/train/runs/2026-01-01_12-00-00_4242
python -m arcface_lightning.train head.s=16 \\
    head.nonexistent_key=1                    # a comment
python -m arcface_lightning.evaluate ckpt_path=$RUN/checkpoints/last.ckpt
make nonexistent_target
```
"""


@pytest.fixture
def control(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(CONTROL_PAGE)
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A heading\n")
    return page


def test_control_broken_links_are_caught(control: Path) -> None:
    problems = link_problems(control, root=control.parents[1])
    assert [p.split(":")[1].strip() for p in problems] == ["missing.md", "other.md#nothing", "missing.png", "gone.md"]
    assert path_problems(control, root=control.parents[1]) == [
        "line 6: arcface_lightning/nope.py: no such file or folder"
    ]


def test_control_bad_examples_are_caught(control: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = examples(control, root=control.parents[1])
    assert [(e.line, e.argv[:3]) for e in found] == [
        (12, ("python", "-m", "arcface_lightning.train")),
        (14, ("python", "-m", "arcface_lightning.evaluate")),
        (15, ("make", "nonexistent_target")),
    ]
    assert found[0].argv[3:] == ("head.s=16", "head.nonexistent_key=1")
    assert found[1].argv[3] == "ckpt_path=logs/train/runs/2026-01-01_12-00-00_4242/checkpoints/last.ckpt"
    monkeypatch.chdir(control.parent)
    with pytest.raises(BadExample, match=r"head\.nonexistent_key: no such key"):
        check_command(list(found[0].argv), {}, monkeypatch)
    check_command(list(found[1].argv), {}, monkeypatch)
    with pytest.raises(BadExample, match="nonexistent_target"):
        check_command(list(found[2].argv), {}, monkeypatch)


@pytest.mark.parametrize(
    "argv, error",
    [
        ("python -m arcface_lightning.evaluate", "ckpt_path is required"),  # a required key not given
        ("python -m arcface_lightning.train -m head.s=8,16 head.nope=1", "nope"),  # a sweep's job composed
        ("python -m arcface_lightning.train head=nope", "head=nope is not a config"),
        ("python -m arcface_lightning.nope x=1", "no command"),
        ("python -m arcface_lightning.pack only_one_argument", "required"),
        ("python -m arcface_lightning.pack a b --workers 0", "workers"),
        ("python -m arcface_lightning.report a b", "unrecognized"),
        ("make sweep ARGS='head.nope=1'", "nope"),  # a make target's command line
    ],
)
def test_control_bad_commands_are_caught(argv: str, error: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadExample, match=error):
        check_command(shlex.split(argv), {}, monkeypatch)
