"""What a head with many identities will take per process, said before it is built: the bytes of its weights, their
gradients and the optimiser's state (activations, and the (batch × classes) logits, come on top), and refused in
one line when that alone exceeds the memory the process can have.

- The head's own values are counted on the meta device (its parameters built without memory), so every head counts
  right (sub-centres, a softmax bias) without a table of shapes.
- The optimiser's state per value is measured, not looked up: the configured optimiser takes one step on a stand-in
  parameter and its state tensors of the parameter's size are counted (SGD 0, SGD with momentum 1, Adam/AdamW 2).
- Partial FC (partial_fc.py): a rank keeps its rows of the centres and their optimiser state; each step the k sampled
  rows are copied out, with their gradient and state. With every row sampled the centres themselves train.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30


def optimizer_state_per_value(make_optimizer: Callable[..., torch.optim.Optimizer]) -> int:
    """How many values of state the optimiser keeps per parameter value, measured on one step of a stand-in."""
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer(params=[parameter])
    parameter.grad = torch.ones(3)
    optimizer.step()
    state = optimizer.state.get(parameter, {})
    return sum(1 for value in state.values() if torch.is_tensor(value) and value.shape == parameter.shape)


@dataclass
class HeadMemory:
    """Bytes per process."""

    weights: int
    gradients: int
    optimizer_state: int
    rows: str  # which centres this process holds, in words

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state

    def describe(self) -> str:
        parts = f"weights {self.weights / GIB:.2f}, gradients {self.gradients / GIB:.2f}, optimiser state " \
                f"{self.optimizer_state / GIB:.2f}"  # fmt: skip
        return f"{self.total / GIB:.2f} GiB per process ({parts} GiB; {self.rows})"


def head_memory(
    values: int,
    num_classes: int,
    embedding_size: int,
    state_per_value: int,
    sample_rate: float = 1.0,
    sharded: bool = False,
    world: int = 1,
    global_batch: int = 1,
    bytes_per_value: int = 4,
) -> HeadMemory:
    """`values`: the head's parameter count (all ranks' rows). Partial FC when sample_rate < 1 or `sharded` (the
    caller resolves sharded=auto)."""
    if sample_rate >= 1.0 and not sharded:
        full = values * bytes_per_value
        return HeadMemory(full, full, full * state_per_value, f"all {num_classes:,} classes × {embedding_size}")
    rows = math.ceil(num_classes / world) if sharded and world > 1 else num_classes
    k = min(rows, max(math.ceil(sample_rate * rows), global_batch))
    kept = rows * embedding_size * bytes_per_value
    step = k * embedding_size * bytes_per_value
    copied = 0 if k == rows else step  # every row sampled: the centres themselves are stepped, no copy
    what = f"Partial FC: {rows:,} of {num_classes:,} classes here, {k:,} sampled per step"
    return HeadMemory(kept + copied, step, kept * state_per_value + copied * state_per_value, what)


def available_bytes(device: torch.device, processes_on_host: int = 1) -> int:
    """The memory one process can have: an accelerator's total memory, or the host's (its cgroup limit if lower)
    shared by the processes of this host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        text = limit.read_text().strip() if limit.is_file() else ""
        if text.isdigit():  # v2 says "max" when unlimited; v1 a huge number
            total = min(total, int(text))
    return total // max(1, processes_on_host)
