"""The LightningModule: all parameters train, metrics are margin-free, checkpoints rebuild the model alone."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.model_summary import ModelSummary

from arcface_lightning.models import heads
from arcface_lightning.train import build
from arcface_lightning.train import train as run_train
from arcface_lightning.training.module import ArcFaceModule, DivergedError


def test_a_training_step_moves_head_and_backbone(make_cfg) -> None:
    cfg = make_cfg("trainer.fast_dev_run=1", "logger=csv")
    datamodule, model, trainer = build(cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.fit(model, datamodule=datamodule)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "head.weight" in moved  # the class weights are optimised (a classic omission)
    assert moved == set(before)


def test_val_accuracy_is_argmax_of_cosine_and_acc_margin_is_the_seeds(make_cfg) -> None:
    cfg = make_cfg("head.m=1.0", "logger=csv")
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    (logged,) = trainer.validate(model, datamodule=datamodule)
    correct = correct_margin = total = 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            images, labels = datamodule.on_after_batch_transfer(batch, 0)  # uint8 → normalised floats
            embeddings = model(images)
            correct += (model.head.cosine(embeddings).argmax(1) == labels).sum().item()
            correct_margin += (model.head(embeddings, labels).argmax(1) == labels).sum().item()
            total += len(labels)
    assert logged["val/acc"] == pytest.approx(correct / total, abs=1e-6)  # logged as float32
    assert logged["val/acc_margin"] == pytest.approx(correct_margin / total, abs=1e-6)
    assert logged["val/acc_margin"] < logged["val/acc"]  # the margin makes right answers look wrong


def test_step_loss_is_logged_exactly_on_the_steps_lightning_writes(make_cfg, tmp_path: Path) -> None:
    """train/loss_step skips self.log on steps no logger writes: the predicate must match Lightning's own."""

    class Spy(L.Callback):
        def __init__(self) -> None:
            self.agree: list[tuple[bool, bool]] = []  # (ours, Lightning's) per training batch

        def on_train_batch_start(self, trainer: L.Trainer, module: ArcFaceModule, *args: object) -> None:
            self.agree.append((module._loggers_write_this_step(), trainer._logger_connector.should_update_logs))

    cfg = make_cfg("logger=csv", "trainer.log_every_n_steps=3", "trainer.max_epochs=2", "trainer.limit_train_batches=7")
    datamodule, model, trainer = build(cfg)
    trainer.callbacks.append(spy := Spy())
    trainer.fit(model, datamodule=datamodule)
    assert len(spy.agree) == 14 and all(ours == lightnings for ours, lightnings in spy.agree)
    assert [ours for ours, _ in spy.agree].count(True) == 4  # steps 2, 5, 8, 11
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    logged = {int(row["step"]): float(row["train/loss_step"]) for row in rows if row.get("train/loss_step")}
    assert sorted(logged) == [2, 5, 8, 11] and len(set(logged.values())) == 4  # a fresh loss at each


def test_checkpoint_rebuilds_the_model_without_arguments(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("trainer.max_epochs=1", "trainer.limit_train_batches=2", "logger=csv")
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = ArcFaceModule.load_from_checkpoint(path, weights_only=True)  # plain data only: safe loading works
    assert loaded.head.s == cfg.head.s and loaded.head.m == cfg.head.m
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_onecycle_gets_total_steps_from_the_trainer(make_cfg) -> None:
    cfg = make_cfg("scheduler=onecycle", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "logger=csv")
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and scheduler.scheduler.total_steps == 6


def test_module_works_in_a_plain_trainer(make_cfg) -> None:
    cfg = make_cfg()
    model = ArcFaceModule(
        backbone={"_target_": "arcface_lightning.models.backbones.SimpleCNN", "embedding_size": 8, "channels": [4, 8]},
        head={"_target_": "arcface_lightning.models.heads.CosFaceHead", "embedding_size": 8, "num_classes": 10},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    )
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", enable_progress_bar=False, logger=False)
    trainer.fit(model, datamodule=instantiate(cfg.data))
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_channels_last_is_a_memory_layout_not_a_different_model() -> None:
    config = {
        "backbone": {
            "_target_": "arcface_lightning.models.backbones.SimpleCNN",
            "embedding_size": 8,
            "batch_norm": True,
        },
        "head": {"_target_": "arcface_lightning.models.heads.ArcFaceHead", "embedding_size": 8, "num_classes": 10},
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True},
    }
    nhwc, nchw = ArcFaceModule(**config, channels_last=True), ArcFaceModule(**config, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())  # the same parameters, either layout
    assert nhwc.backbone.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert nchw.backbone.features[0].weight.is_contiguous()
    images = torch.randn(16, 1, 28, 28)
    nhwc.eval(), nchw.eval()
    torch.testing.assert_close(nhwc(images), nchw(images), atol=1e-5, rtol=1e-4)  # float rounding only


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")


def test_training_steps_read_nothing_back_to_the_host_between_logging_steps(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU each host read of a device tensor waits for the device. Accelerator tensors are simulated here by
    telling the head and the module that reads are not free; every host read inside training_step is recorded."""
    monkeypatch.setattr(heads, "reads_are_free", lambda tensor: False)
    reads: list[tuple[int, str]] = []
    step = {"global": -1}

    def recording(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append((step["global"], name))
            return original(self, *args, **kwargs)

        return read

    class Recorded(ArcFaceModule):
        def training_step(self, batch, batch_idx):
            step["global"] = self.global_step
            with pytest.MonkeyPatch.context() as patch:
                for name in HOST_READS:
                    patch.setattr(torch.Tensor, name, recording(name))
                return super().training_step(batch, batch_idx)

    cfg = make_cfg("logger=csv", "trainer.log_every_n_steps=4", "trainer.limit_train_batches=8", "trainer.max_epochs=1")
    datamodule, model, trainer = build(cfg)
    model.__class__ = Recorded
    trainer.fit(model, datamodule=datamodule)
    assert {s for s, _ in reads} == {3, 7}  # the logging steps only (global_step + 1 divisible by 4)
    # and a loss that stops being finite still ends the run, on the next logging step
    model = Recorded(**{k: v for k, v in model.hparams.items()})
    trainer = build(make_cfg("logger=csv", "trainer.log_every_n_steps=4", "trainer.max_epochs=1"))[2]
    model.head.s = float("nan")  # every loss from the first step on is NaN
    with pytest.raises(DivergedError, match=r"^diverged: train/loss is nan at epoch 0, step 3; "):
        trainer.fit(model, datamodule=datamodule)


def test_one_cosine_matrix_per_training_step(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """The (batch × classes) matmul is the head's cost: the loss and the prediction share one."""
    calls = []
    original = heads.cosine_similarity
    monkeypatch.setattr(heads, "cosine_similarity", lambda *a: calls.append(1) or original(*a))
    _, model, _ = build(make_cfg())
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8)
    model.train()
    loss, preds, margin_preds, _, embeddings = model._step((images, labels))
    assert len(calls) == 1
    with torch.no_grad():  # the same numbers as the two separate calls
        margin_logits, logits = model.head(embeddings, labels), model.head.logits(embeddings)
    assert torch.equal(preds, logits.argmax(1)) and torch.equal(margin_preds, margin_logits.argmax(1))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(margin_logits, labels))


def test_model_summary_shows_flops_from_the_example_input(make_cfg) -> None:
    _, model, _ = build(make_cfg())
    assert tuple(model.example_input_array.shape) == (1, 1, 28, 28)
    summary = ModelSummary(model, max_depth=1)
    assert summary.out_sizes[0] == [1, 16]  # backbone → (1, embedding_size)
    if hasattr(summary, "total_flops"):  # Lightning ≥ 2.6 counts FLOPs; 2.5 (the floor) shows the sizes only
        assert summary.total_flops > 0


def test_learning_rate_is_logged_at_the_schedulers_interval(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("scheduler=onecycle", "logger=csv", "trainer.log_every_n_steps=2", "trainer.limit_train_batches=8")
    run_train(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    lrs = {int(row["step"]): float(row["lr-Adam"]) for row in rows if row.get("lr-Adam")}
    assert sorted(lrs) == [1, 3, 5, 7]  # every logged step of the one epoch, not once per epoch
    assert lrs[1] > lrs[3] > lrs[5] > lrs[7]  # OneCycle's decay after its short warm-up (steps 0-2)


def test_epoch_loss_and_accuracy_weigh_every_image_once(make_cfg) -> None:
    """500 images in batches of 32: the short last batch (20 images) must count 20 times, not as a full batch."""

    class Steps(L.Callback):
        def __init__(self) -> None:
            self.losses: list[tuple[float, int]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.losses.append((float(outputs["loss"]), len(batch[1])))

    datamodule, model, trainer = build(make_cfg("logger=csv", "data.val_size=100", "data.batch_size=32"))
    trainer.callbacks.append(steps := Steps())
    trainer.fit(model, datamodule=datamodule)
    assert [n for _, n in steps.losses][-1] == 500 % 32 and trainer.callback_metrics["train/samples"] == 500
    expected = sum(loss * n for loss, n in steps.losses) / 500
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(expected, rel=1e-5)


def test_the_module_takes_live_parts_without_hydra(make_cfg, tmp_path: Path) -> None:
    """A notebook user passes nn.Modules and an optimizer factory; the checkpoint then needs them passed again."""
    from functools import partial

    from arcface_lightning.models.backbones import SimpleCNN
    from arcface_lightning.models.heads import CosFaceHead

    model = ArcFaceModule(
        backbone=SimpleCNN(embedding_size=8, channels=[4, 8]),
        head=CosFaceHead(embedding_size=8, num_classes=10),
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )
    assert "backbone" not in model.hparams and "optimizer" not in model.hparams
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", enable_progress_bar=False, logger=False)
    trainer.fit(model, datamodule=instantiate(make_cfg().data))
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and trainer.optimizers[0].defaults["lr"] == 0.1
    trainer.save_checkpoint(tmp_path / "live.ckpt")
    parts = {"backbone": SimpleCNN(embedding_size=8, channels=[4, 8]), "head": CosFaceHead(8, 10)}
    loaded = ArcFaceModule.load_from_checkpoint(tmp_path / "live.ckpt", optimizer=partial(torch.optim.SGD), **parts)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_model_is_a_config_group_whose_checkpoints_rebuild_alone(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("head=cosface", "head.s=12", "evaluation.max_pairs=500")
    assert cfg.model._target_ == "arcface_lightning.training.module.ArcFaceModule"
    _, model, trainer = build(cfg)
    assert (
        model.hparams.head["s"] == 12
        and model.hparams.max_pairs == 500
        and model.hparams.backbone["channels"] == [4, 8]
    )
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "cfg.ckpt")
    loaded = ArcFaceModule.load_from_checkpoint(tmp_path / "cfg.ckpt", weights_only=True)
    assert type(loaded.head).__name__ == "CosFaceHead" and loaded.head.s == 12


def test_predict_returns_unit_embeddings_and_labels(make_cfg) -> None:
    datamodule, model, trainer = build(make_cfg("trainer.max_epochs=1", "trainer.limit_train_batches=2"))
    trainer.fit(model, datamodule=datamodule)
    batches = trainer.predict(model, datamodule=datamodule)
    embeddings = torch.cat([b["embeddings"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert embeddings.shape == (200, 16) and labels.tolist() == datamodule.test_set.targets.tolist()
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(200))
    model.eval()
    with torch.no_grad():  # the same as the module's own forward pass on the prepared images
        images = datamodule.prepare(next(iter(datamodule.test_dataloader()))[0])
        torch.testing.assert_close(embeddings[:100], torch.nn.functional.normalize(model(images)), atol=1e-5, rtol=0)


def test_a_new_head_is_one_class_whose_hooks_the_module_calls(make_cfg, tmp_path: Path) -> None:
    """The head protocol (models/protocol.py): a head written outside the project, subclassing `Head`, gets every
    hook at its moment, with the module knowing nothing of it: its per-rank parameter is neither averaged by DDP
    nor in the model's optimiser group, its own group comes after, and the checkpoint holds what `whole_state`
    wrote. A module that is no `Head` is refused with one line."""
    from functools import partial

    from arcface_lightning.core.checks import BadValue
    from arcface_lightning.models.backbones import SimpleCNN
    from arcface_lightning.models.protocol import Head, HeadStep

    class CountingHead(Head):
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = 10
            self.weight = torch.nn.Parameter(torch.randn(10, 8))
            self.local = torch.nn.Parameter(torch.zeros(3))  # stands for a rank's own rows
            self.calls: list[str] = []

        def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
            return heads.normalize(embeddings) @ heads.normalize(self.weight).t()

        def step(self, embeddings: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> HeadStep:
            self.calls.append("step train" if self.training else "step eval")
            logits = 10 * self.logits(embeddings)
            preds = logits.detach().argmax(1)
            return HeadStep(torch.nn.functional.cross_entropy(logits, labels), preds, preds)

        def setup_distributed(self, accumulate_grad_batches: int = 1) -> None:
            self.calls.append(f"setup {accumulate_grad_batches}")

        def attach(self, optimizer: torch.optim.Optimizer) -> None:
            self.calls.append(f"attach {len(optimizer.param_groups)}")

        def write_back(self, optimizer: torch.optim.Optimizer) -> None:
            self.calls.append("write_back")

        def end_of_epoch(self, epoch: int) -> None:
            self.calls.append(f"end_of_epoch {epoch}")

        def rank_local_parameters(self) -> list[str]:
            return ["local"]

        def optimizer_groups(self) -> list[dict]:
            return [{"params": [self.local], "lr": 0.5}]

        def whole_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
            state[f"{prefix}local"] = torch.full((3,), 7.0)

    head = CountingHead()
    model = ArcFaceModule(
        backbone=SimpleCNN(embedding_size=8, channels=[4, 8]), head=head, optimizer=partial(torch.optim.SGD, lr=0.1)
    )
    assert model._ddp_params_and_buffers_to_ignore == ["head.local"]
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", enable_progress_bar=False,
        logger=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=instantiate(make_cfg().data))
    train = ["step train", "attach 2", "write_back"]
    assert head.calls == ["setup 1", *train, *train, "step eval", "end_of_epoch 0", *train, *train, "step eval",
                          "end_of_epoch 1"]  # fmt: skip
    groups = trainer.optimizers[0].param_groups
    assert [p is head.local for p in groups[1]["params"]] == [True] and groups[1]["lr"] == 0.5
    assert all(p is not head.local for p in groups[0]["params"]) and any(p is head.weight for p in groups[0]["params"])
    trainer.save_checkpoint(tmp_path / "head.ckpt")
    saved = torch.load(tmp_path / "head.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(saved["head.local"], torch.full((3,), 7.0))
    allowed = r"a subclass of arcface_lightning\.models\.protocol\.Head$"
    with pytest.raises(
        BadValue,
        match=r"^ArcFaceModule: head='Linear' is invalid; allowed: " + allowed,
    ):
        ArcFaceModule(backbone=SimpleCNN(embedding_size=8), head=torch.nn.Linear(8, 10), optimizer=torch.optim.SGD)
