"""Margin warm-up (issue 26, item 3): `head.margin_warmup_epochs=E` ramps every margin of every margin head from none
to the configured one, linearly in optimizer steps over E epochs, and a resumed run continues the ramp."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from arcface_lightning.core.checks import BadValue, ConfigError
from arcface_lightning.models.heads import (
    ArcFaceHead,
    CombinedMarginHead,
    CosFaceHead,
    SphereFaceHead,
)
from arcface_lightning.models.partial_fc import PartialFC
from arcface_lightning.models.protocol import warmup_factor
from arcface_lightning.models.recent_heads import (
    AdaFaceHead,
    CurricularFaceHead,
    ElasticFaceHead,
    SubCenterArcFaceHead,
)
from arcface_lightning.train import build
from conftest import cli

E, C, B, S = 8, 5, 24, 30.0
T = 0.3  # a factor inside the ramp


def lerp(value: float, t: float, none: float = 0.0) -> float:
    return (1.0 - t) * none + t * value


# name: (class, configured arguments, the arguments at factor t (None: no head of the class is that head))
HEADS = {
    "arcface": (ArcFaceHead, {"m": 0.5}, lambda t: {"m": lerp(0.5, t)}),
    "cosface": (CosFaceHead, {"m": 0.35}, lambda t: {"m": lerp(0.35, t)}),
    "sphereface": (SphereFaceHead, {"m": 1.5}, lambda t: {"m": lerp(1.5, t, 1.0)}),
    "combined": (
        CombinedMarginHead,
        {"m1": 1.2, "m2": 0.3, "m3": 0.2},
        lambda t: {"m1": lerp(1.2, t, 1.0), "m2": lerp(0.3, t), "m3": lerp(0.2, t)},
    ),
    "subcenter": (SubCenterArcFaceHead, {"m": 0.5, "k": 3}, lambda t: {"m": lerp(0.5, t), "k": 3}),
    "adaface": (AdaFaceHead, {"m": 0.4, "t_alpha": 0.5}, lambda t: {"m": lerp(0.4, t), "t_alpha": 0.5}),
    "elasticface_arc": (ElasticFaceHead, {"variant": "arc", "m": 0.5, "sigma": 0.05}, None),
    "elasticface_cos": (ElasticFaceHead, {"variant": "cos", "m": 0.35, "sigma": 0.05}, None),
    "curricularface": (CurricularFaceHead, {"m": 0.5}, None),
}
STATE = ("counts", "live", "batch_mean", "batch_std", "draws", "t")  # the heads' buffers that move in training


def make(name: str, arguments: dict | None = None, **extra) -> torch.nn.Module:
    kind, configured, _ = HEADS[name]
    torch.manual_seed(0)  # the same class weights for every head of a test
    return kind(E, C, s=S, **(configured if arguments is None else arguments), **extra).train()


def batch(head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings near a (first) centre: their own class's for even rows, the next class's for odd rows (whose
    target is then far and that class a hard negative)."""
    head = head or make("arcface")
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(B) % C
    near = (labels + torch.arange(B) % 2) % C
    centres = head.weight.detach()[near * (len(head.weight) // C)]
    return centres / centres.norm(dim=1, keepdim=True) + 0.4 * torch.randn(B, E, generator=generator) / E**0.5, labels


def cosines64(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """cos θ in float64, from the head's weights: the best sub-centre's for sub-centre heads."""
    w = torch.nn.functional.normalize(head.weight.detach().double(), dim=1)
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ w.t()
    return cos.view(len(x), C, -1).amax(2)


@pytest.mark.parametrize("name", HEADS)
def test_at_factor_zero_every_margin_head_is_the_normalised_softmax_head(name: str) -> None:
    head = make(name, margin_warmup_epochs=2)
    x, y = batch(head)
    head.set_margin_scale(0.0)
    margin_logits, logits = head.training_logits(x, y)
    assert torch.equal(margin_logits, logits) and torch.equal(margin_logits, head.logits(x))  # s·cos θ, bit for bit
    torch.testing.assert_close(margin_logits.double(), S * cosines64(head, x), atol=1e-4, rtol=0)
    if name.startswith(("elasticface", "curricularface")):
        return  # no zero-margin construction of these is s·cos θ (random draws; CurricularFace's hard negatives)
    at = HEADS[name][2]
    zero = make(name, at(0.0))
    assert torch.equal(zero.training_logits(x, y)[0], margin_logits)  # the head itself built with zero margins


@pytest.mark.parametrize("name", HEADS)
def test_after_the_warm_up_every_margin_head_is_the_configured_head_and_its_state_moved_alike(name: str) -> None:
    """The warmed head (factor 0, then 1) and a head that never warmed up see the same two batches: at the second
    both give the same logits exactly, and their statistics (counts, EMAs, draws) are the same, the margin having
    no part in them."""
    warmed, plain = make(name, margin_warmup_epochs=3), make(name)
    x, y = batch(plain)
    warmed.set_margin_scale(0.0)
    warmed.training_logits(x, y)
    plain.training_logits(x, y)
    warmed.set_margin_scale(1.0)
    assert torch.equal(warmed.training_logits(x, y)[0], plain.training_logits(x, y)[0])
    for buffer in STATE:
        if hasattr(plain, buffer):
            assert torch.equal(getattr(warmed, buffer), getattr(plain, buffer)), buffer


@pytest.mark.parametrize("name", [n for n, (_, _, at) in HEADS.items() if at is not None])
def test_inside_the_ramp_every_margin_is_scaled_by_the_factor(name: str) -> None:
    head = make(name, margin_warmup_epochs=1)
    x, y = batch(head)
    head.set_margin_scale(T)
    assert torch.equal(head.training_logits(x, y)[0], make(name, HEADS[name][2](T)).training_logits(x, y)[0])


def test_inside_the_ramp_arcface_and_combined_match_their_float64_formula() -> None:
    x, y = batch()
    for name, margins in (("arcface", (1.0, 0.5, 0.0)), ("combined", (1.2, 0.3, 0.2)), ("sphereface", (1.5, 0, 0))):
        head = make(name, margin_warmup_epochs=1)
        head.set_margin_scale(T)
        cos = cosines64(head, x)
        m1, m2, m3 = lerp(margins[0], T, 1.0), lerp(margins[1], T), lerp(margins[2], T)
        theta = torch.acos(cos.gather(1, y[:, None]))
        assert (m1 * theta + m2 < math.pi).all()  # inside the monotone range: the formula without its fallback
        expected = S * cos.scatter(1, y[:, None], torch.cos(m1 * theta + m2) - m3)
        torch.testing.assert_close(head.training_logits(x, y)[0].double(), expected, atol=2e-4, rtol=0)


def test_inside_the_ramp_elasticface_scales_each_draw_and_curricularface_blends_its_negatives() -> None:
    x, y = batch()
    margins = 0.5 + 0.05 * torch.randn(B, generator=torch.Generator().manual_seed(2))
    for variant in ("arc", "cos"):
        head = ElasticFaceHead(E, C, s=S, variant=variant, m=0.5, margin_warmup_epochs=1).train()
        head.set_margin_scale(T)
        plain = ElasticFaceHead(E, C, s=S, variant=variant, m=0.5).train()
        plain.load_state_dict(head.state_dict())
        assert torch.equal(head.training_logits(x, y, margins)[0], plain.training_logits(x, y, margins * T)[0])
    head = make("curricularface", margin_warmup_epochs=1)
    head.set_margin_scale(T)
    logits = head.training_logits(x, y)[0].double()
    cos, t_c, m = cosines64(head, x), float(head.t), lerp(0.5, T)  # t_c: after this batch's update, as the head uses
    target = torch.cos(torch.acos(cos.gather(1, y[:, None])) + m)
    blended = cos + T * (cos * (t_c + cos) - cos)
    expected = S * torch.where(cos > target, blended, cos).scatter(1, y[:, None], target)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=0)


def test_partial_fc_warms_up_the_margin_it_wraps() -> None:
    x, y = batch()
    losses = {}
    for m, scale in ((0.5, 0.0), (0.0, 1.0), (0.5, T), (T * 0.5, 1.0), (0.5, 1.0)):
        torch.manual_seed(0)
        head = PartialFC(ArcFaceHead(E, C, s=S, m=m, margin_warmup_epochs=2), sample_rate=0.6).train()
        assert head.margin_warmup_epochs == 2
        head.set_margin_scale(scale)
        losses[m, scale] = head.step(x, y, seed=7).loss
    assert torch.equal(losses[0.5, 0.0], losses[0.0, 1.0]) and torch.equal(losses[0.5, T], losses[T * 0.5, 1.0])
    assert losses[0.5, 0.0] < losses[0.5, T] < losses[0.5, 1.0]  # a larger margin, a larger loss


def test_evaluation_never_uses_the_warm_up_factor() -> None:
    """Predictions are argmaxes of s·cos θ whatever the factor; the module asks its validation for factor 1."""
    for name in HEADS:
        head = make(name, margin_warmup_epochs=2).eval()
        x, y = batch(head)
        steps = []
        for scale in (0.0, 1.0):
            head.set_margin_scale(scale)
            steps.append(head.step(x, y))
        assert torch.equal(steps[0].preds, steps[1].preds) and torch.equal(steps[0].preds, head.logits(x).argmax(1))


def test_the_schedule_is_linear_in_steps_and_ends_at_one() -> None:
    assert [warmup_factor(step, 4) for step in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0  # no warm-up


class Scales(L.Callback):
    """The factor each training step ran with, and the step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step - 1, module.head.margin_scale))  # global_step counts this step now


def test_the_ramp_follows_the_step_resumes_mid_warm_up_and_is_logged(make_cfg, tmp_path: Path) -> None:
    """Two epochs of 4 steps of warm-up: steps 0-7 at g/8, then 1. The first run stops after epoch 1 (factor 0.5
    at its checkpoint); the resumed run continues at 4/8, not at 0."""
    keys = ("logger=csv", "head.margin_warmup_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1")
    datamodule, model, trainer = build(make_cfg(*keys, "trainer.max_epochs=1"))
    trainer.callbacks.append(first := Scales())
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    datamodule, model, trainer = build(make_cfg(*keys, "trainer.max_epochs=3"))
    trainer.callbacks.append(resumed := Scales())
    trainer.fit(model, datamodule=datamodule, ckpt_path=tmp_path / "mid.ckpt")
    seen = first.seen + resumed.seen
    assert seen == [(step, min(step / 8, 1.0)) for step in range(12)]
    assert model.head.margin_scale == 1.0  # validation ran last, at the configured margin
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    logged = {int(r["step"]): float(r["train/margin_scale"]) for r in rows if r.get("train/margin_scale")}
    assert set(range(4, 12)) <= set(logged)  # every step of the resumed run (log_every_n_steps=1)
    assert logged == {step: min(step / 8, 1.0) for step in logged}


def test_validation_loss_is_the_configured_objective_during_the_warm_up(make_cfg) -> None:
    datamodule, model, trainer = build(
        make_cfg("head.margin_warmup_epochs=5", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2")
    )
    trainer.fit(model, datamodule=datamodule)
    model.head.set_margin_scale(0.0)  # left at the ramp's start: the module must set 1 for validation
    (warming,) = trainer.validate(model, datamodule=datamodule)
    model.head.margin_warmup_epochs = 0  # the same weights, no warm-up: the head at its configured margin
    model.head.set_margin_scale(1.0)
    (plain,) = trainer.validate(model, datamodule=datamodule)
    assert warming == plain and warming["val/loss"] > 0


@pytest.mark.parametrize(("value", "shown"), [("-1", "-1"), ("1.5", "1.5"), ("abc", "'abc'"), ("true", "True")])
def test_a_bad_warm_up_is_one_line_naming_the_key(make_cfg, value: str, shown: str) -> None:
    with pytest.raises(ConfigError, match=rf"^head.margin_warmup_epochs={shown} is invalid; allowed: an integer ≥ 0 "):
        build(make_cfg(f"head.margin_warmup_epochs={value}"))
    with pytest.raises(BadValue, match=r"margin_scale=1\.5 is invalid"):
        ArcFaceHead(E, C).set_margin_scale(1.5)


def test_a_head_without_a_margin_has_no_warm_up_key() -> None:
    result = cli("train", "head=softmax", "head.margin_warmup_epochs=1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: head.margin_warmup_epochs: no such key; head has:")


def test_the_warm_up_reads_nothing_back_to_the_host_between_logging_steps(make_cfg, monkeypatch) -> None:
    """The factor is a host number from the step: setting it and logging it add no device read. Accelerator tensors
    are simulated as in test_module.py (reads are not free); every host read inside training_step is recorded."""
    from arcface_lightning.models import heads
    from arcface_lightning.training.module import ArcFaceModule

    monkeypatch.setattr(heads, "reads_are_free", lambda tensor: False)
    reads: list[int] = []

    class Recorded(ArcFaceModule):
        def training_step(self, batch, batch_idx):
            with pytest.MonkeyPatch.context() as patch:
                for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
                    original = getattr(torch.Tensor, name)
                    patch.setattr(torch.Tensor, name, lambda t, *a, _o=original, **k: reads.append(self.global_step)
                                  or _o(t, *a, **k))  # fmt: skip
                return super().training_step(batch, batch_idx)

    cfg = make_cfg("logger=csv", "head.margin_warmup_epochs=2", "trainer.log_every_n_steps=4",
                   "trainer.limit_train_batches=8", "trainer.limit_val_batches=1")  # fmt: skip
    datamodule, model, trainer = build(cfg)
    model.__class__ = Recorded
    trainer.fit(model, datamodule=datamodule)
    assert set(reads) == {3, 7} and model.head.margin_warmup_epochs == 2
