"""The head protocol: what the LightningModule (training/module.py) asks of every head, and nothing else.

A head maps embeddings and labels to a loss and two predictions (`step`), and embeddings alone to logits
(`logits`). Heads that keep state outside the autograd graph answer the optional hooks, which do nothing here:

- `setup_distributed(accumulate_grad_batches)`: once the process group exists (Partial FC keeps this rank's rows);
- `attach(optimizer)` / `write_back(optimizer)`: after the training forward / after the optimiser step (Partial FC
  puts each step's sampled rows into the optimiser and writes them back);
- `end_of_epoch(epoch)`: at the end of every training epoch (sub-centre ArcFace drops far sub-centres);
- `rank_local_parameters()`: parameters each rank holds its own part of, out of DDP's averaging and of the model's
  optimiser group (Partial FC's centres);
- `optimizer_groups()`: parameter groups after the model's (Partial FC: the slot its sampled rows take);
- `whole_state(state, prefix)`: every rank, on saving a checkpoint (Partial FC sends its rows to rank zero);
- `set_margin_scale(scale)`: the margin warm-up's factor, before each step (the margin heads; `margin_warmup_epochs`
  > 0 asks for it, and `warmup_factor` is its schedule).

So the module never asks which head it holds, and a new head is one class. Plain torch: no Lightning, no Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadStep:
    """One batch through a head: the loss, the prediction (argmax of the margin-free logits: what accuracy
    measures) and the prediction with the margin on the true class (what the seed script reported)."""

    loss: torch.Tensor
    preds: torch.Tensor
    margin_preds: torch.Tensor


class Head(nn.Module):
    """The interface every head answers. Subclasses give `num_classes`, `logits(embeddings)` and either
    `training_logits(embeddings, labels)` (a (margin, margin-free) pair of (batch, classes) logits: `step` then
    takes the softmax cross-entropy of the first) or their own `step`."""

    num_classes: int
    margin_warmup_epochs: int = 0  # epochs over which the module ramps the margin in (set_margin_scale); 0: none

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(self, embeddings: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> HeadStep:
        """The loss and predictions of one batch, in training or evaluation (`self.training`). `seed`: for heads
        that draw at random per step (the module derives it from the run's seed, the step and the rank)."""
        margin_logits, logits = self.training_logits(embeddings, labels)
        loss = F.cross_entropy(margin_logits, labels)
        return HeadStep(loss, logits.detach().argmax(1), margin_logits.detach().argmax(1))

    def setup_distributed(self, accumulate_grad_batches: int = 1) -> None:
        """Once the process group exists, before the first step."""

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """After a training step's forward, before the optimiser steps (and before a gradient scaler unscales)."""

    def write_back(self, optimizer: torch.optim.Optimizer) -> None:
        """After the optimiser stepped."""

    def end_of_epoch(self, epoch: int) -> None:
        """At the end of training epoch `epoch` (0-based)."""

    def rank_local_parameters(self) -> list[str]:
        """Names (relative to the head) of parameters each rank holds its own part of: DDP must not average them,
        and the model's optimiser group leaves them out (the head steps them through `optimizer_groups`)."""
        return []

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups the optimiser gets after the model's own group."""
        return []

    def whole_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Every rank, on saving a checkpoint: make this head's per-rank entries of `state` (keys under `prefix`)
        whole, in place, so the file is the same whatever the world size."""

    def set_margin_scale(self, scale: float) -> None:
        """The factor in [0, 1] every margin of the head is multiplied by from now on (0: no margin, 1: the
        configured one). The module sets it before each step while `margin_warmup_epochs` > 0."""


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The margin warm-up's schedule: linear in optimizer steps, 0 at step 0 and 1 from `warmup_steps` on (1 when
    there is no warm-up). A pure function of the step, so a resumed run continues the ramp where it stopped."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return step / warmup_steps
