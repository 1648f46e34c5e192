"""Parameter groups (issue 26, item 4): `optimizer.no_decay_norm_bias` and `optimizer.head_lr_scale` put each
parameter in its group, a step changes them as the settings say, schedulers keep the ratio, Partial FC's rows too."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch import nn

from arcface_lightning.core.checks import ConfigError
from arcface_lightning.models.heads import SoftmaxHead
from arcface_lightning.train import build
from arcface_lightning.training.module import ArcFaceModule
from arcface_lightning.training.param_groups import GroupSettings, plan

BOTH = GroupSettings(no_decay_norm_bias=True, head_lr_scale=3.0)


class ThirdPartyRMSNorm(nn.Module):  # a norm layer torch does not define (timm's RmsNorm, say)
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 2, 3),  # 0: weight, bias
            nn.BatchNorm2d(2),  # 1
            nn.PReLU(2),  # 2
            nn.Linear(8, 4, bias=False),  # 3
            nn.LayerNorm(4),  # 4
            nn.GroupNorm(2, 4),  # 5
            ThirdPartyRMSNorm(4),  # 6
        )
        self.head = SoftmaxHead(4, 3)  # linear.weight, linear.bias


def names(groups) -> dict[str, list[str]]:
    return {group.name: group.names for group in groups}


def test_each_parameter_lands_in_the_group_its_settings_name() -> None:
    net = Net()
    decayed = ["backbone.0.weight", "backbone.3.weight"]
    exempt = ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "backbone.2.weight", "backbone.4.weight",
              "backbone.4.bias", "backbone.5.weight", "backbone.5.bias", "backbone.6.weight"]  # fmt: skip
    assert names(plan(net, BOTH)) == {
        "backbone": decayed,
        "backbone_no_decay": exempt,
        "head": ["head.linear.weight"],
        "head_no_decay": ["head.linear.bias"],
    }
    assert names(plan(net, GroupSettings(no_decay_norm_bias=True))) == {
        "model": [*decayed, "head.linear.weight"],
        "model_no_decay": [*exempt, "head.linear.bias"],
    }
    every = [name for name, _ in net.named_parameters()]
    assert names(plan(net, GroupSettings(head_lr_scale=0.5))) == {"backbone": every[:-2], "head": every[-2:]}
    assert names(plan(net, GroupSettings())) == {"model": every}
    # a head's rank-local parameters (Partial FC's centres) are in none of them; empty groups are left out
    assert names(plan(net, BOTH, exclude=["head.linear.weight"]))["head_no_decay"] == ["head.linear.bias"]
    assert "head" not in names(plan(net, BOTH, exclude=["head.linear.weight"]))


def module(scheduler: dict | None = None, **optimizer) -> ArcFaceModule:
    torch.manual_seed(0)
    return ArcFaceModule(
        backbone={"_target_": "arcface_lightning.models.backbones.SimpleCNN", "embedding_size": 8,
                  "channels": [4, 8], "batch_norm": True},
        head={"_target_": "arcface_lightning.models.heads.ArcFaceHead", "embedding_size": 8, "num_classes": 10},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, **optimizer},
        scheduler=scheduler,
    )  # fmt: skip


def test_the_module_groups_a_real_backbone_and_lists_them_at_start(caplog: pytest.LogCaptureFixture) -> None:
    model = module(lr=0.1, weight_decay=0.01, no_decay_norm_bias=True, head_lr_scale=3.0)
    with caplog.at_level(logging.INFO, logger="arcface_lightning.training.module"):
        optimizer = model.configure_optimizers()
    expected = {
        "backbone": ["backbone.features.0.weight", "backbone.features.4.weight", "backbone.embedding.weight"],
        "backbone_no_decay": [f"backbone.{layer}.{kind}" for layer in ("features.1", "features.5", "embedding_norm")
                              for kind in ("weight", "bias")],
        "head": ["head.weight"],
    }  # fmt: skip
    assert [group["name"] for group in optimizer.param_groups] == list(expected)
    params = dict(model.named_parameters())
    lines = []
    for group, (name, members), lr, decay in zip(
        optimizer.param_groups, expected.items(), (0.1, 0.1, 0.3), (0.01, 0.0, 0.01), strict=True
    ):
        assert [id(p) for p in group["params"]] == [id(params[n]) for n in members]
        assert group["lr"] == pytest.approx(lr, rel=1e-12) and group["weight_decay"] == decay
        values = sum(params[n].numel() for n in members)
        tensors = f"{len(members)} tensor" + ("s" if len(members) > 1 else "")
        lines.append(f"optimizer group {name}: {tensors}, {values:,} values, lr {lr:g}, weight_decay {decay:g}")
    assert [r.getMessage() for r in caplog.records if r.name == "arcface_lightning.training.module"] == lines


def test_defaults_keep_the_one_unnamed_group() -> None:
    """optimizer=adam|sgd as they were: one group, all parameters, no name (LearningRateMonitor's `lr-SGD`)."""
    model = module(lr=0.1, no_decay_norm_bias=False, head_lr_scale=1.0)
    (group,) = model.configure_optimizers().param_groups
    assert "name" not in group and group["lr"] == 0.1
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_one_sgd_step_decays_only_what_decays_and_the_centres_at_k_times_the_rate() -> None:
    """Zero gradients, SGD with weight decay: a no-decay parameter stays bit-unchanged, a decayed one shrinks to
    p·(1 − lr·wd), the class centres to p·(1 − k·lr·wd)."""
    lr, decay, k = 0.1, 0.5, 3.0
    model = module(lr=lr, weight_decay=decay, no_decay_norm_bias=True, head_lr_scale=k)
    optimizer = model.configure_optimizers()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    groups = {name: g.name for g in plan(model, model.group_settings) for name in g.names}
    for name, p in model.named_parameters():
        factor = {"backbone": 1 - lr * decay, "backbone_no_decay": 1.0, "head": 1 - k * lr * decay}[groups[name]]
        if factor == 1.0:
            assert torch.equal(p, before[name]), name
        else:
            torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0)
    assert {groups[n] for n in before} == {"backbone", "backbone_no_decay", "head"}


@pytest.mark.parametrize(
    "scheduler",
    [
        {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True, "max_lr": 0.01, "total_steps": 10},
        {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": 5},
        {"_target_": "torch.optim.lr_scheduler.CyclicLR", "_partial_": True, "base_lr": 0.001, "max_lr": 0.01},
    ],
    ids=lambda s: s["_target_"].rpartition(".")[2],
)
def test_every_scheduler_keeps_the_heads_rate_k_times_the_backbones(scheduler: dict) -> None:
    """OneCycleLR and CyclicLR set every group's rate from one number: it becomes one per group."""
    k = 4.0
    model = module({"scheduler": scheduler, "interval": "step"}, lr=0.02, momentum=0.9, head_lr_scale=k)
    configured = model.configure_optimizers()
    optimizer, lr_scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    for _ in range(3):
        optimizer.step()
        lr_scheduler.step()
    (backbone, head) = optimizer.param_groups
    assert (backbone["name"], head["name"]) == ("backbone", "head")
    assert head["lr"] == pytest.approx(k * backbone["lr"], rel=1e-12) and backbone["lr"] > 0
    last = lr_scheduler.get_last_lr()
    assert last[1] == pytest.approx(k * last[0], rel=1e-12)


def test_partial_fc_steps_its_sampled_rows_at_k_times_the_rate_with_its_own_optimiser_state(make_cfg) -> None:
    """One process, half the centres sampled (batches of 4 of 10 classes), SGD with Nesterov momentum and OneCycle:
    one step with k = 3 moves the centres 3× as far as with k = 1 (rows not sampled: not at all), the backbone
    alike, and the centres' momentum buffers (Partial FC's own state) are the same."""
    runs = {}
    for k in (1.0, 3.0):
        L.seed_everything(0, verbose=False)
        cfg = make_cfg("head.sample_rate=0.5", "head.sharded=false", "data.batch_size=4", "optimizer=sgd",
                       f"optimizer.head_lr_scale={k}", "scheduler=onecycle", "scheduler.scheduler.max_lr=5",
                       "trainer.limit_train_batches=1", "trainer.limit_val_batches=0")  # fmt: skip
        datamodule, model, trainer = build(cfg)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        trainer.fit(model, datamodule=datamodule)
        optimizer = trainer.optimizers[0]
        assert optimizer.param_groups[-1].get("name") == ("head_own" if k != 1.0 else None)
        lrs = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
        assert lrs[-1] == pytest.approx(k * lrs[0], rel=1e-12)  # OneCycle per group, the centres' group × k
        runs[k] = (
            {name: p.detach() - before[name] for name, p in model.named_parameters()},
            model.head.optimizer_state["momentum_buffer"].clone(),
        )
    (moved1, state1), (moved3, state3) = runs[1.0], runs[3.0]
    assert torch.equal(state1, state3) and state1.abs().sum() > 0
    sampled = moved1["head.weight"].abs().sum(1) > 0
    assert 0 < sampled.sum() < len(sampled)  # some rows sampled, some not
    assert torch.equal(moved3["head.weight"].abs().sum(1) > 0, sampled)
    assert moved1["head.weight"][sampled].abs().mean() > 1e-5  # far above the weights' rounding (~3e-8)
    torch.testing.assert_close(moved3["head.weight"], 3 * moved1["head.weight"], rtol=1e-4, atol=1e-7)
    for name in moved1:
        if name != "head.weight":
            torch.testing.assert_close(moved3[name], moved1[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("optimizer.head_lr_scale=0", "optimizer.head_lr_scale=0 is invalid; allowed: a finite number > 0"),
        ("optimizer.head_lr_scale=abc", "optimizer.head_lr_scale='abc' is invalid; allowed: a finite number > 0"),
        (
            "optimizer.no_decay_norm_bias=maybe",
            "optimizer.no_decay_norm_bias='maybe' is invalid; allowed: true or false",
        ),
    ],
)
def test_a_bad_group_setting_is_one_line_naming_the_key(make_cfg, override: str, line: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build(make_cfg(override))
    assert str(raised.value) == line
