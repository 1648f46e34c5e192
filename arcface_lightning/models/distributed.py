"""The cross-rank pieces of Partial FC (partial_fc.py): which rows a rank owns, its initial rows made without the
whole matrix, and the autograd functions that gather, normalise and take the softmax cross-entropy across ranks.
Plain torch and torch.distributed."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from arcface_lightning.models.heads import NORM_EPS

ROW_BLOCK_ELEMENTS = 2**22  # values drawn at a time by CentreRows: all it holds besides the rows it makes


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of rank `rank`: C // W each, the first C mod W ranks one more."""
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class CentreRows:
    """The initial centres of a margin head built on the meta device, made row range by row range.

    CombinedMarginHead initialises its C × E matrix with xavier_uniform_: one draw of the global CPU generator per
    value, in row-major order, so any rows can be made again from the generator's state at their first value. At
    construction the draws are made once, a block at a time (nothing kept but the generator's state at each
    block's start), so the global generator ends where the full init leaves it and later draws (data order,
    dropout) stay the same; `rows(start, end)` draws rows [start, end) again from the nearest state."""

    def __init__(self, num_classes: int, embedding_size: int, dtype: torch.dtype) -> None:
        self.num_classes, self.embedding_size, self.dtype = num_classes, embedding_size, dtype
        self.block = max(1, ROW_BLOCK_ELEMENTS // embedding_size)  # rows
        # nn.init.xavier_uniform_'s bound (gain 1) for a (num_classes, embedding_size) matrix
        self.bound = math.sqrt(3.0) * math.sqrt(2.0 / float(embedding_size + num_classes))
        self.states: list[torch.Tensor] = []
        scratch = torch.empty(min(self.block, num_classes), embedding_size, dtype=dtype)
        for first in range(0, num_classes, self.block):
            self.states.append(torch.get_rng_state())
            scratch[: num_classes - first].uniform_(-self.bound, self.bound)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the initial matrix, holding at most one block besides them."""
        out = torch.empty(end - start, self.embedding_size, dtype=self.dtype)
        if not len(out):  # a rank with no rows: more ranks than classes
            return out
        generator = torch.Generator()
        generator.set_state(self.states[start // self.block])
        skipped = start % self.block
        skip = torch.empty(skipped, self.embedding_size, dtype=self.dtype)
        skip.uniform_(-self.bound, self.bound, generator=generator)
        return out.uniform_(-self.bound, self.bound, generator=generator)


class GatherWithGrad(torch.autograd.Function):
    """all_gather of equal-sized (B, ...) tensors along dim 0; backward: the gradient of this rank's rows summed
    over ranks (each rank's loss sees every row), times the world size (DDP averages the backbone's gradients)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.world, ctx.rows = rank, world, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter; the rows of other ranks are dropped below
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows] * ctx.world


class NormalizeRows(torch.autograd.Function):
    """heads.normalize of the (k × E) sampled centres, the same values, with the gradient (g − ŵ (ŵ·g)) / ‖w‖ made
    in one k × E buffer: autograd's chain through the quotient and the norm holds several at once, and at millions
    of classes those temporaries, not the logits, are most of a step's memory."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor) -> torch.Tensor:
        norm = weight.norm(dim=1, keepdim=True)
        live = norm > NORM_EPS
        unit = (weight / norm.clamp_min(NORM_EPS)).masked_fill_(~live, 0.0)
        ctx.save_for_backward(unit, norm, live)
        return unit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        unit, norm, live = ctx.saved_tensors
        along = torch.bmm(unit.unsqueeze(1), grad.unsqueeze(2)).view(-1, 1)  # ŵ·g per row, no k × E product
        return torch.addcmul(grad, unit, along, value=-1).div_(norm.clamp_min(NORM_EPS)).masked_fill_(~live, 0.0)


class DistributedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of (B, k) logits whose columns are spread over ranks. `target` is the column of
    each row's label on this rank, -1 where it lives elsewhere. Returns (loss, this rank's softmax columns)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distributed = rank_and_world()[1] > 1
        top = logits.max(1).values
        if distributed:
            dist.all_reduce(top, dist.ReduceOp.MAX)
        exp = (logits - top[:, None]).exp_()  # in place here and below: a (B, k) matrix less each time
        total = exp.sum(1)
        here = target >= 0
        index = target.clamp(min=0)[:, None]
        target_logit = torch.where(here, logits.gather(1, index).squeeze(1) - top, torch.zeros_like(top))
        if distributed:
            dist.all_reduce(total)
            dist.all_reduce(target_logit)  # each row's target lives on exactly one rank
        probs = exp.div_(total[:, None])
        ctx.save_for_backward(probs, index, here)
        ctx.mark_non_differentiable(probs)
        return (total.log() - target_logit).mean(), probs

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, index, here = ctx.saved_tensors
        grad = probs.scatter_add(1, index, -here.to(probs.dtype)[:, None])
        return grad.mul_(grad_loss / len(probs)), None
