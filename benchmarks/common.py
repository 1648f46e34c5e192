"""Shared by the benchmark scripts: run the project's entry point as a user would and read its metrics.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, installed or not


def data_dir(path: str | None) -> str:
    """The torchvision root holding MNIST/raw: --data-dir, else ARCFACE_DATA_DIR, else ../shared/data."""
    root = path or os.environ.get("ARCFACE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    if not (Path(root) / "MNIST" / "raw").is_dir():
        raise SystemExit(f"error: no MNIST/raw under {root}; pass --data-dir or set ARCFACE_DATA_DIR")
    return root


def read_mnist(root: str, split: str = "train") -> tuple:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of MNIST's IDX files under <root>/MNIST/raw, as NumPy arrays."""
    import numpy as np

    prefix = {"train": "train", "test": "t10k"}[split]
    raw = Path(root) / "MNIST" / "raw"
    images = np.frombuffer((raw / f"{prefix}-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
    return images, np.frombuffer((raw / f"{prefix}-labels-idx1-ubyte").read_bytes()[8:], np.uint8)


def run_project(*overrides: str, data: str) -> dict:
    """`python -m arcface_lightning.train <overrides>` in a fresh process; its metrics.json plus the process's own
    wall time (start to exit, imports included) as `process_s`."""
    with tempfile.TemporaryDirectory() as run_dir:
        args = [sys.executable, "-m", "arcface_lightning.train", *overrides]
        args += [f"paths.data_dir={data}", "data.download=false", f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"error: {' '.join(args)} failed:\n{result.stderr[-2000:]}")
        return {**json.loads((Path(run_dir) / "metrics.json").read_text()), "process_s": elapsed}


def machine() -> str:
    import platform

    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
