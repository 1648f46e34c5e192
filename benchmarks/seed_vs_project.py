"""One epoch of the seed script against one epoch of the project's `experiment=seed_mnist`, and Lightning's
training throughput against a plain PyTorch loop over the project's own data path.

Part 1 alternates, `--repeats` times: the seed script (benchmarks/seed_script.py, 1 epoch: training on 60,000 images
plus its evaluation on the training and test sets) and the project (1 epoch: training on 55,000 images plus
validation on 5,000, Lightning's Timer `time/fit_s`; the optional TensorBoard angle figures off, as the seed draws
none: they add about 0.3 s per validation), each a fresh process. Prints every epoch time, the median ratio
project ÷ seed, and both test accuracies (the project's is the argmax of the cosines; the seed's own number,
margin applied, is shown beside its correct one).

Part 2, fresh processes: training throughput under Lightning against a plain loop (`for batch in loader: ...`)
over the same data module, model and optimizer, their steps interleaved in one process (see one_throughput), for
experiment=seed_mnist with its own trainer, callbacks and loggers, and for a bare LightningModule under
`Trainer(barebones=True)`: Lightning's own floor. Only steady-state training counts (validation off, the first 20
steps not timed). Images/s and their ratio, `--throughput-repeats` processes per variant.

Part 3: the floor. torch's FlopCounterMode counts the FLOPs of one training step of the seed network (forward and
backward), and a large fp32 matmul measures what this CPU can do; their ratio is the fastest an epoch could be.

    python benchmarks/seed_vs_project.py                      # real MNIST from ARCFACE_DATA_DIR
    python benchmarks/seed_vs_project.py --repeats 5 --throughput-repeats 9 --throughput-batches 300
    python benchmarks/seed_vs_project.py --skip-epochs --throughput-batch-size 256      # Lightning's cost diluted
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from common import ROOT, data_dir, machine, run_project


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


def one_throughput(variant: str, data: str, batches: int, batch_size: int) -> tuple[float, float]:
    """Images/s of Lightning and of a plain loop, trained side by side in this (fresh) process.

    `variant` project: experiment=seed_mnist with its own trainer, callbacks, loggers and module. `variant` bare: the
    same network in a LightningModule whose training_step only returns the loss, under `Trainer(barebones=True)`
    (no callbacks, loggers or metrics): Lightning's own floor. Every training batch, a callback first runs one step
    of the plain loop on a twin of the model (its own copy of the weights, its own Adam, its own iterator over the
    same data module), so both see the same machine at the same moment: this VM's speed drifts by ±20% within
    seconds, which fresh processes run one after the other cannot cancel. Lightning's step is the time from the end
    of one plain step to the start of the next: data, hooks, logging and all."""
    import copy

    import lightning as L
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from arcface_lightning.core.config import CONF_DIR, register_configs
    from arcface_lightning.train import build
    from arcface_lightning.training.module import ArcFaceModule

    register_configs()
    warm = 20  # steps before the clocks start, in both: first-call costs are no throughput

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
                f"data.batch_size={batch_size}",
                "evaluation.figures=false",
                "~callbacks.model_checkpoint",  # monitors val/acc, which is off here
                "callbacks.progress_bar.refresh_rate=0",  # readable output; the bar costs ~10 µs a step
            ],
        )
    L.seed_everything(0, verbose=False)

    class BareModule(ArcFaceModule):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            images, labels = batch
            return F.cross_entropy(self.head(self(images), labels), labels)

    class Interleave(L.Callback):
        """One plain-loop step on the twin at the start of every Lightning step; both clocks."""

        def __init__(self, datamodule: L.LightningDataModule, twin: torch.nn.Module) -> None:
            self.datamodule, self.twin, self.plain, self.lightning, self.end = datamodule, twin, [], [], None

        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.optimizer = torch.optim.Adam(self.twin.parameters(), lr=cfg.optimizer.lr)
            self.batches = iter(self.datamodule.train_dataloader())

        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int) -> None:
            start = time.perf_counter()
            if self.end is not None:
                self.lightning.append(start - self.end)
            images, labels = self.datamodule.on_after_batch_transfer(next(self.batches), 0)
            loss = F.cross_entropy(self.twin.head(self.twin(images), labels), labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.end = time.perf_counter()
            self.plain.append(self.end - start)

    with tempfile.TemporaryDirectory() as tmp:
        with open_dict(cfg):
            cfg.paths.output_dir = tmp
        datamodule, model, trainer = build(cfg)
        if variant == "bare":
            model = BareModule(**model.hparams)
            trainer = L.Trainer(
                barebones=True,
                accelerator="cpu",
                devices=1,
                max_epochs=1,
                limit_train_batches=batches,
                limit_val_batches=0,
                default_root_dir=tmp,
            )
        clock = Interleave(datamodule, copy.deepcopy(model))  # the same initial weights
        trainer.callbacks.append(clock)
        trainer.fit(model, datamodule=datamodule)
    steps = len(clock.lightning) - warm  # the last Lightning step has no next start to end it
    plain, lightning = sum(clock.plain[warm : warm + steps]), sum(clock.lightning[warm:])
    return steps * cfg.data.batch_size / lightning, steps * cfg.data.batch_size / plain


def throughput(data: str, repeats: int, batches: int, batch_size: int) -> None:
    """`repeats` fresh processes per variant, alternating: each starts from the same state, as a user's run does."""

    def measure(variant: str) -> tuple[float, float]:
        args = [sys.executable, __file__, "--data-dir", data, "--one", variant, "--throughput-batches", str(batches)]
        args += ["--throughput-batch-size", str(batch_size)]
        result = subprocess.run(args, capture_output=True, text=True, check=True)
        lightning, plain = result.stdout.strip().splitlines()[-1].split()
        return float(lightning), float(plain)

    ratios: dict[str, list[float]] = {"project": [], "bare": []}
    for repeat in range(repeats):
        for variant in ("project", "bare") if repeat % 2 == 0 else ("bare", "project"):
            lightning, plain = measure(variant)
            ratios[variant].append(lightning / plain)
            print(
                f"throughput {repeat + 1} {variant:7s}: Lightning {lightning:.0f} img/s | plain loop {plain:.0f} "
                f"img/s | ratio {ratios[variant][-1]:.3f}",
                flush=True,
            )
    print(
        f"throughput ratio Lightning ÷ plain loop: experiment=seed_mnist median {median(ratios['project']):.3f} "
        f"(target ≥ 0.95); bare LightningModule under Trainer(barebones=True), Lightning's floor, median "
        f"{median(ratios['bare']):.3f}; over {repeats} runs of {batches} batches of {batch_size}",
        flush=True,
    )


def flop_floor(images_per_epoch: int = 55_000, batch: int = 64) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from arcface_lightning.models.backbones import SimpleCNN
    from arcface_lightning.models.heads import ArcFaceHead

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
    parser.add_argument("--throughput-repeats", type=int, default=5, help="throughput runs per variant (0: none)")
    parser.add_argument("--throughput-batches", type=int, default=300, help="training batches per throughput run")
    parser.add_argument(
        "--throughput-batch-size",
        type=int,
        default=64,
        help="images per batch (the recipe's 64: Lightning's cost per step is fixed, so larger batches dilute it)",
    )
    parser.add_argument("--skip-epochs", action="store_true", help="only the throughput part")
    parser.add_argument("--one", choices=["project", "bare"], help=argparse.SUPPRESS)  # one throughput run
    args = parser.parse_args()
    data = data_dir(args.data_dir)
    if args.one:
        print(*one_throughput(args.one, data, args.throughput_batches, args.throughput_batch_size))
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
    if args.throughput_repeats > 0:
        throughput(data, args.throughput_repeats, args.throughput_batches, args.throughput_batch_size)
    flop_floor()


if __name__ == "__main__":
    main()
