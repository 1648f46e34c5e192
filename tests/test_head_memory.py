"""The head's memory said before it is built (models/head_memory.py, train.check_head_memory): closed forms, the
optimiser's state measured, and a head too large refused in one line without allocating it."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch

from arcface_lightning.core.checks import ConfigError
from arcface_lightning.models.head_memory import GIB, head_memory, optimizer_state_per_value
from arcface_lightning.models.heads import ArcFaceHead, SoftmaxHead
from arcface_lightning.models.recent_heads import SubCenterArcFaceHead


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (functools.partial(torch.optim.SGD, lr=0.1), 0),
        (functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), 1),
        (functools.partial(torch.optim.Adam, lr=1e-3), 2),
        (functools.partial(torch.optim.AdamW, lr=1e-3), 2),
        (functools.partial(torch.optim.RMSprop, lr=1e-3, momentum=0.9), 2),
    ],
    ids=["sgd", "sgd momentum", "adam", "adamw", "rmsprop momentum"],
)
def test_the_optimizers_state_per_value_is_measured(optimizer, expected: int) -> None:
    assert optimizer_state_per_value(optimizer) == expected


def test_full_head_and_partial_fc_bytes_in_closed_form() -> None:
    C, E = 1_000_003, 512
    full = head_memory(C * E, C, E, state_per_value=2)
    assert (full.weights, full.gradients, full.optimizer_state) == (4 * C * E, 4 * C * E, 8 * C * E)
    rows, k = math.ceil(C / 8), math.ceil(0.1 * math.ceil(C / 8))
    pfc = head_memory(C * E, C, E, state_per_value=1, sample_rate=0.1, sharded=True, world=8, global_batch=1024)
    assert (
        pfc.weights == 4 * E * (rows + k) and pfc.gradients == 4 * E * k and pfc.optimizer_state == 4 * E * (rows + k)
    )
    every = head_memory(C * E, C, E, state_per_value=1, sample_rate=1.0, sharded=True, world=8)
    assert every.weights == every.optimizer_state == 4 * E * rows and every.gradients == 4 * E * rows
    assert "125,001 of 1,000,003 classes here" in pfc.describe() and f"{pfc.total / GIB:.2f} GiB" in pfc.describe()
    unsharded = head_memory(C * E, C, E, state_per_value=0, sample_rate=0.5, world=8, global_batch=64)
    assert unsharded.weights == 4 * E * (C + math.ceil(0.5 * C))  # every rank keeps every row, samples half


def test_heads_are_counted_on_the_meta_device_as_they_will_be_built() -> None:
    with torch.device("meta"):
        heads = [ArcFaceHead(64, 1000), SubCenterArcFaceHead(64, 1000, k=3), SoftmaxHead(64, 1000)]
    assert [sum(p.numel() for p in h.parameters()) for h in heads] == [64_000, 192_000, 65_000]
    assert all(p.is_meta for h in heads for p in h.parameters())


def test_training_logs_the_heads_memory_and_refuses_one_too_large_before_any_work(make_cfg, monkeypatch, caplog):
    from arcface_lightning import train

    with caplog.at_level(logging.INFO, logger="arcface_lightning.train"):
        train.build(make_cfg())
    (line,) = [r.message for r in caplog.records if r.message.startswith("head memory: ")]
    assert "GiB per process (weights 0.00, gradients 0.00" in line and "this process can have" in line
    cfg = make_cfg("head.num_classes=100000000", "head.embedding_size=512")  # 100M × 512: 763 GiB of weights
    built = []
    real_instantiate = train.instantiate  # also builds the optimizer's stand-in, before the memory check

    def model_not_built(config, *args, **kwargs):
        if str(config.get("_target_", "")).endswith("ArcFaceModule"):
            built.append(config)
            pytest.fail("the model was built")
        return real_instantiate(config, *args, **kwargs)

    monkeypatch.setattr(train, "instantiate", model_not_built)
    too_large = (r"^head: its weights, gradients and optimiser state take \d+\.\d\d GiB per process \(all "
                 r"100,000,000 classes × 512\), more than the [\d.]+ GiB this process can have; allowed: fewer "
                 r"classes, head\.sample_rate < 1")  # fmt: skip
    with pytest.raises(ConfigError, match=too_large):
        train.build(cfg)
    monkeypatch.setattr(
        train, "available_bytes", lambda device, processes_on_host=1: 100
    )  # bytes: less than 10 × 16 floats
    with pytest.raises(ConfigError, match=r"more than the 0\.0 GiB this process can have"):
        train.build(make_cfg())
    assert not built
