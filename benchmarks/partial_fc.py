"""Partial FC (arcface_lightning/models/partial_fc.py) against the plain full head: the FC layer alone, no backbone.

Embeddings are random float32 (E = 512, requiring grad), labels random over C classes, 128 rows per process; the
margin is ArcFaceHead(s=64, m=0.5); the centres step with SGD(lr=0.1, momentum=0.9, weight_decay=5e-4). Per C:
  (a) 1 process, the full head: ArcFaceHead + F.cross_entropy, SGD over head.parameters() (momentum included);
  (b) 1 process, PartialFC(sample_rate=0.1);
  (c) 2 gloo processes (spawn), PartialFC(sharded=True, sample_rate=1.0), global batch 256;
  (d) the same at sample_rate=0.1.
The head is built as the project builds it (module.build_head, from the config `head.sample_rate=<rate>
head.sharded=<procs > 1>`, the same seed on every rank): sharded, each rank makes only its rows of the centres at
shard(). PartialFC is driven as module.py and tests/test_partial_fc.py drive it: shard() once the group exists, an
SGD whose last group holds a placeholder, attach() before backward, write_back() after the step. Each configuration
runs in fresh processes (torch.multiprocessing.spawn), so each peak RSS (VmHWM) is its own: reported as growth over
the RSS right after the imports (and the process group) at start-up (the head built and sharded) and over the
whole run, and as the whole run's absolute peak. Threads: 2 for one process, 1 each for two (2 cores). Step =
forward + backward + optimiser step + write_back; median over the timed steps after the warm-up; for (c)/(d) a
step is the global batch of 256, so images/s compares across rows. Logits memory is computed, not measured: one
(global batch × sampled centres) float32 matrix (the step holds several such at once). --save adds what
module.on_save_checkpoint does after the steps: the centres and their momentum sent to rank zero, whole.

Then the largest C: --large-configs (default (a) and (d)) at --large C values. A configuration whose computed
working set exceeds the guard (20 GiB over all its processes, less if less memory is available) is not started; a
started one runs under RLIMIT_AS (address space: the guard's share over what the process mapped before the model;
with --save the whole guard, rank zero holding more), so it fails with an allocation error instead of waking the OOM
killer, and with the highest oom_score_adj, so that on a shared machine the OOM killer ends it first.

    python benchmarks/partial_fc.py                                  # C = 10k, 100k, 1M; then 2M, 4M, 8M
    python benchmarks/partial_fc.py --classes 10000 --large          # quick: no largest-C search
    python benchmarks/partial_fc.py --classes --large 3000000 4000000 --large-configs d --guard-gib 22
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import socket
import time
import traceback
from statistics import median

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import machine

from arcface_lightning.models.distributed import ROW_BLOCK_ELEMENTS
from arcface_lightning.training.module import build_head

E, B, GIB = 512, 128, 2**30
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
CONFIGS = {"a": ("full", 1.0, 1), "b": ("pfc", 0.1, 1), "c": ("pfc", 1.0, 2), "d": ("pfc", 0.1, 2)}


def sampled(classes: int, rate: float, world: int) -> int:
    """Centres a rank steps on (partial_fc.PartialFC.sample): k = max(⌈rate · C_r⌉, global batch), at most C_r."""
    rows = -(-classes // world)
    return min(rows, max(math.ceil(rate * rows), B * world))


def working_set(kind: str, classes: int, rate: float, world: int, save: bool = False) -> int:
    """Bytes per process from the shapes: what the step holds at its peak, counted tensor by tensor.
    Full head: weight, momentum, weight.grad, normalize()'s quotient and output and the backward's two C×E
    temporaries (6 C×E), plus 4 (B × C) logits-sized matrices. PartialFC: at start, one process builds the full
    C×E matrix; sharded, a rank makes only its rows (and one block of draws). Then the rows and their momentum, and
    the step's peak: in the forward the sampled rows' copy, the normalised rows and 3 (global batch × k) matrices;
    in the backward and the optimiser step 4 k×E (the copy, its momentum, its gradient and one temporary; 2 when
    every row is sampled: no copies). Saving (--save): rank zero also holds the whole matrix and its momentum."""
    row, k = 4 * E, sampled(classes, rate, world)
    if kind == "full":
        return 6 * classes * row + 4 * B * classes * 4
    rows = -(-classes // world)
    start = rows * row + ROW_BLOCK_ELEMENTS * 4 if world > 1 else classes * row
    step = max((2 if k == rows else 4) * k * row, 2 * k * row + 3 * B * world * k * 4)
    steady = 2 * rows * row + step
    return max(start, steady, 2 * rows * row + 2 * classes * row if save and world > 1 else 0)


def rss() -> int:
    """This process's peak resident set so far (VmHWM; the same as getrusage's ru_maxrss), in bytes."""
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def mapped() -> int:
    return int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def one_rank(rank: int, kind: str, classes: int, rate: float, world: int, steps: int, warmup: int, share: int,
             port: int, save: bool, queue) -> None:  # fmt: skip
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    with open("/proc/self/oom_score_adj", "w") as adj:  # on a shared machine, the kernel ends this run first
        adj.write("1000")
    base = rss()
    resource.setrlimit(resource.RLIMIT_AS, (mapped() + share, resource.RLIM_INFINITY))
    try:
        torch.manual_seed(0)  # the same centres on every rank (each makes its rows of them)
        config = dict(
            _target_="arcface_lightning.models.heads.ArcFaceHead", embedding_size=E, num_classes=classes, s=64.0
        )
        config.update(m=0.5, **(dict(sample_rate=rate, sharded=world > 1) if kind == "pfc" else {}))
        head = build_head(config)
        if kind == "full":
            optimizer = torch.optim.SGD(head.parameters(), **SGD)
        else:
            head.shard()
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(0, E))], **SGD)  # the centres' group
        start_rss = rss() - base
        torch.manual_seed(rank)
        batches = [(torch.randn(B, E), torch.randint(0, classes, (B,))) for _ in range(3)]
        times = []
        for step in range(warmup + steps):
            x, y = batches[step % len(batches)]
            x = x.clone().requires_grad_()
            start = time.perf_counter()
            optimizer.zero_grad()
            if kind == "full":
                F.cross_entropy(head(x, y), y).backward()
                optimizer.step()
            else:
                loss = head(x, y).loss
                head.attach(optimizer)
                loss.backward()
                optimizer.step()
                head.write_back(optimizer)
            times.append(time.perf_counter() - start)
        if kind == "full":
            state = [head.weight, *optimizer.state[head.weight].values()]
        else:
            state = [head.weight, *head.optimizer_state.values()]
        result = dict(
            state=sum(t.nbytes for t in state), start=start_rss, rss=rss() - base, step=median(times[warmup:])
        )
        if save and kind == "pfc":  # as module.on_save_checkpoint: rank zero holds both whole matrices at once
            whole = [head.full_on_rank_zero(t.detach()) for t in state]
            result["save"] = rss() - base
            del whole
        result["peak"] = rss()
    except Exception as error:  # the guard's allocation failure, reported instead of raised
        result = dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
        traceback.print_exc()
    queue.put((rank, result))
    if world > 1:
        torch.distributed.destroy_process_group()


def measure(kind: str, classes: int, rate: float, world: int, steps: int, warmup: int, guard: int,
            save: bool = False) -> dict:  # fmt: skip
    need = working_set(kind, classes, rate, world, save)
    total = need + (world - 1) * working_set(kind, classes, rate, world)  # saving: rank zero holds more
    if total > guard:
        return dict(error=f"does not fit: needs {total / GIB:.1f} GiB over {world} process(es)", need=need)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    share = guard if save else guard // world  # saving: rank zero may take what the others leave
    args = (kind, classes, rate, world, steps, warmup, share, port, save, queue)
    try:
        mp.spawn(one_rank, args=args, nprocs=world)
    except mp.ProcessExitedException as error:  # killed: nothing to read from the queue
        return dict(error=f"killed ({error})", need=need)
    ranks = dict(queue.get() for _ in range(world))
    errors = [r["error"] for r in ranks.values() if "error" in r]
    if errors:
        return dict(error=errors[0], need=need)
    worst = {key: max(r[key] for r in ranks.values()) for key in ("state", "start", "rss", "peak", "step")}
    if save and "save" in ranks[0]:
        worst["save"] = max(r["save"] for r in ranks.values())
    return {**worst, "need": need}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def row(label: str, classes: int, rate: float, world: int, r: dict, ref: dict | None) -> str:
    logits = B * world * sampled(classes, rate, world) * 4
    if "error" in r:
        return f"| {label} | {classes:,} | {rate} | {world} | {gib(r['need'])} | — | {gib(logits)} | {r['error']} |"
    speed = B * world / r["step"]
    versus = f"{speed / (B / ref['step']):.2f}× img/s, {r['rss'] / ref['rss']:.2f}× RSS" if ref else "—"
    saved = f" | {gib(r['save'])}" if "save" in r else ""
    return (
        f"| {label} | {classes:,} | {rate} | {world} | {gib(r['need'])} | {gib(r['state'])} | {gib(logits)} "
        f"| {gib(r['start'])} | {gib(r['rss'])} | {gib(r['peak'])} | {r['step'] * 1e3:.0f} ms | {speed:.0f} "
        f"| {versus}{saved} |"
    )


HEADER = (
    "| config | C | rate | procs | working set / proc (computed) | centres + momentum / proc "
    "| logits / proc (computed) | start-up peak RSS growth / proc | peak RSS growth / proc | peak RSS / proc "
    "| step (median) | images/s | vs (a), same C |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--large", type=int, nargs="*", default=[2_000_000, 4_000_000, 8_000_000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--large-steps", type=int, default=2, help="timed steps (after 1 warm-up) at --large C")
    parser.add_argument("--slow-steps", type=int, default=3, help="timed steps of (a) from C = 1M on")
    parser.add_argument("--large-configs", nargs="*", default=["a", "d"], choices=sorted(CONFIGS))
    parser.add_argument("--save", action="store_true", help="at --large C: then gather as a checkpoint save does")
    parser.add_argument("--guard-gib", type=float, default=20.0)
    args = parser.parse_args()
    available = int(next(x for x in open("/proc/meminfo") if x.startswith("MemAvailable")).split()[1]) * 1024
    guard = int(min(args.guard_gib * GIB, available - GIB))
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}; guard {gib(guard)} over all processes "
          f"(MemAvailable {gib(available)})\n\n{HEADER if args.classes else ''}", flush=True)  # fmt: skip
    for classes in args.classes:
        ref = None
        for label, (kind, rate, world) in CONFIGS.items():
            steps = args.slow_steps if kind == "full" and classes >= 1_000_000 else args.steps
            r = measure(kind, classes, rate, world, steps, args.warmup, guard)
            print(row(f"({label}) {steps} steps", classes, rate, world, r, ref), flush=True)
            ref = ref or (r if "error" not in r else None)
    if args.large:
        header = HEADER.replace(" |\n", " | peak RSS growth / proc, saving |\n", 1) + "---:|" if args.save else HEADER
        configs = ", ".join(f"({label})" for label in args.large_configs)
        print(f"\nlargest C: {configs}, 1 warm-up + {args.large_steps} timed steps each\n\n{header}", flush=True)
        for label in args.large_configs:
            kind, rate, world = CONFIGS[label]
            for classes in args.large:
                r = measure(kind, classes, rate, world, args.large_steps, 1, guard, args.save)
                print(row(f"({label})", classes, rate, world, r, None), flush=True)


if __name__ == "__main__":
    main()
