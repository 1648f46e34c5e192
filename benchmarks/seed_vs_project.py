"""One epoch of the seed script against one epoch of the project's `experiment=seed_mnist`, and Lightning's
training throughput against a plain PyTorch loop over the project's own data path.

Part 1 alternates, `--repeats` times: the seed script (benchmarks/seed_script.py, 1 epoch: training on 60,000 images
plus its evaluation on the training and test sets) and the project (1 epoch: training on 55,000 images plus
validation on 5,000, Lightning's Timer `time/fit_s`; the optional TensorBoard angle figures off, as the seed draws
none: they add about 0.2 s per validation), each a fresh process. Prints every epoch time, the median ratio
project ÷ seed, and both test accuracies (the project's is the argmax of the cosines; the seed's own number,
margin applied, is shown beside its correct one).

Part 2, in this process: the seed_mnist model trained by Lightning (the experiment's own trainer, callbacks and
loggers, progress bar silenced) against the same model, data module and optimizer in a plain loop (`for batch in
loader: ...`). Only steady-state training counts (validation off, the first 20 batches not timed, in both);
images/s and their ratio, alternating, `--throughput-repeats` times.

Part 3: the floor. torch's FlopCounterMode counts the FLOPs of one training step of the seed network (forward and
backward), and a large fp32 matmul measures what this CPU can do; their ratio is the fastest an epoch could be.

    python benchmarks/seed_vs_project.py                      # real MNIST from ARCFACE_DATA_DIR
    python benchmarks/seed_vs_project.py --repeats 5 --throughput-repeats 9 --throughput-batches 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, data_dir, machine, median, run_project


def seed_epoch(data: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seed.json"
        args = [sys.executable, str(ROOT / "benchmarks" / "seed_script.py"), "--data-dir", data, "--epochs", "1"]
        subprocess.run([*args, "--json", str(out)], check=True, capture_output=True)
        (record,) = json.loads(out.read_text())
    return {"epoch_s": record["train_s"] + record["eval_s"], **record}


def project_epoch(data: str) -> dict:
    metrics = run_project("experiment=seed_mnist", "trainer.max_epochs=1", "evaluation.figures=false", data=data)
    return {"epoch_s": metrics["time/fit_s"], **metrics}


def one_throughput(side: str, data: str, batches: int) -> float:
    """Images/s of one training run, `side` = lightning or plain, in this (fresh) process."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from arcface_lightning.train import CONF_DIR, build

    warm = 20  # batches before the clock starts, in both: first-call costs are no throughput

    class TrainingClock(L.Callback):
        """Steady-state training time: from the start of batch `warm` to the end of the last batch."""

        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int) -> None:
            if i == warm:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
            self.seconds = time.perf_counter() - self.start if trainer.global_step > warm else 0.0

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=seed_mnist",
                f"paths.data_dir={data}",
                "data.download=false",
                "trainer.max_epochs=1",
                f"trainer.limit_train_batches={batches}",
                "trainer.limit_val_batches=0",
                "evaluation.figures=false",
                "~callbacks.model_checkpoint",  # monitors val/acc, which is off here
                "callbacks.progress_bar.refresh_rate=0",  # readable output; the bar costs ~10 µs a step
            ],
        )
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        with open_dict(cfg):
            cfg.paths.output_dir = tmp
        datamodule, model, trainer = build(cfg)
        if side == "lightning":
            clock = TrainingClock()
            trainer.callbacks.append(clock)
            trainer.fit(model, datamodule=datamodule)
            return (batches - warm) * cfg.data.batch_size / clock.seconds
        # the same data module and model (channels_last included), used as a plain nn.Module in a plain loop
        datamodule.setup("fit")
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr)
        for i, batch in enumerate(datamodule.train_dataloader()):
            if i == warm:
                start = time.perf_counter()
            if i == batches:
                break
            images, labels = datamodule.on_after_batch_transfer(batch, 0)
            loss = F.cross_entropy(model.head(model(images), labels), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return (batches - warm) * cfg.data.batch_size / (time.perf_counter() - start)


def throughput(data: str, repeats: int, batches: int) -> None:
    """Alternating pairs of fresh processes: each run starts from the same state, as a user's run does."""

    def measure(side: str) -> float:
        args = [sys.executable, __file__, "--data-dir", data, "--one", side, "--throughput-batches", str(batches)]
        result = subprocess.run(args, capture_output=True, text=True, check=True)
        return float(result.stdout.strip().splitlines()[-1])

    ratios = []
    for repeat in range(repeats):
        if repeat % 2 == 0:  # alternate who goes first
            plain, lightning = measure("plain"), measure("lightning")
        else:
            lightning, plain = measure("lightning"), measure("plain")
        ratios.append(lightning / plain)
        print(
            f"throughput {repeat + 1}: plain loop {plain:.0f} img/s | Lightning {lightning:.0f} img/s | "
            f"ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(f"throughput ratio Lightning ÷ plain loop: median {median(ratios):.3f} over {repeats} (target ≥ 0.95)")


def flop_floor(images_per_epoch: int = 55_000, batch: int = 64) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from arcface_lightning.backbones import SimpleCNN
    from arcface_lightning.heads import ArcFaceHead

    backbone, head = SimpleCNN(), ArcFaceHead(embedding_size=128, num_classes=10, s=30.0, m=0.5)
    images, labels = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(head(backbone(images), labels), labels).backward()
    per_image = counter.get_total_flops() / batch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b  # warm-up
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    rate = repeats * 2 * 2048**3 / (time.perf_counter() - start)
    epoch = per_image * images_per_epoch
    print(
        f"floor: {per_image / 1e6:.1f} MFLOP per training image (forward + backward, FlopCounterMode), "
        f"{epoch / 1e12:.2f} TFLOP per 55,000-image epoch; fp32 matmul here {rate / 1e9:.0f} GFLOP/s, "
        f"so ≥ {epoch / rate:.1f} s per epoch at that rate",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="torchvision root with MNIST/raw (default ARCFACE_DATA_DIR)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--throughput-repeats", type=int, default=7, help="pairs of throughput runs")
    parser.add_argument("--throughput-batches", type=int, default=150, help="training batches per throughput run")
    parser.add_argument("--skip-epochs", action="store_true", help="only the throughput part")
    parser.add_argument("--one", choices=["plain", "lightning"], help=argparse.SUPPRESS)  # one throughput run
    args = parser.parse_args()
    data = data_dir(args.data_dir)
    if args.one:
        print(one_throughput(args.one, data, args.throughput_batches))
        return
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}", flush=True)
    if not args.skip_epochs:
        seed_times, project_times = [], []
        for repeat in range(args.repeats):
            runs = [("seed", seed_epoch), ("project", project_epoch)]
            for name, run in runs if repeat % 2 == 0 else runs[::-1]:  # alternate who goes first
                record = run(data)
                (seed_times if name == "seed" else project_times).append(record["epoch_s"])
                if name == "seed":
                    print(
                        f"seed    {repeat + 1}: epoch {record['epoch_s']:.1f} s (train {record['train_s']:.1f} + "
                        f"eval {record['eval_s']:.1f}) | test acc {record['test_acc']:.4f} "
                        f"(seed's own metric {record['test_acc_margin']:.4f})",
                        flush=True,
                    )
                else:
                    print(
                        f"project {repeat + 1}: epoch {record['epoch_s']:.1f} s (train + validation) | test/acc "
                        f"{record['test/acc']:.4f} | whole process {record['process_s']:.1f} s",
                        flush=True,
                    )
        ratio = median(project_times) / median(seed_times)
        print(
            f"epoch time: seed median {median(seed_times):.1f} s, project median {median(project_times):.1f} s, "
            f"ratio project ÷ seed {ratio:.3f} (target ≤ 0.5)",
            flush=True,
        )
    throughput(data, args.throughput_repeats, args.throughput_batches)
    flop_floor()


if __name__ == "__main__":
    main()
