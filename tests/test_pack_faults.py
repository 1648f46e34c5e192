"""`python -m arcface_lightning.pack` given bad arguments or interrupted: one line naming pack's own argument,
before any work; on SIGINT or SIGTERM no partial set, no worker process left, a non-zero exit."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_images import digits, write_folder

from arcface_lightning import pack as packing


@pytest.fixture
def source(tmp_path: Path) -> Path:
    images, labels = digits(4)
    return write_folder(tmp_path / "source", images, labels)


def bad_arguments(tmp_path: Path, source: Path) -> dict[str, tuple[list[str], str]]:
    """name → (arguments, the one line expected on stderr); `tmp_path` holds a regular `file` and an empty
    folder, `existing`."""
    out = str(tmp_path / "out")
    return {
        "output in /proc": (
            [str(source), "/proc/nope/p"],
            "error: output=/proc/nope/p cannot be created (No such file or directory: /proc/nope); "
            "give a new folder's path in a writable folder",
        ),
        "output under a file": (
            [str(source), f"{tmp_path}/file/p"],
            f"error: output={tmp_path}/file/p is inside {tmp_path}/file, which is a file; give a new folder's path",
        ),
        "output exists": (
            [str(source), f"{tmp_path}/existing"],
            f"error: output={tmp_path}/existing exists; give a new folder (a packed set is never overwritten)",
        ),
        "missing source": (
            [f"{tmp_path}/nope", out],
            f"error: source={tmp_path}/nope does not exist; give a folder of class folders, a CSV list of path,label "
            "or an insightface folder (train.rec, train.idx, property)",
        ),
        "missing test root": (
            [str(source), out, "--test-root", f"{tmp_path}/nope"],
            f"error: --test-root={tmp_path}/nope does not exist; give a folder of class folders, a CSV list of "
            "path,label or an insightface folder (train.rec, train.idx, property)",
        ),
        "source with no class folders": (
            [str(tmp_path / "existing"), out],
            f"error: source={tmp_path}/existing has no class sub-folders; expected {tmp_path}/existing/<class>/"
            "<images> (ImageFolder)",
        ),
        "validation larger than the set": (
            [str(source), out, "--val-size", "40"],
            "error: --val-size=40 and --test-size=None (null: val_size) leave no training data; allowed: together "
            "fewer than the 40 images",
        ),
        "chunk bytes": (
            [str(source), out, "--chunk-bytes", "bogus"],
            "error: argument --chunk-bytes: 'bogus' is not a size; allowed: a number and a unit, e.g. 64MB, 512KB; "
            "see python -m arcface_lightning.pack --help",
        ),
        "val size": (
            [str(source), out, "--val-size", "0"],
            "error: argument --val-size: '0' is not a size; allowed: a count ≥ 1, or a fraction 0 < f < 1; see "
            "python -m arcface_lightning.pack --help",
        ),
        "workers": (
            [str(source), out, "--workers", "0"],
            "error: argument --workers: '0' is invalid; allowed: an integer ≥ 1; see python -m "
            "arcface_lightning.pack --help",
        ),
    }


CASES = list(bad_arguments(Path("/x"), Path("/y")))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_argument_is_one_line_naming_it_before_any_work(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "existing").mkdir()
    arguments, expected = bad_arguments(tmp_path, source)[case]
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        packing.main(arguments)
    code = stopped.value.code
    printed = capsys.readouterr().err.strip() if isinstance(code, int) else code  # argparse prints, main raises
    assert code != 0 and printed == expected
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, nothing half-written


ENCODED_SAMPLE = packing.encoded_sample


def slow_sample(row: tuple[str, int, str]) -> Iterator[dict[str, Any]]:
    """encoded_sample, ten seconds each, saying that LitData's workers have started (`writing` in the partial set)."""
    Path(row[2], "writing").touch()
    time.sleep(10)
    yield from ENCODED_SAMPLE(row)


def full_disk(row: tuple[str, int, str]) -> Iterator[dict[str, Any]]:
    raise OSError(28, "No space left on device")
    yield


def test_a_failing_worker_is_one_line_and_leaves_no_partial_set_or_worker(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packing, "encoded_sample", full_disk)
    before = multiprocessing.active_children()
    with pytest.raises(packing.DataError) as error:
        packing.pack(source, tmp_path / "packed", val_size=4, workers=2)
    assert str(error.value) == "packing the train split failed: OSError: [Errno 28] No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    assert multiprocessing.active_children() == before


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_pack_removes_its_partial_set_stops_its_workers_and_fails(
    tmp_path: Path, source: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """pack in a child process (forked: no second start-up), signalled while LitData's two workers write the
    training split (ten seconds a sample). LitData's own SIGINT handler exited 0 there and left the partial set
    and a worker; on SIGTERM the workers were left running. Waiting for them (Python joins its child processes at
    exit) is not stopping them: the child must exit before their first sample is done."""
    monkeypatch.setattr(packing, "encoded_sample", slow_sample)
    out = tmp_path / "packed"
    arguments = [str(source), str(out), "--workers", "2", "--chunk-bytes", "1KB", "--val-size", "4"]
    child = multiprocessing.get_context("fork").Process(target=packing.main, args=(arguments,))
    child.start()
    partial = tmp_path / f"packed.partial-{child.pid}"
    deadline = time.monotonic() + 60
    while not ((partial / "writing").exists() and len(descendants(child.pid)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = descendants(child.pid)
    assert (partial / "writing").exists() and len(workers) >= 2, "LitData's workers did not start"
    os.kill(child.pid, signum)
    signalled = time.monotonic()
    child.join(timeout=30)
    assert child.exitcode == 128 + signum and time.monotonic() - signalled < 6
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"error: interrupted by {signal.Signals(signum).name}; nothing written to {out}"
    )
    assert not partial.exists() and not out.exists()
    assert not [pid for pid in workers if running(pid)]
