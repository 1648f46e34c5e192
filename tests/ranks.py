"""What the tests' gloo ranks (torch.multiprocessing.spawn) share; no Lightning import, so ranks start fast."""

from __future__ import annotations

import os
import socket
import sys

import torch


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
