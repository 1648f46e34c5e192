"""Whole-process time of `experiment=mnist_fast`: from `python -m arcface_lightning.train ...` to exit, imports,
data loading, training, validation and the final test included; and the test accuracy each run reached.

    python benchmarks/time_to_accuracy.py                 # 5 runs, real MNIST from ARCFACE_DATA_DIR
    python benchmarks/time_to_accuracy.py --runs 3 --experiment mnist_fast --target 0.99
"""

from __future__ import annotations

import argparse
import time
from statistics import median

from common import data_dir, machine, run_project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="torchvision root with MNIST/raw (default ARCFACE_DATA_DIR)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--experiment", default="mnist_fast")
    parser.add_argument("--target", type=float, default=0.99, help="test accuracy to reach")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. seed=1")
    args = parser.parse_args()
    data = data_dir(args.data_dir)
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}", flush=True)
    times, accuracies = [], []
    for run in range(args.runs):
        metrics = run_project(f"experiment={args.experiment}", *args.overrides, data=data)
        times.append(metrics["process_s"])
        accuracies.append(metrics["test/acc"])
        print(
            f"run {run + 1}: {metrics['process_s']:.1f} s whole process (fit {metrics['time/fit_s']:.1f} s, "
            f"test {metrics['time/test_s']:.1f} s) | test/acc {metrics['test/acc']:.4f}",
            flush=True,
        )
    reached = sum(acc >= args.target for acc in accuracies)
    print(
        f"median {median(times):.1f} s (min {min(times):.1f}, max {max(times):.1f}); test/acc ≥ {args.target} in "
        f"{reached}/{args.runs} runs (min {min(accuracies):.4f}, median {median(accuracies):.4f})"
    )


if __name__ == "__main__":
    main()
