"""An entry point in a process of its own, forked from the test's: what `python -m arcface_lightning.<command>` does,
without a new interpreter and its imports (seconds each, most of a tiny run's time). For what needs a process of its
own: a signal or a kill, DDP's other ranks (Lightning starts them as `python -m ...` from the command's `__main__`),
launchers that start processes.

The child is the command as its console script runs it: `sys.argv` set, the repository as working directory,
ARCFACE_DATA_DIR unset, SIGINT and SIGTERM as a fresh interpreter has them, stdout and stderr to files. It ends with
`os._exit`, so nothing of pytest's runs in it after the command.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def console_script(command: str, argv: list[str]) -> int:
    """Run `arcface_lightning.<command>` as its console script does (`cli()`, which reads sys.argv, or `main(argv)`
    for pack and report) and return the exit code Python would give: a SystemExit's message goes to stderr, exit 1.
    Any other exception propagates (the caller reports it)."""
    module = importlib.import_module(f"arcface_lightning.{command}")
    try:
        module.main(argv) if command in ("pack", "report") else module.cli()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            return 1
        return stop.code or 0
    return 0


class Forked:
    """The parent's handle on a forked command: poll, wait, signal, and what it printed (subprocess.Popen's names)."""

    def __init__(self, pid: int, stdout: Path, stderr: Path) -> None:
        self.pid, self.stdout_path, self.stderr_path = pid, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N: ended by signal N, as Popen's
        return self.returncode

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.send_signal(signal.SIGKILL)
                self.wait()
                raise TimeoutError(f"forked command {self.pid} still ran after {timeout} s: killed")
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def output(self) -> tuple[str, str]:
        return self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace")


def fork_command(command: str, argv: list[str], logs: Path, env: dict[str, str] | None = None) -> Forked:
    """Start `python -m arcface_lightning.<command> *argv` as a forked child; its stdout and stderr go to
    `logs`/<pid>.out and .err. `env`: variables set in the child only."""
    logs.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(f"arcface_lightning.{command}")  # imported here, once: the children inherit it
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        os.read(read, 1)  # the child has its output files open: they exist from here on
        os.close(read)
        return Forked(pid, logs / f"{pid}.out", logs / f"{pid}.err")
    code = 1
    try:
        os.close(read)
        for fd, suffix in ((1, "out"), (2, "err")):
            opened = os.open(logs / f"{os.getpid()}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(opened, fd)
            os.close(opened)
        os.write(write, b"s")
        os.close(write)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (a CI job may start with it ignored)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.pop("ARCFACE_DATA_DIR", None)
        os.environ["PYTHONPATH"] = str(ROOT)  # the ranks Lightning starts import this checkout
        os.environ.update(env or {})
        os.chdir(ROOT)
        import __main__

        __main__.__spec__ = module.__spec__  # what `python -m` sets, and Lightning's DDP launcher reads
        sys.argv = [module.__file__, *argv]
        try:
            code = console_script(command, argv)
        except BaseException:  # what Python prints for an uncaught exception, then exit 1
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def run_forked(command: str, argv: list[str], logs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """fork_command, waited for: its exit code, stdout and stderr."""
    child = fork_command(command, argv, logs)
    child.wait(timeout)
    return subprocess.CompletedProcess([command, *argv], child.returncode, *child.output())
