"""What the tests' gloo ranks share: forked from the test's process, a port, joining the group and leaving it."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch


def start_ranks(rank_fn: Callable[..., None], args: tuple, nprocs: int) -> None:
    """`rank_fn(rank, *args)` in `nprocs` processes; returns when all have passed, raises what one raised. Forked,
    not spawned: a forked rank starts with the imports already done (a spawned one pays the interpreter's start and
    torch's import again, most of such a test's time). Safe here: the worker runs torch on one thread (conftest)
    and no rank touches a GPU."""
    torch.multiprocessing.start_processes(rank_fn, args=args, nprocs=nprocs, start_method="fork")


def free_port() -> int:
    """A TCP port nothing listens on now, for a gloo process group (fixed ports collide between xdist workers)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def join(port: int, rank: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def leave() -> None:
    """End a rank whose checks have passed. gloo's worker threads can still be releasing a finished collective's
    tensors when the interpreter finalises, and that aborts the process now and then ("terminate called without an
    active exception", pytorch/pytorch#179291: a torch race, not the code under test), so after destroying the
    group the rank exits without finalising."""
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
