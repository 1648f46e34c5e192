"""Partial FC (partial_fc.py) against the single-process full head, on CPU processes over gloo.

The oracle is heads.ArcFaceHead + F.cross_entropy on the whole global batch in one process. Cosines are float32 by
design (heads.cosine_similarity), so both sides differ only by float32 summation order (the softmax's sums are
split over ranks): the tolerance is 1e-5 absolute on the loss and the weights after three SGD steps, 1e-6 on
softmax values and gradients (whose entries are of order 1/batch). Each rank holds a slice of the centres (11
classes: uneven over 2 and 3 ranks) and a quarter/third of the batch. Then a backbone in DDP with the sharded head
trains ten SGD steps and ends at the single-process run's weights. Through Lightning: a 2-rank run's checkpoint
holds the whole matrix, its first step equals the plain head's (weights and momentum, to 1e-5 of each tensor's
scale), it evaluates on one process to the same test numbers, and resumes on 1 and 3 ranks.

Start-up: a head that may be sharded is built on the meta device and each rank makes only its rows of the centres,
equal (bit for bit) to the rows of the head built in full from the same seed; no op ever makes a tensor of the full
matrix's size (TorchDispatchMode sees every tensor an op returns), and the global generator ends where the full
init leaves it.
"""

from __future__ import annotations

import copy
import json
import shutil
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from forked import Forked, fork_command
from ranks import free_port, join, leave, start_ranks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from arcface_lightning.models import distributed
from arcface_lightning.models.heads import ArcFaceHead, CosFaceHead
from arcface_lightning.models.partial_fc import CentreRows, PartialFC, shard_bounds

C, E, B = 11, 6, 4  # classes, embedding size, rows per rank
TOL = dict(rtol=0, atol=1e-6)
LOSS_TOL = dict(rtol=0, atol=1e-5)


def problem(world: int) -> tuple[ArcFaceHead, torch.Tensor, torch.Tensor]:
    """The same head, global batch and labels in every process."""
    torch.manual_seed(0)
    head = ArcFaceHead(E, C, s=8.0, m=0.4)
    x = torch.randn(world * B, E)
    y = torch.randint(0, C, (world * B,))
    return head, x, y


def oracle(head: ArcFaceHead, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> dict:
    """Single process, full head: loss, softmax, gradients (of embeddings and centres), then weights after SGD."""
    head = copy.deepcopy(head)
    x = x.clone().requires_grad_()
    margin_logits, logits = head.training_logits(x, y)
    loss = F.cross_entropy(margin_logits, y)
    loss.backward()
    out = {"loss": loss.detach(), "probs": margin_logits.softmax(1).detach(), "x_grad": x.grad.clone()}
    out.update(w_grad=head.weight.grad.clone(), preds=logits.argmax(1))
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    head.zero_grad()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(x.detach(), y), y).backward()
        optimizer.step()
    out["weight"] = head.weight.detach().clone()
    return out


class LargestTensor(TorchDispatchMode):
    """The most values of any floating-point storage an op returns off the meta device (meta tensors hold none)."""

    def __init__(self) -> None:
        super().__init__()
        self.values = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.is_meta:
                self.values = max(self.values, tensor.untyped_storage().nbytes() // tensor.element_size())
        return out


def sharded_start_up(rank: int, world: int) -> None:
    """A rank builds the head on the meta device and makes its rows at shard(): exactly the full head's rows, never
    a tensor of C × E values, the generator where the full init leaves it; rank zero gathers the whole matrix."""
    distributed.ROW_BLOCK_ELEMENTS = 2 * E  # blocks of 2 rows: smaller than every rank's share
    torch.manual_seed(5)
    full = ArcFaceHead(E, C)
    after_full = torch.get_rng_state()
    torch.manual_seed(5)
    with LargestTensor() as largest:
        with torch.device("meta"):
            head = ArcFaceHead(E, C)
        pfc = PartialFC(head, sharded=True)
        after_meta = torch.get_rng_state()
        assert pfc.weight.is_meta and pfc.shard()
    start, end = shard_bounds(C, rank, world)
    assert pfc.weight.shape == (end - start, E) and not pfc.weight.is_meta
    assert torch.equal(pfc.weight.detach(), full.weight.detach()[start:end])
    assert largest.values == max(end - start, 2) * E < C * E, largest.values
    assert torch.equal(after_meta, after_full)
    whole = pfc.full_on_rank_zero(pfc.weight.detach())
    assert torch.equal(whole, full.weight.detach()) if rank == 0 else whole is not None and len(whole) == end - start


def with_placeholder(pfc: PartialFC, lr: float) -> torch.optim.Optimizer:
    """The optimiser as module.configure_optimizers sets it up: the centres' group holds each step's rows."""
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(0, E))], lr=lr, momentum=0.9)


def one_rank(rank: int, world: int, port: int) -> None:
    join(port, rank, world)
    head, x, y = problem(world)
    expected = oracle(head, x, y, lr=0.5, steps=3)
    pfc = PartialFC(copy.deepcopy(head), sample_rate=1.0, sharded=True)
    assert pfc.shard() and (pfc.start, pfc.end) == shard_bounds(C, rank, world)
    rows = slice(rank * B, (rank + 1) * B)
    local_x = x[rows].clone().requires_grad_()
    out = pfc(local_x, y[rows])
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), expected["loss"], **LOSS_TOL)
    torch.testing.assert_close(out.probs, expected["probs"][:, pfc.start : pfc.end], **TOL)
    # the embeddings' gradient carries the world size (DDP averages the backbone's): see partial_fc.py
    torch.testing.assert_close(local_x.grad / world, expected["x_grad"][rows], **TOL)
    torch.testing.assert_close(pfc.sampled.grad, expected["w_grad"][pfc.start : pfc.end], **TOL)
    assert torch.equal(out.preds, expected["preds"][rows])
    assert pfc.gather(x[rows].bfloat16(), y[rows])[0].dtype == torch.float32  # summed in fp32 in backward
    # three SGD steps with momentum through attach / write_back: the gathered centres equal the oracle's
    pfc.sampled = None
    optimizer = with_placeholder(pfc, lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        pfc(x[rows], y[rows]).loss.backward()
        pfc.attach(optimizer)
        optimizer.step()
        pfc.write_back(optimizer)
    whole = pfc.full_on_rank_zero(pfc.weight.detach())
    if rank == 0:
        torch.testing.assert_close(whole, expected["weight"], **LOSS_TOL)
    train_with_a_backbone(rank, world)
    sharded_start_up(rank, world)
    leave()


class Whole(torch.nn.Module):
    """A backbone and a Partial FC head in one DDP-wrapped module, as ArcFaceModule is under Lightning."""

    def __init__(self, backbone: torch.nn.Module, head: PartialFC) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self._ddp_params_and_buffers_to_ignore = ["head.weight"]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x), y).loss


def train_with_a_backbone(rank: int, world: int, steps: int = 10) -> None:
    """Ten steps of SGD (momentum, Nesterov, weight decay) of a DDP backbone with the sharded head against one
    process training the same backbone and full head on the whole global batch: the same weights (1e-5)."""
    torch.manual_seed(1)
    backbone = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, E))
    head = ArcFaceHead(E, C, s=30.0, m=0.5)
    batches = [(torch.randn(world * B, 20), torch.randint(0, C, (world * B,))) for _ in range(steps)]
    settings = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ref_backbone, ref_head = copy.deepcopy(backbone), copy.deepcopy(head)
    ref = torch.optim.SGD([*ref_backbone.parameters(), *ref_head.parameters()], **settings)
    for x, y in batches:
        ref.zero_grad()
        F.cross_entropy(ref_head(ref_backbone(x), y), y).backward()
        ref.step()
    pfc = PartialFC(head, sharded=True)
    pfc.shard()
    model = torch.nn.parallel.DistributedDataParallel(Whole(backbone, pfc))
    placeholder = torch.nn.Parameter(torch.zeros(0, E))
    optimizer = torch.optim.SGD([{"params": list(backbone.parameters())}, {"params": [placeholder]}], **settings)
    rows = slice(rank * B, (rank + 1) * B)
    for x, y in batches:
        optimizer.zero_grad()
        loss = model(x[rows], y[rows])
        pfc.attach(optimizer)
        loss.backward()
        optimizer.step()
        pfc.write_back(optimizer)
    for mine, theirs in zip(backbone.parameters(), ref_backbone.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), **LOSS_TOL)
    whole = pfc.full_on_rank_zero(pfc.weight.detach())
    if rank == 0:
        torch.testing.assert_close(whole, ref_head.weight.detach(), **LOSS_TOL)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_head_equals_the_single_process_head(world: int) -> None:
    port = free_port()
    start_ranks(one_rank, (world, port), world)


HEAD = {"_target_": "arcface_lightning.models.heads.CosFaceHead", "embedding_size": E, "num_classes": C, "s": 8.0}


@pytest.mark.parametrize(
    "keys, deferred",
    [({"sharded": True}, True), ({"sharded": True, "sample_rate": 0.5}, True), ({"sharded": False}, False),
     ({"sharded": False, "sample_rate": 0.5}, False), ({"sharded": "auto"}, False), ({}, False)],
)  # fmt: skip
def test_centres_that_may_be_sharded_are_made_at_shard_with_the_full_heads_values(monkeypatch, keys, deferred) -> None:
    """build_head as a training builds it: with sharded=true no C × E tensor exists before shard(), the generator
    draws what the full init draws, and one process's shard() makes the full head's matrix bit for bit. Every other
    head (sharded=false, auto below AUTO_SHARD_CLASSES) is built in full, as before."""
    from arcface_lightning.training.module import build_head

    monkeypatch.setattr(distributed, "ROW_BLOCK_ELEMENTS", 3 * E)
    torch.manual_seed(7)
    full = CosFaceHead(E, C, s=8.0).weight.detach()
    after_full = torch.rand(3)
    torch.manual_seed(7)
    with LargestTensor() as largest:
        head = build_head({**HEAD, **keys})
    assert torch.equal(torch.rand(3), after_full)
    assert head.weight.is_meta == deferred and largest.values == (3 * E if deferred else C * E)
    assert not deferred or head.shard() is False  # one process: every row, made now
    assert torch.equal(head.weight.detach(), full)
    if deferred:  # the other ways a deferred head gets its centres: a state dict, or a move before shard()
        torch.manual_seed(7)
        loaded = build_head({**HEAD, **keys})
        loaded.load_state_dict({"weight": full + 1})
        assert torch.equal(loaded.weight.detach(), full + 1)
        torch.manual_seed(7)
        assert torch.equal(build_head({**HEAD, **keys}).double().weight.detach(), full.double())


def test_centre_rows_are_the_full_inits_rows_for_every_range(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "ROW_BLOCK_ELEMENTS", 4 * E)  # blocks of 4 rows: ranges across block edges
    torch.manual_seed(3)
    full = ArcFaceHead(E, C).weight.detach()
    torch.manual_seed(3)
    rows = CentreRows(C, E, torch.float32)
    assert len(rows.states) == 3  # C = 11: blocks at rows 0, 4, 8
    for start in range(C + 1):
        for end in range(start, C + 1):
            assert torch.equal(rows.rows(start, end), full[start:end]), (start, end)


def test_one_process_at_rate_one_is_the_full_head() -> None:
    head, x, y = problem(1)
    expected = oracle(head, x, y, lr=0.5, steps=0)
    pfc = PartialFC(copy.deepcopy(head), sample_rate=1.0, sharded="auto")
    assert not pfc.shard()  # no process group: nothing to shard
    x = x.clone().requires_grad_()
    out = pfc(x, y)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), expected["loss"], **LOSS_TOL)
    torch.testing.assert_close(x.grad, expected["x_grad"], **TOL)
    torch.testing.assert_close(pfc.sampled.grad, expected["w_grad"], **TOL)


def test_sampling_keeps_every_positive_and_leaves_other_rows_and_their_state_bit_unchanged() -> None:
    torch.manual_seed(1)
    classes, batch = 200, 16
    pfc = PartialFC(CosFaceHead(E, classes, s=16.0, m=0.2), sample_rate=0.1)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(0, E))], lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(batch, E), torch.randint(0, classes, (batch,))
        before = pfc.weight.detach().clone()
        states = {n: v.clone() for n, v in pfc.optimizer_state.items()}
        optimizer.zero_grad()
        out = pfc(x, y, generator)
        index = out.index
        assert len(index) == max(20, batch) and set(y.tolist()) <= set(index.tolist())  # ⌈0.1·200⌉ = 20 ≥ 16
        out.loss.backward()
        pfc.attach(optimizer)
        optimizer.step()
        pfc.write_back(optimizer)
        untouched = torch.ones(classes, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(pfc.weight.detach()[untouched], before[untouched])
        assert not torch.equal(pfc.weight.detach()[index], before[index])
        for name, old in states.items():  # Adam's moments of rows not sampled do not decay (step: one count)
            if old.ndim:
                assert torch.equal(pfc.optimizer_state[name][untouched], old[untouched]), (step, name)
    assert set(pfc.optimizer_state) == {"exp_avg", "exp_avg_sq", "step"}
    assert {"state_exp_avg", "state_exp_avg_sq", "state_step"} <= set(pfc.state_dict())


def test_a_softmax_head_cannot_be_sampled_and_bad_rates_are_refused() -> None:
    from arcface_lightning.core.checks import BadValue
    from arcface_lightning.models.heads import SoftmaxHead

    with pytest.raises(BadValue, match="PartialFC: head='SoftmaxHead' is invalid; allowed: a margin head"):
        PartialFC(SoftmaxHead(E, C), sample_rate=0.5)
    with pytest.raises(BadValue, match=r"sample_rate=0 is invalid; allowed: 0 < sample_rate ≤ 1"):
        PartialFC(ArcFaceHead(E, C), sample_rate=0)


# fp32 on every machine: the equality below compares the math
SHARDED = ["head.sharded=true", "head.sample_rate=0.5", "data.batch_size=8", "optimizer=sgd", "scheduler=cosine"]
SHARDED += ["trainer.precision=32-true"]


@pytest.mark.slow
def test_sharded_training_saves_the_whole_matrix_and_resumes_on_one_and_three_ranks(mnist_root, tmp_path) -> None:
    """2 gloo ranks, sharded centres (10 classes: a global batch of 16 samples every row, so the sampled-row path
    is the unit tests' above): the checkpoint holds the full 10 × 16 matrix and its momentum; one process evaluates
    it to the DDP run's own test numbers (the prediction was an argmax across ranks); the run resumes on 1 process
    and on 3 ranks and its metrics go on. (scheduler=cosine: OneCycle's step count is fixed by the first run's
    world size.)"""
    from arcface_lightning.core.runs import run
    from arcface_lightning.evaluate import evaluate
    from arcface_lightning.train import train
    from conftest import TINY, compose_config, tiny_config

    def started(*overrides: str) -> Forked:
        """The train command in a process of its own (DDP: it starts the other ranks); the caller waits."""
        return fork_command("train", list(overrides), tmp_path / "logs")

    first = tmp_path / "two"
    common = [f"paths.data_dir={mnist_root}", *TINY, *SHARDED, "logger=csv"]
    after_one_step = ["+callbacks.first_step._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                      f"+callbacks.first_step.dirpath={tmp_path / 'first_step'}", "+callbacks.first_step.filename=run",
                      "+callbacks.first_step.every_n_train_steps=1", "+callbacks.first_step.save_top_k=1",
                      "+callbacks.first_step.monitor=step", "+callbacks.first_step.mode=min"]  # fmt: skip
    # the 2-rank sharded run and the 2-rank plain step below are independent: both start now, side by side
    sharded_run = started(f"hydra.run.dir={first}", *common, "trainer=ddp_cpu", *after_one_step)
    one_step = ["trainer.max_steps=1", "trainer.limit_val_batches=0", "trainer.limit_test_batches=0"]
    plain_run = started(f"hydra.run.dir={tmp_path / 'plain'}", *common, "head.sharded=false",
                        "head.sample_rate=1.0", "trainer=ddp_cpu", *one_step)  # fmt: skip
    for process in (sharded_run, plain_run):
        assert process.wait() == 0, process.output()[1][-3000:]
    # One step of the same run with the plain head (DDP replicating the centres and their momentum) leaves the same
    # weights and momentum: sharding changes where the numbers are computed, not what they are (a global batch of
    # 16 samples all 10 rows). One step: over a whole epoch float rounding alone grows chaotically (a change of the
    # convolutions' memory order moves the weights more than sharding does; BENCHMARKS.md, Issue 15).
    sharded_step = torch.load(tmp_path / "first_step" / "run.ckpt", weights_only=True)
    plain_step = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=True)
    assert sharded_step["global_step"] == plain_step["global_step"] == 1

    def same(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:  # to 1e-5 of the tensor's scale
        assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max(), name

    for key, value in plain_step["state_dict"].items():  # the model (val_acc_best: no validation yet)
        if key.startswith("val_acc_best"):
            continue
        same(sharded_step["state_dict"][key], value, key)
    momentum = [state["momentum_buffer"] for _, state in sorted(plain_step["optimizer_states"][0]["state"].items())]
    same(sharded_step["state_dict"]["head.state_momentum_buffer"], momentum[-1], "centres' momentum")
    for index, state in sorted(sharded_step["optimizer_states"][0]["state"].items()):  # the backbone's
        same(state["momentum_buffer"], momentum[index], f"momentum {index}")
    record = json.loads((first / "metrics.json").read_text())
    assert record["status"] == "ok" and record["world_size"] == 2
    saved = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert saved["head.weight"].shape == saved["head.state_momentum_buffer"].shape == (10, 16)
    three = tmp_path / "three"  # resumed on 3 ranks, in its own processes while this one evaluates and resumes
    shutil.copytree(first, three)
    three_ranks = started(f"hydra.run.dir={three}", *common, "trainer=ddp_cpu", "trainer.devices=3",
                          "trainer.max_epochs=2", "ckpt_path=last")  # fmt: skip
    where = [f"paths.data_dir={mnist_root}", "data.download=false", "trainer=cpu", "logger=csv"]
    cfg = compose_config(f"ckpt_path={record['best_checkpoint']}", *where, config_name="eval")
    cfg.paths.output_dir = str(tmp_path / "eval")
    single = run(evaluate, cfg)
    for key in ("test/acc", "test/acc_margin", "test/precision_at_1", "test/map_at_r"):  # as test_scale's DDP test
        assert single[key] == pytest.approx(record[key], abs=1e-6), key

    one = tmp_path / "one"
    shutil.copytree(first, one)
    resumed = run(
        train,
        tiny_config(
            mnist_root,
            one,
            "experiment=mnist_default",
            *SHARDED,
            "logger=csv",
            "trainer.max_epochs=2",
            "ckpt_path=last",
        ),
    )
    assert three_ranks.wait() == 0, three_ranks.output()[1][-3000:]
    for continued in (resumed, json.loads((three / "metrics.json").read_text())):
        assert continued["status"] == "ok" and continued["epochs"] == 2, continued
        assert continued["val/acc_best"] >= record["val/acc_best"] and continued["test/acc"] > 0.5
