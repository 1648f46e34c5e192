"""Inference throughput of the seed network (SimpleCNN defaults, 1×28×28 → 128) on this CPU: the eager Embedder under
torch.inference_mode, its TorchScript export and its ONNX export in ONNX Runtime (full graph optimisation, ORT's
default, and basic), at batch 1 and batch 256 and with 1 and 2 threads (torch.set_num_threads, ORT's intra-op
threads), images/s and the ratio to eager at the same thread count, measured in the same run. The exports are
arcface_lightning.export's own (export_model, uint8 input); ONNX Runtime is fed the uint8 array directly, as a server
would, and once more through inference.load_model's wrapper.

Weights are random unless --ckpt is given: the speed of a network does not depend on its trained values. Each runner
runs for --seconds per measurement after a warm-up, interleaved with the others, --repeats times; the table shows the
median (other work on the machine slows some measurements, and the median keeps the undisturbed ones). Where another
process holds a core, 2 threads can be far slower than 1: each parallel region waits for the thread that is not
running.

    python benchmarks/inference_throughput.py
    python benchmarks/inference_throughput.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt --repeats 7
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from statistics import median

import numpy as np
import onnxruntime as ort
import torch
from common import machine

from arcface_lightning.export import export_model
from arcface_lightning.models.backbones import SimpleCNN
from arcface_lightning.serving.checkpoints import Embedder, embedder_from_checkpoint
from arcface_lightning.serving.contract import Contract
from arcface_lightning.serving.inference import load_model

Runner = Callable[[np.ndarray], object]
EAGER = "eager PyTorch (inference_mode)"


def seed_embedder(ckpt: str | None) -> tuple[Embedder, Contract]:
    if ckpt:
        return embedder_from_checkpoint(ckpt)
    contract = Contract(28, 1, True, [0.1307], [0.3081], 128)  # the seed's MNIST normalisation
    return Embedder(SimpleCNN(), contract).eval(), contract


def onnx_session(path: Path, threads: int, basic: bool = False) -> Runner:
    options = ort.SessionOptions()  # default graph optimisation: ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def torch_runner(module: Callable[[torch.Tensor], torch.Tensor], threads: int) -> Runner:
    def run(batch: np.ndarray) -> object:
        torch.set_num_threads(threads)  # process-wide: set before every call of each runner
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    return run


def runners(embedder: Embedder, contract: Contract, folder: Path, threads: list[int]) -> dict[tuple[str, int], Runner]:
    """(runtime, threads) → a function of a uint8 batch; eager first."""
    onnx, script = folder / "model.onnx", folder / "model.pt"
    export_model(embedder, contract, "onnx", onnx)
    export_model(embedder, contract, "torchscript", script)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.14
        scripted = torch.jit.load(str(script))
    models: dict[tuple[str, int], Runner] = {}
    for t in threads:
        models[EAGER, t] = torch_runner(embedder, t)
        models["TorchScript (torch.jit.trace)", t] = torch_runner(scripted, t)
        models["ONNX Runtime (ORT_ENABLE_ALL)", t] = onnx_session(onnx, t)
    models["ONNX Runtime (ORT_ENABLE_BASIC)", threads[0]] = onnx_session(onnx, threads[0], basic=True)
    via_load_model = load_model(onnx, threads=threads[0])[0]
    models["ONNX Runtime via inference.load_model", threads[0]] = via_load_model
    return models


def images_per_second(run: Runner, batch: np.ndarray, seconds: float) -> float:
    calls, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        run(batch)
        calls += 1
    return calls * len(batch) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="a checkpoint instead of random weights of the seed network")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4, help="per runner, batch size and repeat")
    args = parser.parse_args()
    print(f"machine: {machine()}; onnxruntime {ort.__version__}; date {time.strftime('%Y-%m-%d')}", flush=True)
    embedder, contract = seed_embedder(args.ckpt)
    rng = np.random.default_rng(0)
    side = contract.image_size
    inputs = {b: rng.integers(0, 256, (b, contract.in_channels, side, side), np.uint8) for b in args.batches}
    with tempfile.TemporaryDirectory() as folder:
        models = runners(embedder, contract, Path(folder), args.threads)
        rates: dict[tuple[str, int, int], list[float]] = {(*key, b): [] for key in models for b in args.batches}
        for run in models.values():  # warm-up: first-call allocations, ORT's arena, oneDNN primitives, JIT profiling
            for b in args.batches:
                images_per_second(run, inputs[b], 0.2)
        for _ in range(args.repeats):
            for b in args.batches:
                for key, run in models.items():
                    rates[(*key, b)].append(images_per_second(run, inputs[b], args.seconds))
    rate = {key: median(values) for key, values in rates.items()}
    header = " | ".join(f"batch {b}: images/s | × eager" for b in args.batches)
    print(f"\n| runtime | threads | {header} |\n|---|---:|" + "---:|---:|" * len(args.batches))
    for name, t in models:
        cells = [f"{rate[name, t, b]:,.0f} | {rate[name, t, b] / rate[EAGER, t, b]:.2f}×" for b in args.batches]
        print(f"| {name} | {t} | {' | '.join(cells)} |")
    spread = max(max(v) / min(v) for v in rates.values())
    print(f"\nmedian of {args.repeats} interleaved runs of {args.seconds} s each; largest max/min spread {spread:.2f}")


if __name__ == "__main__":
    main()
