"""Fresh re-implementation of the plain-PyTorch "seed script" (docs/seed.md), kept as a benchmark baseline.

It trains the seed's SimpleCNN with its ArcFace head (s=30, m=0.5, Adam lr 1e-3) on MNIST and, after each
epoch, evaluates on the whole training set and the test set. It reproduces the seed's FLAWED metric on
purpose: the "margin" accuracy is the argmax of the logits with the margin applied to the true class (labels
passed in at evaluation). In the same pass it also reports the correct accuracy, the argmax of the cosines.

Usage:

    python benchmarks/seed_script.py --data-dir /path/to/data --epochs 1
    python benchmarks/seed_script.py --epochs 10 --seed 0 --threads 2 --json seed_run.json

The data directory is the torchvision root holding MNIST/raw (nothing is downloaded); it defaults to the
ARCFACE_DATA_DIR environment variable, else "data".
"""

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


class SimpleCNN(nn.Module):
    def __init__(self, embedding_size: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, embedding_size)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc(x.flatten(1))


class ArcFaceHead(nn.Module):
    """The seed's head: acos of all cosines, cos(theta + m) on the target, no fallback for theta + m > pi."""

    def __init__(self, embedding_size: int = 128, num_classes: int = 10, s: float = 30.0, m: float = 0.5) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes))
        nn.init.xavier_uniform_(self.W)

    def cosines(self, emb: Tensor) -> Tensor:
        return F.normalize(emb, dim=1) @ F.normalize(self.W, dim=0)

    def forward(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Return (margin logits, plain cosines)."""
        cos = self.cosines(emb)
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        one_hot = F.one_hot(labels, cos.size(1)).to(cos.dtype)
        logits = self.s * (one_hot * torch.cos(theta + self.m) + (1 - one_hot) * cos)
        return logits, cos


@torch.no_grad()
def evaluate(model: nn.Module, head: ArcFaceHead, loader: DataLoader) -> tuple[float, float]:
    """Return (seed's accuracy, margin applied to the true class; correct accuracy, argmax of the cosines)."""
    model.eval()
    margin_hits = plain_hits = total = 0
    for images, labels in loader:
        logits, cos = head(model(images), labels)
        margin_hits += (logits.argmax(1) == labels).sum().item()
        plain_hits += (cos.argmax(1) == labels).sum().item()
        total += labels.numel()
    model.train()
    return margin_hits / total, plain_hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("ARCFACE_DATA_DIR", "data"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the per-epoch records to this JSON file")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tf = transforms.ToTensor()
    train_set = datasets.MNIST(args.data_dir, train=True, download=False, transform=tf)
    test_set = datasets.MNIST(args.data_dir, train=False, download=False, transform=tf)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=0, generator=generator)
    train_eval_loader = DataLoader(train_set, args.batch_size, shuffle=False, num_workers=0)
    test_loader = DataLoader(test_set, args.batch_size, shuffle=False, num_workers=0)

    model, head = SimpleCNN(), ArcFaceHead()
    optimizer = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=1e-3)

    records: list[dict[str, float | int]] = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        loss = torch.tensor(math.nan)
        for images, labels in train_loader:
            logits, _ = head(model(images), labels)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        t1 = time.perf_counter()
        train_acc_margin, _ = evaluate(model, head, train_eval_loader)
        test_acc_margin, test_acc = evaluate(model, head, test_loader)
        t2 = time.perf_counter()
        rec = {
            "epoch": epoch,
            "loss": loss.item(),
            "train_acc_margin": train_acc_margin,
            "test_acc_margin": test_acc_margin,
            "test_acc": test_acc,
            "train_s": t1 - t0,
            "eval_s": t2 - t1,
        }
        records.append(rec)
        print(
            f"epoch {epoch} | loss {rec['loss']:.4f} | train acc (seed's way) {train_acc_margin:.4f} | "
            f"test acc (seed's way) {test_acc_margin:.4f} | test acc (correct) {test_acc:.4f} | "
            f"train {rec['train_s']:.1f} s | eval {rec['eval_s']:.1f} s",
            flush=True,
        )

    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
