"""data=insightface against data=mnist on all of MNIST: test accuracy, mean ± std over seeds (issue 25).

The insightface folders are written by MXNet's own RecordIO writer (tests/data/insightface/write_with_mxnet.py
--mnist, in a side environment with mxnet 1.9.1): the 60,000 training digits in MNIST's order as JPEG quality 95
(so the same seeded 5,000-image validation split as data=mnist, and the same batches), the 10,000 test digits as
the test folder (data.test_root). Each seed runs the same recipe through both, interleaved; data=insightface takes
data=mnist's shape and normalisation, and decodes the records once (data.cache=memory: the same pixels and order as
decoding in the workers every epoch, without its cost on a shared machine).

    /work/mxvenv/bin/python tests/data/insightface/write_with_mxnet.py <MNIST raw> /tmp/mnist_rec --mnist
    python benchmarks/insightface_accuracy.py /tmp/mnist_rec                       # experiment=mnist_fast, seeds 0 1 2
    python benchmarks/insightface_accuracy.py /tmp/mnist_rec --experiment mnist_default
"""

from __future__ import annotations

import argparse
import time
from statistics import mean, stdev

from common import data_dir, machine, run_project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rec", help="the folder with train/ and test/ written by write_with_mxnet.py --mnist")
    parser.add_argument("--experiment", default="mnist_fast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    mnist = data_dir(args.data_dir)
    paths = {
        "data=mnist": ["data=mnist"],
        "data=insightface": [
            "data=insightface", f"data.root={args.rec}/train", f"data.test_root={args.rec}/test",
            "data.in_channels=1", "data.image_size=28", "data.val_size=5000", "data.mean=[0.1307]",
            "data.std=[0.3081]", "data.cache=memory",
        ],
    }  # fmt: skip
    results: dict[str, list[float]] = {name: [] for name in paths}
    for seed in args.seeds:
        for name, overrides in paths.items():
            start = time.perf_counter()
            metrics = run_project(f"experiment={args.experiment}", *overrides, f"seed={seed}", "logger=csv", data=mnist)
            results[name].append(metrics["test/acc"])
            print(f"seed {seed} {name}: test/acc {metrics['test/acc']:.4f} ({time.perf_counter() - start:.0f} s)")
    print(f"experiment={args.experiment}, seeds {args.seeds}; {machine()}")
    for name, accs in results.items():
        spread = stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name:18s} test/acc {mean(accs):.4f} ± {spread:.4f}  ({', '.join(f'{a:.4f}' for a in accs)})")


if __name__ == "__main__":
    main()
