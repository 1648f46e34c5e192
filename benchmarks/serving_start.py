"""How long the serving commands take, whole process (interpreter start, imports, work, exit), as a user runs them.

    python benchmarks/serving_start.py                          # this checkout
    PYTHONPATH=<another checkout> python benchmarks/serving_start.py   # that one's package (e.g. before a change)

Cases, each `--runs` times (default 3) after one untimed warm-up run, median and min–max of the wall clock:
  (a) search: 1,000 query rows against a 10,000-row gallery, both .npz of contract.save_embeddings (random unit
      rows, D=128, one contract with one weights_sha256), k=5, output=hits.csv;
  (b) verify of two PNGs (real MNIST digits from ARCFACE_DATA_DIR or --data-dir where present, else synthetic) with an
      .onnx model; (b') the same with two 1600×1200 RGB PNGs of those digits (converted and resized to 28×28);
  (c) embed of 100 PNGs with that .onnx (a version whose embed refuses exports: shown as refused);
  (d) verify with the .ckpt the .onnx was exported from, and (e) embed of the 100 PNGs with it: for contrast (a .ckpt
      loads Lightning).
The model is made here: a tiny training run (SimpleCNN, 16-D, 2 epochs on a synthetic MNIST of 600 images, as the
tests' `trained` fixture) and its export, both through the command line. Only the command line is timed, and the
inputs are made through it or through save_embeddings (whose signature is unchanged), so the same script measures
an older checkout. The commands run in a temporary folder, with PYTHONPATH set to the package measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = os.environ.get("PYTHONPATH") or str(ROOT)  # the checkout measured: PYTHONPATH's, else this one
sys.path.insert(0, PACKAGE.split(os.pathsep)[0])

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

TINY = [  # tests/conftest.py's TINY and `trained` fixture: a tiny SimpleCNN trained for 2 epochs on the CPU
    "~experiment",
    "trainer=cpu",
    "data.download=false",
    "data.val_size=100",
    "data.batch_size=32",
    "data.eval_batch_size=100",
    "embedding_size=16",
    "backbone.channels=[4,8]",
    "trainer.max_epochs=2",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logger=csv",
]


def command(module: str, *overrides: str, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    """`python -m arcface_lightning.<module> <overrides>` in a fresh process: (wall seconds, the finished process)."""
    env = {**os.environ, "PYTHONPATH": PACKAGE}
    env.pop("ARCFACE_DATA_DIR", None)
    args = [sys.executable, "-m", f"arcface_lightning.{module}", *overrides]
    began = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    return time.perf_counter() - began, result


def checked(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    _, result = command(module, *overrides, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"error: arcface_lightning.{module} {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    return result


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic(labels: np.ndarray, seed: int) -> np.ndarray:
    """28×28 noise plus a bright square whose position encodes the class (the tests' synthetic MNIST)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label) % 16, 4)
        images[i, row * 7 : row * 7 + 6, col * 7 : col * 7 + 6] = 255
    return images


def digits(data_dir: str | None, n: int) -> tuple[np.ndarray, str]:
    """n 28×28 uint8 digits: real MNIST test images where present, else synthetic ones."""
    root = data_dir or os.environ.get("ARCFACE_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    raw = Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    if raw.is_file():
        return np.frombuffer(raw.read_bytes()[16:], np.uint8).reshape(-1, 28, 28)[:n], f"real MNIST ({raw.parent})"
    return synthetic(np.arange(n) % 10, seed=5), "synthetic"


def make_inputs(work: Path, data_dir: str | None) -> dict[str, str]:
    """The checkpoint and its .onnx (through the command line), the PNGs, and the two embeddings files."""
    try:
        from arcface_lightning.serving.contract import Contract, save_embeddings
    except ImportError:  # a checkout from before contract.py (measured as "before")
        from arcface_lightning.serving.inference import Contract, save_embeddings

    raw = work / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", 600, 1), ("t10k", 200, 2)):
        labels = np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", synthetic(labels, seed))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    run_dir = work / "train"
    checked("train", *TINY, f"paths.data_dir={work / 'data'}", f"hydra.run.dir={run_dir}", cwd=work)
    ckpt = json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    onnx = work / "model.onnx"
    checked("export", f"ckpt_path={ckpt}", f"output={onnx}", f"hydra.run.dir={work / 'export'}", cwd=work)
    images, source = digits(data_dir, 100)
    folder = work / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    for i in range(2):  # photo-sized: decoded as RGB, reduced to luma and resized 1200 → 28 on the shorter side
        Image.fromarray(images[i]).convert("RGB").resize((1600, 1200), Image.BICUBIC).save(work / f"photo{i}.png")
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(11_000, 128))
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    contract = Contract(28, 1, True, [0.1307], [0.3081], 128, weights_sha256="0" * 64)
    files = {}
    for name, part in (("gallery", rows[:10_000]), ("query", rows[10_000:])):
        labels = np.arange(len(part)) % 100
        sources = [f"{name}:{i}" for i in range(len(part))]
        files[name] = str(save_embeddings(work / f"{name}.npz", part, labels, sources, contract, "random"))
    return {"ckpt": ckpt, "onnx": str(onnx), "pngs": str(folder), "a": str(folder / "000.png"),
            "b": str(folder / "001.png"), "photos": [str(work / f"photo{i}.png") for i in range(2)], "images": source,
            **files}  # fmt: skip


def cases(inputs: dict[str, str], work: Path) -> dict[str, tuple[str, list[str]]]:
    pair = [f"a={inputs['a']}", f"b={inputs['b']}", "threshold=0.5"]
    pngs = f"input={inputs['pngs']}"
    return {
        "(a) search 1,000 × 10,000 .npz, k=5": (
            "search",
            [f"gallery={inputs['gallery']}", f"query={inputs['query']}", "k=5", f"output={work / 'hits.csv'}"],
        ),
        "(b) verify 2 PNGs, .onnx": ("verify", [f"ckpt_path={inputs['onnx']}", *pair]),
        "(b') verify 2 RGB PNGs of 1600×1200, .onnx": (
            "verify",
            [f"ckpt_path={inputs['onnx']}", f"a={inputs['photos'][0]}", f"b={inputs['photos'][1]}", "threshold=0.5"],
        ),
        "(c) embed 100 PNGs, .onnx": ("embed", [f"ckpt_path={inputs['onnx']}", pngs, f"output={work / 'e1.npz'}"]),
        "(d) verify 2 PNGs, .ckpt": ("verify", [f"ckpt_path={inputs['ckpt']}", *pair]),
        "(e) embed 100 PNGs, .ckpt": (
            "embed",
            [f"ckpt_path={inputs['ckpt']}", pngs, f"output={work / 'e2.npz'}", "trainer=cpu"],
        ),
    }


def git_commit(path: str) -> str:
    result = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    return (result.stdout.strip() or "unknown") + (" (modified)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case before them")
    parser.add_argument("--data-dir", default=None, help="a torchvision root with MNIST/raw, for real digits")
    args = parser.parse_args()
    import arcface_lightning

    package = str(Path(arcface_lightning.__file__).resolve().parents[1])
    print(f"package: {package} (commit {git_commit(package)})")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = make_inputs(work, args.data_dir)
        print(f"PNGs: {inputs['images']}; runs per case: {args.runs} timed after {args.warmup} warm-up\n")
        print("| case | median (s) | min–max (s) | runs |\n|---|---|---|---|")
        for name, (module, overrides) in cases(inputs, work).items():
            times: list[float] = []
            refused = ""
            for i in range(args.warmup + args.runs):
                seconds, result = command(module, *overrides, f"hydra.run.dir={work / 'runs' / str(i)}", cwd=work)
                if result.returncode != 0:
                    lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
                    refused = lines[-1][:150]
                    break
                if i >= args.warmup:
                    times.append(seconds)
            if refused:
                print(f"| {name} | n/a | refused: {refused} | 0 |")
            else:
                print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f}–{max(times):.2f} | {len(times)} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
