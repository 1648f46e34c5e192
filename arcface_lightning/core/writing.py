"""Writing what a command produces without ever leaving half a file: the output checked before any work, written
beside its final name and renamed, and a SIGTERM turned into an exception so that the cleanup runs. Standard
library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arcface_lightning.core.checks import ModelError, first_line, sigterm_exception


def check_output(path: str | Path, key: str = "output") -> Path:
    """An output file that can be written, checked before any work: not a folder, and in a folder that exists (made
    here, with its parents, where missing) and takes a new file."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{key}={path} is a folder; give the path of a file to write")
    folder = path.parent
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ModelError(f"{key}={path}: {blocking} is a file, not a folder; give a path in a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # permissions alone do not say it (root, read-only mounts, /proc)
            pass
    except OSError as error:
        raise ModelError(f"{key}={path}: cannot write in {folder} ({error.strerror or first_line(error)})") from None
    return path


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises an exception that runs.run records as interrupted: its default ends the
    process on the spot, and no `finally` runs to remove what is half-written. Lightning's SIGTERMException where
    Lightning is loaded (its loops and callbacks know it), else checks.Terminated: a command that never loads
    Lightning does not import it for this. Main thread only (Python sets handlers there); Lightning's own handler,
    set inside the block, calls this one too."""

    def stop(signum: int, frame: Any) -> None:
        raise sigterm_exception()(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def written_aside(path: Path) -> Iterator[Path]:
    """Yields `<name>.partial<suffix>` beside `path` to write, renamed over `path` when the block ends: a reader never
    sees half a file and an existing file is only replaced by a whole one. On any error, Ctrl-C or SIGTERM
    (sigterm_raises) the partial file is removed."""
    partial = path.with_name(f"{path.name}.partial{path.suffix}")
    with sigterm_raises():
        try:
            yield partial
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
