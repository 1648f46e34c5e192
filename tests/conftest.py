"""Fixtures: small synthetic data sets in torchvision's on-disk formats, and configs composed with Hydra's API."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from forked import console_script, run_forked
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from torchvision import datasets

from arcface_lightning.core.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()  # the trainer/lightning config node and the ${...} resolvers conf/ uses


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests (and the real-data ones) first, dealt out over the parallel workers. pytest-xdist's worksteal
    hands each worker a contiguous share of this list (the first worker the first len/n items, ...) and lets an
    idle one take over the end of another's queue: with the long tests at the start of every share they overlap,
    and each worker ends on short ones instead of one long test running alone while the others wait."""

    def slow(item: pytest.Item) -> bool:
        return bool(item.get_closest_marker("slow") or item.get_closest_marker("real_data"))

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    modules: dict[Path, list[pytest.Item]] = {}
    for item in filter(slow, items):  # a module's slow tests stay together: they may share a session fixture
        modules.setdefault(item.path, []).append(item)
    dealt: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for group in modules.values():
        min(dealt, key=len).extend(group)
    fast_items, left, ordered = [i for i in items if not slow(i)], len(items), []
    for worker, mine in enumerate(dealt):
        share = left // (workers - worker)  # what worksteal sends this worker first
        ordered += mine + fast_items[: share - len(mine)]
        fast_items, left = fast_items[share - len(mine) :], left - share
    items[:] = ordered + fast_items


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one thread each (and in the entry points they start), or the workers'
    # OpenMP thread pools fight over the cores and every test runs several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def class_images(labels: np.ndarray, side: int, channels: int, seed: int) -> np.ndarray:
    """Noise plus a bright square whose position encodes the class: learnable in a few steps by a tiny CNN."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), side, side, channels), dtype=np.uint8)
    cells = side // 7
    for i, label in enumerate(labels):
        row, col = divmod(int(label) % (cells * cells), cells)
        images[i, row * 7 : row * 7 + 6, col * 7 : col * 7 + 6, :] = 255
    return images


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (MNIST) format: magic 0x0000080<ndim>, big-endian dims, then uint8 data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, name: str = "MNIST", n_train: int = 600, n_test: int = 200, num_classes: int = 10) -> Path:
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        labels = np.arange(n) % num_classes
        write_idx(raw / f"{prefix}-images-idx3-ubyte", class_images(labels, 28, 1, seed)[..., 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def write_cifar10(root: Path, n_train: int = 500, n_test: int = 100) -> Path:
    """cifar-10-batches-py/: five training batches, one test batch, batches.meta (pickled dicts)."""
    folder = root / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)

    def batch(labels: np.ndarray, seed: int) -> dict:
        images = class_images(labels, 32, 3, seed)  # HWC → CHW rows, as CIFAR stores them
        return {"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1), "labels": labels.tolist()}

    per_batch = n_train // 5
    for k in range(5):
        labels = (np.arange(per_batch) + k) % 10
        (folder / f"data_batch_{k + 1}").write_bytes(pickle.dumps(batch(labels, 10 + k)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(np.arange(n_test) % 10, 20)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def cifar10_checksums(root: Path) -> dict[str, list | dict]:
    """torchvision checks CIFAR files against the real set's md5s; these are the synthetic files' own."""
    folder = root / datasets.CIFAR10.base_folder

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    return {
        "train_list": [[name, md5(name)] for name, _ in datasets.CIFAR10.train_list],
        "test_list": [[name, md5(name)] for name, _ in datasets.CIFAR10.test_list],
        "meta": {**datasets.CIFAR10.meta, "md5": md5(datasets.CIFAR10.meta["filename"])},
    }


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same RNG state, whatever ran before it."""
    L.seed_everything(0, verbose=False)


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    return write_mnist(tmp_path / "data")


@pytest.fixture
def cifar10_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = write_cifar10(tmp_path / "data")
    for attribute, value in cifar10_checksums(root).items():
        monkeypatch.setattr(datasets.CIFAR10, attribute, value)
    return root


TINY = [
    "trainer=cpu",
    "data.download=false",
    "data.val_size=100",
    "data.batch_size=32",
    "data.eval_batch_size=100",
    "embedding_size=16",
    "backbone.channels=[4,8]",
    "trainer.max_epochs=1",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "evaluation.figures=false",  # matplotlib and the projector are most of a tiny run: on where a test looks at them
]


def compose_config(*overrides: str, config_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def tiny_config(data_root: Path, output_dir: Path, *overrides: str) -> DictConfig:
    """TINY on `data_root`, writing into `output_dir`; the groups' own defaults (`~experiment`: no default
    experiment) unless an experiment is chosen, so that these tests do not depend on the default recipe."""
    chosen = any(o.startswith("experiment=") for o in overrides)
    other_backbone = any(o.startswith("backbone=") for o in overrides)  # TINY's backbone keys are SimpleCNN's
    tiny = [o for o in TINY if not (other_backbone and o.startswith("backbone."))]
    cfg = compose_config(f"paths.data_dir={data_root}", *tiny, *([] if chosen else ["~experiment"]), *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path, mnist_root: Path) -> Callable[..., DictConfig]:
    """A tiny, fast training config on synthetic MNIST, writing into tmp_path/run."""

    def make(*overrides: str) -> DictConfig:
        return tiny_config(mnist_root, tmp_path / "run", *overrides)

    return make


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], dict]) -> dict:
    """`make(folder)` once in the whole session, however many xdist workers need it (a session fixture is per
    worker): the first to get here makes it in a folder all the session's workers share, the others wait on the lock
    and read back the JSON record it left. The record and the files are the same whichever worker made them."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-<n>/: this session's workers' folders are popen-gw0, popen-gw1, ...
    done = base / f"{name}.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if `make` raises
        if done.is_file():
            return json.loads(done.read_text())
        folder = base / name
        if folder.exists():  # a worker whose `make` failed: start again
            shutil.rmtree(folder)
        folder.mkdir()
        record = make(folder)
        done.with_suffix(".tmp").write_text(json.dumps(record))
        done.with_suffix(".tmp").replace(done)
        return record


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny training run shared by the tests that only need a checkpoint: (data root, its metrics.json).
    Made once for all the workers (once_per_session); the tests only read its files."""

    def make(root: Path) -> dict:
        from arcface_lightning.core.runs import run
        from arcface_lightning.train import train

        data = write_mnist(root / "data")
        L.seed_everything(0, verbose=False)
        return {
            "data": str(data),
            "record": run(train, tiny_config(data, root / "run", "logger=csv", "trainer.max_epochs=2")),
        }

    made = once_per_session(tmp_path_factory, "trained", make)
    return Path(made["data"]), made["record"]


def cli_command(module: str, *overrides: str) -> dict:
    """subprocess arguments for an entry point run as a user would (`python -m arcface_lightning.<module>`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ARCFACE_DATA_DIR", None)
    return {"args": [sys.executable, "-m", f"arcface_lightning.{module}", *overrides], "cwd": ROOT, "env": env}


def cli_process(module: str, *overrides: str) -> subprocess.CompletedProcess:
    """The command in a process of its own, forked from this one (tests/forked.py): for DDP's other ranks and
    launchers that start processes. `cli_command` where a test needs a new interpreter."""
    with tempfile.TemporaryDirectory() as logs:
        return run_forked(module, list(overrides), Path(logs))


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    escaped: BaseException | None  # an exception the command did not turn into a line: a traceback for a user


def invoke(command: str, argv: list[str]) -> Outcome:
    """`python -m arcface_lightning.<command> *argv` in this process, as its console script runs it (`cli()`, or
    `main(argv)` for pack and report, with sys.argv set): exit code, stdout, stderr, and any exception that escaped.
    What a command changes in the process is put back: sys.argv, the working directory, signal handlers, the root
    logger's handlers and level (Hydra configures logging per job), and ARCFACE_DATA_DIR (unset, as cli_command)."""
    module = importlib.import_module(f"arcface_lightning.{command}")
    saved_argv, saved_cwd, out, err = sys.argv, os.getcwd(), io.StringIO(), io.StringIO()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    data_dir = os.environ.pop("ARCFACE_DATA_DIR", None)
    sys.argv = [module.__file__, *argv]
    code, escaped = 0, None
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = console_script(command, argv)
    except Exception as error:
        escaped, code = error, 1
        err.write(traceback.format_exc())  # what Python would print for a user
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        if data_dir is not None:
            os.environ["ARCFACE_DATA_DIR"] = data_dir
        for signum, handler in handlers.items():  # a command's own handlers (report's) end with it
            signal.signal(signum, handler)
        for handler in root.handlers[:]:  # Hydra's: to our StringIO and the run dir's log file
            if handler not in root_handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in root_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(root_level)
    return Outcome(code, out.getvalue(), err.getvalue(), escaped)


def cli(module: str, *overrides: str) -> subprocess.CompletedProcess:
    """An entry point run as its console script would run it, in this process (`invoke`): the same exit code,
    stdout and stderr as `python -m arcface_lightning.<module> ...` without paying for a new interpreter and its
    imports (most of a tiny run's time). `cli_process` where the test needs a process of its own."""
    outcome = invoke(module, list(overrides))
    return subprocess.CompletedProcess([module, *overrides], outcome.code, outcome.out, outcome.err)


def multirun(sweep: Path, data_root: Path, *overrides: str, process: bool = False) -> subprocess.CompletedProcess:
    """`python -m arcface_lightning.train -m ...` of tiny jobs on synthetic data, into `sweep` (in this process,
    or with `process=True` a real one: for launchers that start processes)."""
    run = cli_process if process else cli
    return run("train", "-m", f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_root}", *TINY, *overrides)
