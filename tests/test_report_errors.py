"""`report` on damaged or wrong folders: a damaged job is one warning line naming the job and the file and the report
is still written; a folder that is no sweep is one error line. In process, except one command-line run for the exit
status."""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from arcface_lightning.report import SweepReportCallback, write_report, written_aside
from conftest import ROOT


def write_job(sweep: Path, job: str, overrides: str | None = None, metrics: str | None = None) -> Path:
    """A job dir as Hydra and train write it; the text of either file as given (None: a sound one: s swept, m not,
    so that no figure is drawn)."""
    (sweep / job / ".hydra").mkdir(parents=True)
    sound = {"status": "ok", "seed": 0, "val/acc_best": 0.9 + int(job) / 100, "test/acc": 0.8 + int(job) / 100}
    default_overrides = f"- head.s={8 * (1 + int(job) % 2)}\n- head.m=0.3\n"
    (sweep / job / ".hydra" / "overrides.yaml").write_text(default_overrides if overrides is None else overrides)
    (sweep / job / "metrics.json").write_text(json.dumps(sound) if metrics is None else metrics)
    return sweep / job


def rows_of(sweep: Path) -> dict[str, dict[str, str]]:
    with open(sweep / "summary.csv") as f:
        return {row["job"]: row for row in csv.DictReader(f)}


DAMAGED_METRICS = [
    ('{"status": "ok", "val/acc_', "is not valid JSON (Unterminated string starting at: line 1 column 18)"),
    ("[0.9, 0.8]", "is not a JSON object of metrics: it holds a list"),
    ('"ok"', "is not a JSON object of metrics: it holds a str"),
    ('{"status": "ok", "val/acc_best": "0.95"}', ": val/acc_best='0.95' is not a number"),
    ('{"status": "ok", "test/acc": [1]}', ": test/acc=[1] is not a number"),
    ('{"status": 1}', ": status=1 is not a string"),
    ('{"status": "ok", "seed": [0]}', ": seed=[0] is not an integer or null"),
    ("[" * 100_000, "is nested too deeply to be a JSON object of metrics"),
    ("\udcff", "is not UTF-8 text"),
]


@pytest.mark.parametrize("text, problem", DAMAGED_METRICS)
def test_a_job_whose_metrics_cannot_be_read_is_reported_as_failed(tmp_path, capsys, text, problem) -> None:
    sweep = tmp_path / "sweep"
    for job in "013":
        write_job(sweep, job)
    damaged = write_job(sweep, "2") / "metrics.json"
    damaged.write_bytes(text.encode("utf-8", "surrogateescape"))
    report = write_report(sweep)
    line = f"job 2 is reported as failed: {damaged} {problem}".replace(" :", ":")
    assert capsys.readouterr().err == f"warning: {line}\n" and report["problems"] == [line]
    rows = rows_of(sweep)
    assert rows["2"]["status"] == "failed" and rows["2"]["error"] == line.partition(": ")[2]
    assert [float(rows[job]["test/acc"]) for job in "013"] == pytest.approx([0.80, 0.81, 0.83])  # as they were
    assert f"- {line}\n" in (sweep / "summary.md").read_text()


DAMAGED_OVERRIDES = [
    ("- head.s: [16\n", "is not valid YAML (expected ',' or ']', but got '<stream end>': line 2 column 1)"),
    ("head.s: 16\n", "is not a list of key=value overrides: \"{'head.s': 16}\""),
    ("- head.s=16\n- 3\n", "is not a list of key=value overrides: \"['head.s=16', 3]\""),
    ("\tx", "is not valid YAML (found character '\\t' that cannot start any token: line 1 column 1)"),
]


@pytest.mark.parametrize("text, problem", DAMAGED_OVERRIDES)
def test_a_job_whose_overrides_cannot_be_read_is_left_out(tmp_path, capsys, text, problem) -> None:
    sweep = tmp_path / "sweep"
    for job in "013":
        write_job(sweep, job)
    write_job(sweep, "2", overrides=text)
    report = write_report(sweep)
    line = f"job 2 is left out: {sweep / '2' / '.hydra' / 'overrides.yaml'} {problem}"
    assert capsys.readouterr().err == f"warning: {line}\n" and report["problems"] == [line]
    assert sorted(rows_of(sweep)) == ["0", "1", "3"] and f"- {line}\n" in (sweep / "summary.md").read_text()


def test_a_job_the_train_command_refused_has_no_place_in_the_heatmap(tmp_path) -> None:
    """head.s=abc: the job failed at once (a value train refuses); the table lists it, the figure leaves it out."""
    sweep = tmp_path / "sweep"
    for job, (s, m) in enumerate([(8, 0.1), (8, 0.3), (16, 0.1), (16, 0.3), ("abc", 0.1)]):
        write_job(sweep, str(job), overrides=f"- head.s={s}\n- head.m={m}\n")
    (sweep / "4" / "metrics.json").write_text('{"status": "failed", "error": "head.s=\'abc\' is invalid"}')
    report = write_report(sweep)
    assert rows_of(sweep)["4"]["head.s"] == "abc"
    assert [p.name for p in report["figures"]] == ["heatmap.png", "curves.png"]


def test_a_swept_value_that_is_a_path_names_a_figure_in_the_sweep_dir(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    points = [(s, m, root) for root in ("/data/a", "/data/b") for s in (8, 16) for m in (0.1, 0.3)]
    for job, (s, m, root) in enumerate(points):
        write_job(sweep, str(job), overrides=f"- head.s={s}\n- head.m={m}\n- data.root={root}\n")
    report = write_report(sweep)
    assert sorted(p.name for p in report["figures"]) == [
        "curves_data.root=_data_a.png",
        "curves_data.root=_data_b.png",
        "heatmap_data.root=_data_a.png",
        "heatmap_data.root=_data_b.png",
    ]
    assert all(p.parent == sweep and p.is_file() for p in report["figures"])


def test_a_report_that_cannot_be_written_is_one_line_and_leaves_no_partial_file(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    for job in "01":
        write_job(sweep, job)
    (sweep / "summary.csv").mkdir()  # in the way of the file
    with pytest.raises(SystemExit) as refused:
        write_report(sweep)
    assert str(refused.value) == f"error: cannot write the report into {sweep}: Is a directory: summary.csv"
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "summary.csv"]  # no summary.partial.csv


def test_a_file_interrupted_while_written_is_removed(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    with pytest.raises(KeyboardInterrupt), written_aside(summary) as partial:
        partial.write_text("half a report")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def every_overrides_file_damaged(sweep: Path) -> None:
    for job in "01":
        write_job(sweep, job, overrides="{")


def every_metrics_file_damaged(sweep: Path) -> None:
    for job in "01":
        write_job(sweep, job, metrics="{")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "{d} does not exist; give a sweep dir: the folder of a multirun, e.g. logs/train/multiruns/"),
        (lambda d: d.write_text("x"), "{d} is a file, not a folder; give a sweep dir: the folder of a multirun, "),
        (lambda d: d.mkdir(), "{d} is not a sweep dir: no <job>/.hydra/overrides.yaml in it"),
        (every_overrides_file_damaged, "{d} has no job whose .hydra/overrides.yaml can be read (see the warnings)"),
        (every_metrics_file_damaged, "{d} has no finished jobs: no readable <job>/metrics.json in it"),
        (
            lambda d: write_job(d, "0", metrics="").joinpath("metrics.json").unlink(),
            "{d} has no finished jobs: no readable <job>/metrics.json in it",
        ),
    ],
)
def test_report_refuses_what_is_not_a_finished_sweep(tmp_path: Path, make, message: str) -> None:
    folder = tmp_path / "folder"
    make(folder)
    with pytest.raises(SystemExit, match="^error: " + re.escape(message.format(d=folder))) as refused:
        write_report(folder)
    assert "\n" not in str(refused.value)
    assert not list(tmp_path.glob("**/summary*")) and not list(tmp_path.glob("**/*.png"))


def test_the_command_exits_non_zero_with_the_line_and_no_traceback(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    every_overrides_file_damaged(sweep)
    command = [sys.executable, "-m", "arcface_lightning.report", str(sweep)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    *warnings, error = result.stderr.splitlines()
    assert error == f"error: {sweep} has no job whose .hydra/overrides.yaml can be read (see the warnings)"
    for job, warning in zip("01", warnings, strict=True):
        assert warning.startswith(
            f"warning: job {job} is left out: {sweep / job / '.hydra/overrides.yaml'} is not valid"
        )


def test_the_sweep_callback_logs_a_report_problem_and_never_fails_the_sweep(tmp_path: Path, caplog) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "gone")}}})  # the sweep dir was removed
    with caplog.at_level(logging.WARNING, logger="arcface_lightning.report"):
        SweepReportCallback().on_multirun_end(config)
    gone = tmp_path / "gone"
    assert caplog.messages == [f"sweep report not written: error: {gone} does not exist; give a sweep dir: the folder "
                               "of a multirun, e.g. logs/train/multiruns/<time>_<pid>"]  # fmt: skip


def test_report_has_a_help_and_a_missing_argument_is_one_line(capsys) -> None:
    from arcface_lightning.report import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m arcface_lightning.report [-h] sweep_dir")
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: the following arguments are required: sweep_dir; see python -m arcface_lightning.report --help\n"
    )
