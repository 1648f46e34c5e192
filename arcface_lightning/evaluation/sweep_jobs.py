"""A sweep's job folders as rows for the report (report.py) and the head comparison (compare.py): each job's
.hydra/overrides.yaml (where it sits in the sweep) and metrics.json (what it measured), read as data and checked, so
that a damaged file is one line naming the job and the file.

A job whose overrides cannot be read is left out: its place in the sweep is unknown. A job whose metrics.json cannot
be read is a failed job, as one that wrote none (it crashed, or is still running).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from arcface_lightning.core.checks import first_line, is_int, is_number

Row = dict[str, Any]

# (selects, scores, also shown) per val_split: the selection metric is metrics.SELECTION's, with its _best
REPORTED = {
    "by_sample": ("val/acc_best", "test/acc", "test/acc_margin"),
    "by_class": ("val/precision_at_1_best", "test/precision_at_1", "test/map_at_r"),
}


def number(text: Any) -> Any:
    """Override values arrive as text: numbers become numbers, anything else stays as it is."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in str(text) else value


class JobFileError(ValueError):
    """A job's file that cannot be read as the report needs it; the message names the file."""


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise JobFileError(f"{path} is not UTF-8 text") from None
    except OSError as error:
        raise JobFileError(f"{path} cannot be read ({error.strerror})") from None


def read_overrides(path: Path) -> list[str]:
    """A job's .hydra/overrides.yaml: the list of key=value strings Hydra wrote."""
    try:
        overrides = yaml.safe_load(read_text(path)) or []
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f": line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise JobFileError(f"{path} is not valid YAML ({problem}{where})") from None
    except RecursionError:
        raise JobFileError(f"{path} is nested too deeply to be a list of overrides") from None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise JobFileError(f"{path} is not a list of key=value overrides: {str(overrides)[:60]!r}")
    return overrides


def read_record(path: Path) -> dict[str, Any]:
    """A job's metrics.json: a JSON object whose metrics (stage/name keys, epochs, wall_time_s) are numbers or null."""
    try:
        record = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise JobFileError(
            f"{path} is not valid JSON ({error.msg}: line {error.lineno} column {error.colno})"
        ) from None
    except RecursionError:
        raise JobFileError(f"{path} is nested too deeply to be a JSON object of metrics") from None
    if not isinstance(record, dict):
        raise JobFileError(f"{path} is not a JSON object of metrics: it holds a {type(record).__name__}")
    for key, value in record.items():
        if ("/" in key or key in ("epochs", "wall_time_s")) and value is not None and not is_number(value):
            raise JobFileError(f"{path}: {key}={value!r} is not a number")
    if not isinstance(record.get("status", ""), str):
        raise JobFileError(f"{path}: status={record['status']!r} is not a string")
    if not (record.get("seed") is None or is_int(record["seed"])):
        raise JobFileError(f"{path}: seed={record['seed']!r} is not an integer or null")
    return record


def read_jobs(sweep_dir: Path) -> tuple[list[Row], list[str]]:
    """One row per job dir: its overrides (key → value) and its metrics.json (or status failed if it has none or it
    cannot be read); and a line per damaged job, naming it and the file."""
    rows, problems = [], []
    files = sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: (len(p.parts[-3]), p.parts[-3]))
    for overrides_file in files:  # jobs 0, 1, ..., 10 in numeric order
        job_dir = overrides_file.parent.parent
        try:
            overrides = read_overrides(overrides_file)
        except JobFileError as error:
            problems.append(f"job {job_dir.name} is left out: {error}")
            continue
        values = {}
        for override in overrides:
            key, _, value = override.lstrip("+~").partition("=")
            values[key] = number(value)
        metrics_file = job_dir / "metrics.json"
        if metrics_file.exists():
            try:
                record, finished = read_record(metrics_file), True
            except JobFileError as error:
                problems.append(f"job {job_dir.name} is reported as failed: {error}")
                record, finished = {"status": "failed", "error": str(error)}, False
        else:
            record = {"status": "failed", "error": "no metrics.json: the job crashed or is still running"}
            finished = False
        rows.append({**record, **values, "job": job_dir.name, "overrides": list(values), "finished": finished})
    return rows, problems


def swept_keys(rows: list[Row]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were given."""
    keys = dict.fromkeys(key for row in rows for key in row["overrides"])
    return [k for k in keys if len({repr(row.get(k)) for row in rows}) > 1]


def reported(rows: list[Row]) -> tuple[str, str, str]:
    """The by_class metrics when the finished runs selected on them, else the closed-set ones."""
    finished = [r for r in rows if r.get("status") == "ok"]
    by_class = finished and all("val/acc_best" not in r and REPORTED["by_class"][0] in r for r in finished)
    return REPORTED["by_class" if by_class else "by_sample"]
