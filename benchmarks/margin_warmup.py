"""Does a margin warm-up rescue ArcFace where it stalls? The full ArcFace head (s = 30, m = 0.5) on the 1,000
synthetic identities of benchmarks/partial_fc_accuracy.py, where it stalled for two of three seeds, trained with
head.margin_warmup_epochs 0 and 1, interleaved per seed. (MNIST's 10 classes never stall: BENCHMARKS.md.) With
--digits DATA_ROOT the 1,000 identities are real MNIST digits instead (the first 1,000 training images, each an
identity seen through shifted windows with noise).

    python benchmarks/margin_warmup.py --seeds 0 1 2 --epochs 3
    python benchmarks/margin_warmup.py --seeds 0 1 2 --epochs 3 --digits /work/shared/data
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from partial_fc_accuracy import CLASSES, train, write_set
from torchvision.datasets import MNIST


def digit_patterns(data_root: str) -> torch.Tensor:
    """The first CLASSES MNIST training digits, padded by 2 pixels and standardised: one identity each."""
    digits = MNIST(data_root, train=True, download=False).data[:CLASSES, None].float()
    digits = F.pad(digits, (2, 2, 2, 2))
    return (digits - digits.mean((2, 3), keepdim=True)) / digits.std((2, 3), keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--digits", metavar="DATA_ROOT", help="real MNIST digits as the identities (torchvision root)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        patterns = digit_patterns(args.digits) if args.digits else None
        train_list, test_list = write_set(Path(tmp) / "set", patterns=patterns)
        table: dict[int, list[dict]] = {0: [], 1: []}
        for seed in args.seeds:
            for warmup in table:
                out = Path(tmp) / f"run_{warmup}_{seed}"  # the full head (rate 1.0)
                record = train(
                    train_list, test_list, 1.0, seed, args.epochs, out, f"head.margin_warmup_epochs={warmup}"
                )
                table[warmup].append(record)
                print(f"warm-up {warmup} seed {seed}: test/acc {record['test/acc']:.4f}", flush=True)
    print(f"\n| head.margin_warmup_epochs | test/acc per seed {args.seeds} | mean ± std | val/acc_best per seed |")
    print("|---|---|---|---|")
    for warmup, records in table.items():
        accs = [r["test/acc"] for r in records]
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        vals = ", ".join(f"{r['val/acc_best']:.4f}" for r in records)
        shown = ", ".join(f"{a:.4f}" for a in accs)
        print(f"| {warmup} | {shown} | {statistics.mean(accs):.4f} ± {std:.4f} | {vals} |")


if __name__ == "__main__":
    main()
