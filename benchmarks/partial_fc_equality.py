"""How far a 2-rank Lightning run with sharded centres ends from the same run with the plain head, against how far
float rounding alone moves a run: after 1, 3 and 31 optimiser steps.

    python benchmarks/partial_fc_equality.py --data-dir ../shared/data

Three 2-process gloo runs (`trainer=ddp_cpu`) of the default experiment on real MNIST, made small (batch 8 per rank,
embedding 16, channels 4/8, SGD + cosine, fp32), from the same seed: (plain) the plain head, DDP replicating the
centres; (sharded) `head.sharded=true`, each rank holding 5 of the 10 centres, the cross-entropy across ranks;
(rounding) the plain head with `channels_last=false`: the same numbers up to the convolutions' float rounding.
Printed: the largest difference from (plain) over the backbone's weights and over the centres, relative to each
tensor's largest value. Sharding is right when its difference stays within what rounding alone produces.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"plain": ["head.sharded=false"], "sharded": ["head.sharded=true"], "rounding": ["channels_last=false"]}


def train(run_dir: Path, data_dir: str, steps: int, extra: list[str]) -> dict[str, torch.Tensor]:
    command = [
        sys.executable, "-m", "arcface_lightning.train", f"hydra.run.dir={run_dir}", f"paths.data_dir={data_dir}",
        "trainer=ddp_cpu", "data.download=false", "data.val_size=100", "data.batch_size=8", "embedding_size=16",
        "backbone.channels=[4,8]", "optimizer=sgd", "scheduler=cosine", "trainer.precision=32-true",
        f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.limit_test_batches=0", "logger=csv",
        "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false", *extra,
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point() and not k.startswith("val_")}


def relative(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], centres: bool) -> float:
    keys = [k for k in reference if (k == "head.weight") == centres]
    return max(((state[k] - reference[k]).abs().max() / reference[k].abs().max()).item() for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3, 31])
    args = parser.parse_args()
    print("| steps | sharded: backbone | sharded: centres | rounding: backbone | rounding: centres |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            states = {name: train(Path(tmp) / f"{name}{steps}", args.data_dir, steps, x) for name, x in RUNS.items()}
            cells = [
                f"{relative(states[name], states['plain'], centres):.1e}"
                for name in ("sharded", "rounding")
                for centres in (False, True)
            ]
            print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
