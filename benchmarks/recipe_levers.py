"""Training-step cost of the default recipe's levers, measured side by side in one process: images per second of a
full step (batched augmentation, forward, ArcFace loss, backward, Adam) for each candidate network, batch size,
memory format and precision. Steps of the candidates are interleaved (round-robin), so machine load shifts every
candidate alike and the ratios hold where the absolute figures do not.

    python benchmarks/recipe_levers.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/recipe_levers.py   # as without AVX512
    python benchmarks/recipe_levers.py --compile     # adds torch.compile'd variants (their compile time is printed)
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch
from common import machine

from arcface_lightning.data.augment import BatchPreparation, settings
from arcface_lightning.models.backbones import SimpleCNN
from arcface_lightning.models.heads import ArcFaceHead

CANDIDATES = {  # name: (channels, convs_per_block, batch, channels_last, precision)
    "default [32,64,128] b128 NHWC": ((32, 64, 128), 1, 128, True, "32"),
    "default [32,64,128] b128 NCHW": ((32, 64, 128), 1, 128, False, "32"),
    "default [32,64,128] b256 NHWC": ((32, 64, 128), 1, 256, True, "32"),
    "default [32,64,128] b256 NCHW": ((32, 64, 128), 1, 256, False, "32"),
    "narrow [24,48,96] b256 NHWC": ((24, 48, 96), 1, 256, True, "32"),
    "narrow [16,32,64] b256 NHWC": ((16, 32, 64), 1, 256, True, "32"),
    "default [32,64,128] b128 bf16": ((32, 64, 128), 1, 128, True, "bf16"),
}


def build(channels: tuple[int, ...], convs: int, channels_last: bool, compile_: bool):
    torch.manual_seed(0)
    backbone = SimpleCNN(embedding_size=128, channels=channels, convs_per_block=convs, batch_norm=True)
    head = ArcFaceHead(embedding_size=128, num_classes=10, s=30.0, m=0.5)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-3, weight_decay=1e-4)
    forward = torch.compile(backbone) if compile_ else backbone
    return backbone, head, optimizer, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the default network")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; ATen {torch.backends.cpu.get_cpu_capability()}; threads {torch.get_num_threads()}")
    candidates = dict(CANDIDATES)
    if args.compile:
        candidates["default [32,64,128] b256 NHWC compiled"] = ((32, 64, 128), 1, 256, True, "32c")
    prepare = BatchPreparation(settings("bench", "affine"), True, [0.1307], [0.3081])
    generator = torch.Generator().manual_seed(0)
    runs = {}
    for name, (channels, convs, batch, channels_last, precision) in candidates.items():
        began = time.perf_counter()
        model = build(channels, convs, channels_last, precision == "32c")
        images = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
        labels = torch.randint(0, 10, (batch,))
        runs[name] = (model, images, labels, channels_last, precision, batch, [])
        for _ in range(args.warmup):
            step(runs[name], prepare, generator)
        print(f"{name}: built and warmed up in {time.perf_counter() - began:.1f} s", flush=True)
    for _ in range(args.steps):  # round-robin: one step of each candidate in turn
        for run in runs.values():
            began = time.perf_counter()
            step(run, prepare, generator)
            run[-1].append(time.perf_counter() - began)
    base = median(next(iter(runs.values()))[-1]) / next(iter(runs.values()))[5]
    print(f"\n{'candidate':<42} {'ms/step':>8} {'img/s':>8} {'time per image ÷ first row':>28}")
    for name, run in runs.items():
        per_step = median(run[-1])
        print(f"{name:<42} {per_step * 1e3:8.1f} {run[5] / per_step:8.0f} {per_step / run[5] / base:28.3f}")


def step(run, prepare: BatchPreparation, generator: torch.Generator) -> None:
    (_, head, optimizer, forward), images, labels, channels_last, precision, _, _ = run
    x = prepare(images, generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = head(forward(x), labels)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


if __name__ == "__main__":
    main()
