"""Partial FC: a margin head's class centres sharded across DDP ranks, a sampled subset of negative centres per
step, and the softmax cross-entropy computed across ranks (An et al. 2021, arXiv 2010.05222; 2022, arXiv
2203.15565; insightface's arcface_torch). Plain torch and torch.distributed: no Lightning here.

Per step, on each of W ranks (W = 1 without DDP):
- rank r owns rows [start_r, end_r) of the C × E centre matrix (C need not divide by W: the first C mod W ranks hold
  one more row);
- embeddings and labels are all-gathered (embeddings with their gradient: `GatherWithGrad`), so every rank sees the
  global batch;
- sampling: the positive centres of the global batch on this rank plus random negatives, k = max(⌈rate · C_r⌉,
  min(global batch, C_r)) rows in all. k is fixed by the shapes alone: there are at most `global batch` distinct
  positives, so all of them fit, and no data-dependent size has to be read back to the host (no GPU sync);
- cosines against the k sampled centres, the margin ψ where the label's centre is on this rank;
- cross-entropy over all ranks (`DistributedCrossEntropy`): the max and the sum of exponentials all-reduced, so
  loss and gradients equal the unsharded softmax over the sampled centres (over all C at rate 1).

Gradient scale: the embeddings' gradient sums every rank's share and is multiplied by W, because DDP averages the
backbone's gradients over ranks; the backbone then gets the gradient of the global batch's mean loss, as with a
plain DDP head. The centres are excluded from DDP (each rank owns its rows).

Optimiser: the centres are not a parameter of the model's optimiser. Each step the sampled rows are copied into a
fresh leaf parameter (`sampled`), which the module puts into the optimiser's last param group together with those
rows of the centres' optimiser state (kept here, row-sharded, saved as `state_<name>` entries); after the step both are
written back (`write_back`). So rows not sampled this step — weights and optimiser state (momentum, Adam moments)
— are bit-unchanged, and the optimiser's cost scales with the rate. Scalar state (Adam's `step`) is shared by all
rows ("lazy" Adam, as torch's SparseAdam). Checkpoints hold the full C × E matrix and state (module.py has every
rank send its rows to rank zero, which writes the file), so a run saved on N ranks resumes on M, and evaluate/export
load it on one process.

Start-up: with centres that may be sharded, `build_with_partial_fc` builds the margin head on the meta device (no C × E
matrix) and `CentreRows` stands in for its init; `shard()` then makes only this rank's rows, equal to the rows the
full matrix would have had (one process makes them all). Only a checkpoint's rank zero ever holds the whole matrix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from arcface_lightning.core.checks import BadValue, check_choice, check_number
from arcface_lightning.models.distributed import (
    CentreRows,
    DistributedCrossEntropy,
    GatherWithGrad,
    NormalizeRows,
    rank_and_world,
    shard_bounds,
)
from arcface_lightning.models.heads import (
    ArcFaceHead,
    CombinedMarginHead,
    CosFaceHead,
    SphereFaceHead,
    check_labels,
    cosine_similarity,
    normalize,
    psi,
    warmed_margins,
)
from arcface_lightning.models.protocol import Head, HeadStep

AUTO_SHARD_CLASSES = 10_000  # sharded=auto shards from this many classes on, when there is more than one rank
# heads whose only parameter is the centre matrix, initialised by CombinedMarginHead's xavier_uniform_: CentreRows
# makes the same values row range by row range
DEFERRABLE_HEADS = (CombinedMarginHead, ArcFaceHead, CosFaceHead, SphereFaceHead)


def defers_centres(target: Any) -> bool:
    """Whether a head config's `_target_` names a head whose centres CentreRows can make (DEFERRABLE_HEADS)."""
    return target in {f"{kind.__module__}.{kind.__qualname__}" for kind in DEFERRABLE_HEADS}


def build_with_partial_fc(config: Mapping[str, Any], build: Callable[[dict[str, Any]], nn.Module]) -> nn.Module:
    """A head from its config (`build` instantiates a config without the two keys below). `sample_rate` < 1 or
    `sharded` (true, or auto with ≥ AUTO_SHARD_CLASSES classes) wrap a margin head in PartialFC; otherwise the
    head is the plain module, as before those keys existed.

    Centres that may be sharded are not made here: the margin head is built on the meta device and PartialFC makes
    each rank's rows at `shard()` (setup), with the values the full matrix would have had; the global generator
    advances as the full init would, so every later draw is the same."""
    config = dict(config)
    sample_rate, sharded = config.pop("sample_rate", 1.0), config.pop("sharded", False)
    deferred = (sharded is True or sharded == "auto") and defers_centres(config.get("_target_"))
    with torch.device("meta") if deferred else contextlib.nullcontext():
        head = build(config)
    large = sharded == "auto" and isinstance(head, CombinedMarginHead) and head.num_classes >= AUTO_SHARD_CLASSES
    if deferred and not (sharded is True or large):  # auto, and too few classes to shard: the head as it always was
        head = build(config)
    if sample_rate != 1.0 or sharded is True or large:
        return PartialFC(head, sample_rate=sample_rate, sharded=sharded)
    check_choice("PartialFC", "sharded", sharded, (True, False, "auto"))
    return head


@dataclass
class PartialFCStep(HeadStep):
    """A Partial FC step: HeadStep's loss and predictions (over the sampled centres; the predictions of this rank's
    rows of the global batch), this rank's softmax columns of the global batch, and the sampled local rows."""

    probs: torch.Tensor
    index: torch.Tensor


class PartialFC(Head):
    """A margin head (heads.CombinedMarginHead and its subclasses) with sharded, sampled class centres.

    Keeps the margin head's centres as `weight` (so a checkpoint's `head.weight` is the same tensor either way) and
    its s and ψ. `sharded`: true, false, or auto (shard when the world has more than one rank and C ≥
    AUTO_SHARD_CLASSES); decided in `shard()`, which the module calls once the process group exists.
    `sample_rate`: the fraction of centres (positives always included) each training step uses. A margin head
    built on the meta device (one of DEFERRABLE_HEADS) has its centres made at `shard()`: this rank's rows only."""

    def __init__(self, margin: nn.Module, sample_rate: float = 1.0, sharded: bool | str = "auto") -> None:
        super().__init__()
        if not isinstance(margin, CombinedMarginHead):
            raise BadValue(
                "PartialFC",
                "head",
                type(margin).__name__,
                "a margin head (ArcFace, CosFace, SphereFace, "
                "combined); sharded centres and sample_rate < 1 need normalised centres",
            )
        check_number("PartialFC", "sample_rate", sample_rate, "0 < sample_rate ≤ 1", lambda v: 0 < v <= 1)
        check_choice("PartialFC", "sharded", sharded, (True, False, "auto"))
        # the margin's constants only: a reference to the margin head (or its bound psi) would keep its full C × E
        # matrix alive on every rank after shard()
        self.s = margin.s
        self.margins = margin.margins
        self.margin_warmup_epochs, self.margin_scale = margin.margin_warmup_epochs, margin.margin_scale
        self.embedding_size, self.num_classes = margin.embedding_size, margin.num_classes
        self.sample_rate, self.sharded = float(sample_rate), sharded
        self.weight = margin.weight
        self._deferred: CentreRows | None = None
        if self.weight.is_meta:
            if type(margin) not in DEFERRABLE_HEADS:
                raise ValueError(f"PartialFC: a {type(margin).__name__} on the meta device has no known initial rows")
            self._deferred = CentreRows(self.num_classes, self.embedding_size, self.weight.dtype)
        self.rank, self.world, self.start, self.end = 0, 1, 0, self.num_classes
        self.sampled: nn.Parameter | None = None  # this step's rows of `weight`, a leaf the optimiser steps
        self._index: torch.Tensor | None = None
        # the centres' optimiser state, row-sharded like `weight` (scalars shared). Not buffers: DDP re-collects a
        # module's buffers at every forward and would broadcast rank zero's rows over every other rank's. Saved
        # and loaded as `state_<name>` entries of the state dict (_save_to_state_dict, _load_from_state_dict).
        self.optimizer_state: dict[str, torch.Tensor] = {}
        self.margin_repr = repr(margin)

    def psi(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The margin head's ψ (heads.psi with its constants, at the warm-up's `margin_scale`)."""
        return psi(cos_target, **warmed_margins(self.margins, self.margin_scale))

    def set_margin_scale(self, scale: float) -> None:
        """The warm-up's factor, as the margin head's (heads.MarginHead.set_margin_scale)."""
        check_number("PartialFC", "margin_scale", scale, "0 ≤ scale ≤ 1", lambda v: 0.0 <= v <= 1.0)
        self.margin_scale = float(scale)

    # -- the head protocol (protocol.py) ------------------------------------------------------------------------
    def step(self, embeddings: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PartialFCStep:
        """Training: a draw of negatives seeded by `seed` (the same on resume), the sampled rows kept for `attach`.
        Evaluation: every centre, nothing kept."""
        if not self.training:
            return self.evaluate(embeddings, labels)
        return self(embeddings, labels, torch.Generator(embeddings.device).manual_seed(seed % 2**63))

    def setup_distributed(self, accumulate_grad_batches: int = 1) -> None:
        """This rank's rows of the centres (`shard`). One backward per optimiser step: the sampled rows are a new
        leaf each step, so accumulated gradients would land on rows that are gone."""
        if accumulate_grad_batches != 1:
            raise ValueError("head.sample_rate / head.sharded: trainer.accumulate_grad_batches must be 1")
        self.shard()

    def rank_local_parameters(self) -> list[str]:
        """The centres: each rank owns its rows, and each step's sampled copy is what enters the graph."""
        return ["weight"]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The last group: the slot each step's sampled rows take (`attach`), empty until then."""
        return [{"params": [nn.Parameter(self.weight.new_zeros(0, self.embedding_size))]}]

    def whole_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """The centres and their optimiser state as full matrices on rank zero (which writes the file); the other
        ranks send their rows and keep them."""
        if self.world == 1:
            return
        for key in [k for k in state if k.startswith(prefix)]:
            if state[key].ndim and len(state[key]) == self.end - self.start:
                state[key] = self.full_on_rank_zero(state[key])

    # -- sharding and the centres' optimiser state ------------------------------------------------------------
    def shard(self) -> bool:
        """Keep only this rank's rows (call once, after the process group exists). Whether it sharded."""
        rank, world = rank_and_world()
        wanted = self.sharded is True or (self.sharded == "auto" and self.num_classes >= AUTO_SHARD_CLASSES)
        if world == 1 or not wanted or self.world > 1:
            self._make_rows()
            return self.world > 1
        self.rank, self.world = rank, world
        self.start, self.end = shard_bounds(self.num_classes, rank, world)
        if self._deferred is not None:
            self._make_rows()
        else:
            self.weight = nn.Parameter(self.weight.detach()[self.start : self.end].clone())
        for name, value in self.optimizer_state.items():
            if value.ndim and len(value) == self.num_classes:
                self.optimizer_state[name] = value[self.start : self.end].clone()
        return True

    def _make_rows(self, initial: bool = True) -> None:
        """Centres still on the meta device → this rank's rows [start, end): their initial values, or (initial=False)
        uninitialised, for a state dict to fill."""
        if self._deferred is None:
            return
        shape = (self.end - self.start, self.embedding_size)
        rows = self._deferred.rows(self.start, self.end) if initial else torch.empty(shape, dtype=self.weight.dtype)
        self.weight, self._deferred = nn.Parameter(rows), None

    def _apply(self, fn: Any, recurse: bool = True) -> PartialFC:
        self._make_rows()  # .to(), .cuda(), .double() used before shard(): a meta tensor cannot be copied
        return super()._apply(fn, recurse)

    def full_on_rank_zero(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a row-sharded tensor → on rank zero, the full (C, ...) tensor in host memory; other
        ranks send their rows and get their own tensor back. For checkpoints, which only rank zero writes: no rank
        but zero ever holds the whole matrix, and rank zero receives each rank's rows into place."""
        if self.world == 1:
            return tensor
        if self.rank != 0:
            dist.send(tensor.contiguous(), dst=0)
            return tensor
        full = torch.empty(self.num_classes, *tensor.shape[1:], dtype=tensor.dtype)
        full[: len(tensor)] = tensor
        on_host = tensor.device.type == "cpu"
        for rank in range(1, self.world):
            start, end = shard_bounds(self.num_classes, rank, self.world)
            rows = full[start:end] if on_host else tensor.new_empty(end - start, *tensor.shape[1:])
            dist.recv(rows, src=rank)
            if not on_host:
                full[start:end] = rows
        return full

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in self.optimizer_state.items():
            destination[f"{prefix}state_{name}"] = value

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Checkpoints hold full matrices: this rank's rows of the centres and of their optimiser state."""
        self._make_rows(initial=f"{prefix}weight" not in state_dict)
        rows = slice(self.start, self.end)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            value = state_dict[key]
            if value.ndim and len(value) == self.num_classes and self.world > 1:
                value = state_dict[key] = value[rows]
            if key[len(prefix) :].startswith("state_"):
                del state_dict[key]
                self.optimizer_state[key[len(prefix) + len("state_") :]] = value.clone().to(self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Put this step's sampled rows (and their optimiser state) into the optimiser's last param group."""
        group = optimizer.param_groups[-1]
        optimizer.state.pop(group["params"][0], None)
        group["params"][0] = self.sampled
        device = self.weight.device
        self.optimizer_state = {name: value.to(device) for name, value in self.optimizer_state.items()}
        every_row = self.sampled is self.weight  # then the state itself, stepped in place
        state = {
            name: value if every_row else value[self._index] if value.ndim else value.clone()
            for name, value in self.optimizer_state.items()
        }
        if state:
            optimizer.state[self.sampled] = state

    @torch.no_grad()
    def write_back(self, optimizer: torch.optim.Optimizer) -> None:
        """After the optimiser step: the sampled rows and their new optimiser state into the sharded tensors."""
        if self.sampled is None:
            return
        if self.sampled is not self.weight:
            self.weight[self._index] = self.sampled.detach()
        for name, value in optimizer.state.pop(self.sampled, {}).items():
            if not torch.is_tensor(value):
                continue
            if name not in self.optimizer_state and self.sampled is self.weight:  # made for all rows: keep it
                self.optimizer_state[name] = value
            if name not in self.optimizer_state:
                shape = (len(self.weight), *value.shape[1:]) if value.ndim else ()
                self.optimizer_state[name] = torch.zeros(shape, dtype=value.dtype, device=value.device)
            if value is self.optimizer_state[name]:
                continue
            if value.ndim:
                self.optimizer_state[name][self._index] = value
            else:
                self.optimizer_state[name].copy_(value)
        # the step's rows and their gradient go now: in the optimiser's group they would live through the next
        # forward, until the next attach
        group = optimizer.param_groups[-1]
        if group["params"][0] is self.sampled:
            group["params"][0] = nn.Parameter(self.weight.new_zeros(0, self.embedding_size))
        self.sampled.grad = None
        self.sampled, self._index = None, None

    # -- the loss and the predictions --------------------------------------------------------------------------
    def gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world == 1:
            return embeddings, labels
        parts = [torch.empty_like(labels) for _ in range(self.world)]
        dist.all_gather(parts, labels.contiguous())
        # fp32 under autocast: backward sums each rank's partial gradient of these rows across ranks, and a bf16 or
        # fp16 sum would round once per rank where the unsharded head rounds once (the rows are few: B × E)
        return GatherWithGrad.apply(embeddings.float()), torch.cat(parts)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sorted local row indices: every positive of `labels` (global) on this rank, plus random negatives."""
        rows = self.end - self.start
        k = min(rows, max(math.ceil(self.sample_rate * rows), len(labels)))
        if k == rows:
            return torch.arange(rows, device=labels.device)
        score = torch.rand(rows, generator=generator, device=labels.device)
        local = labels - self.start
        mine = (local >= 0) & (local < rows)
        # positives score 2 (random scores are < 1); other rows' labels add 0, which max() ignores
        score.scatter_reduce_(0, local.clamp(0, rows - 1), mine.to(score.dtype) * 2, reduce="amax")
        return score.topk(k).indices.sort().values

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> PartialFCStep:
        """Training: the loss and predictions over the sampled centres. Sets `sampled`."""
        check_labels(labels, self.num_classes)
        self._make_rows()
        x, y = self.gather(embeddings, labels)
        self._index = self.sample(y, generator)
        every_row = len(self._index) == len(self.weight)  # rate 1 (or few rows): the centres themselves, no copy
        self.weight.grad = None  # one backward per optimiser step (the module refuses gradient accumulation)
        self.sampled = self.weight if every_row else nn.Parameter(self.weight.detach()[self._index])
        return self._loss(x, y, self.sampled, self._index, embeddings.shape[0])

    @torch.no_grad()
    def evaluate(self, embeddings: torch.Tensor, labels: torch.Tensor) -> PartialFCStep:
        """Validation and test: the same over every centre (no sampling), nothing kept for the optimiser."""
        self._make_rows()
        x, y = self.gather(embeddings, labels)
        index = torch.arange(self.end - self.start, device=x.device)
        return self._loss(x, y, self.weight, index, embeddings.shape[0])

    def _loss(
        self, x: torch.Tensor, y: torch.Tensor, centres: torch.Tensor, index: torch.Tensor, rows: int
    ) -> PartialFCStep:
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32, as heads.cosine_similarity
            cos = normalize(x.float()) @ NormalizeRows.apply(centres.float()).t()
        column = torch.full((self.end - self.start,), -1, dtype=torch.long, device=x.device)
        column[index] = torch.arange(len(index), device=x.device)
        local = y - self.start
        mine = (local >= 0) & (local < self.end - self.start)
        target = torch.where(mine, column[local.clamp(0, self.end - self.start - 1)], -1)
        at = target.clamp(min=0)[:, None]
        cos_target = cos.gather(1, at)
        margin = torch.where((target >= 0)[:, None], self.psi(cos_target), cos_target)
        # (B, k) matrices one at a time where autograd allows: neither scatter_ nor the scaling saves its input
        margin_logits = (self.s * cos).scatter_(1, at, self.s * margin)
        loss, probs = DistributedCrossEntropy.apply(margin_logits, target)
        own = slice(self.rank * rows, (self.rank + 1) * rows) if self.world > 1 else slice(None)
        margin_preds = self._argmax(margin_logits.detach(), index)[own]
        del margin_logits
        preds = self._argmax(self.s * cos.detach(), index)[own]
        return PartialFCStep(loss, preds, margin_preds, probs, index)

    def _argmax(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The global class id of each row's largest logit over all ranks' columns (ties: the lowest id)."""
        best, column = logits.max(1)
        ids = index[column] + self.start
        if self.world > 1:
            top = best.clone()
            dist.all_reduce(top, dist.ReduceOp.MAX)
            ids = torch.where(best == top, ids, torch.full_like(ids, self.num_classes))
            dist.all_reduce(ids, dist.ReduceOp.MIN)
        return ids

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Inference logits s·cos θ over this rank's centres (all of them on one process)."""
        return self.s * self.cosine(embeddings)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        self._make_rows()
        return cosine_similarity(embeddings, self.weight)

    def extra_repr(self) -> str:
        rows = f"rows [{self.start}, {self.end}) of {self.num_classes}" if self.world > 1 else "not sharded"
        return f"{self.margin_repr}, sample_rate={self.sample_rate}, sharded={self.sharded} ({rows})"
