"""The LightningModule: backbone → embeddings → margin head → loss, metrics and logs.

Accuracy is always the argmax of the margin-free logits s·cos θ (no labels): that is what the model predicts.
`*/acc_margin` is the seed script's flawed metric (argmax of the logits with the margin applied to the true class),
logged beside it only so the two can be compared; never select or report models on it.

Margin warm-up: a head with `margin_warmup_epochs` = E > 0 gets, before each training step, the factor
protocol.warmup_factor(global_step, E × the optimizer steps of one epoch): its margins ramp linearly from none to
the configured ones over the first E epochs, and a resumed run continues the ramp (global_step is restored).
Validation and test use the configured margins (factor 1): `val/loss` is the same objective at every epoch, with or
without warm-up. `train/margin_scale` is logged on the steps the loggers write.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from arcface_lightning.core.checks import BadValue, ConfigError, DivergedError, check_choice, check_int
from arcface_lightning.core.registry import check_lr_scheduler, check_part, current_target
from arcface_lightning.evaluation.metrics import SELECTION, embedding_metrics
from arcface_lightning.models import heads
from arcface_lightning.models.partial_fc import build_with_partial_fc
from arcface_lightning.models.protocol import Head, warmup_factor
from arcface_lightning.training import param_groups

log = logging.getLogger(__name__)


def build_part(config: Mapping[str, Any], part: str) -> Any:
    """instantiate(config) once registry.py has allowed every target it names: a checkpoint's settings never choose
    what is imported or called."""
    config = current_target(config)
    check_part(config, part)
    return instantiate(config)


def build_head(config: Mapping[str, Any]) -> nn.Module:
    """A head from its config, wrapped in Partial FC when its `sample_rate` / `sharded` keys ask for it
    (partial_fc.build_with_partial_fc), every part built through the allow-list."""
    return build_with_partial_fc(current_target(config), lambda part: build_part(part, "head"))


class ArcFaceModule(L.LightningModule):
    """Embedding model trained through an angular-margin head.

    The parts come as config mappings (`_target_` dicts, as conf/model/arcface.yaml passes them) or as live objects.
    From configs, a checkpoint holds only plain data: `ArcFaceModule.load_from_checkpoint(path)` rebuilds the model
    with no other argument, and loads with torch's safe `weights_only=True`. Live objects (a notebook, another
    training loop) are not saved as hyper-parameters; pass them again to `load_from_checkpoint(path, backbone=...)`.

    Args:
        backbone: an nn.Module mapping images to embeddings, or its config.
        head: a head with `training_logits(embeddings, labels)`, `logits(embeddings)` and `num_classes` (heads.py),
            or its config.
        optimizer: a callable `params -> torch.optim.Optimizer` (e.g. `functools.partial(torch.optim.Adam, lr=1e-3)`),
            or the config of one (`_partial_: true`); called with all parameters (backbone and head). A config's
            `no_decay_norm_bias` and `head_lr_scale` split them into groups (training/param_groups.py).
        scheduler: None, or Lightning's lr-scheduler dict whose `scheduler` is a partial config; a `total_steps: null`
            in it is filled with the trainer's estimated number of optimizer steps (for OneCycleLR).
        max_pairs: verification pairs sampled at test time (see metrics.py) when the test set has more.
        figures, projector_samples: accepted and ignored, so that checkpoints written before the figures moved to a
            callback (callbacks.EmbeddingFigures, switched by `evaluation.figures`) still load.
        channels_last: convolution weights and image batches in NHWC memory order. The same numbers up to float
            rounding, and oneDNN (CPU) and cuDNN (GPU, mixed precision) have faster kernels for it: one epoch of the
            seed recipe on 2 CPU cores takes about half the time (BENCHMARKS.md).
        example_input_shape: (channels, height, width) of one image: Lightning's model summary then shows each
            layer's output size and the FLOPs of one image's forward pass.

    GPU note: a training step reads nothing back to the host except on the steps the loggers write (every
    `trainer.log_every_n_steps`). Epoch aggregates accumulate on the device; label ranges are checked once by the
    data module (data/datasets.py), not per step; and a non-finite loss is noted on the device at every step but
    only read, and turned into a `DivergedError`, on logging steps (on CPU, where reading it is free, at every
    step). So on a GPU a diverged run stops up to `log_every_n_steps` steps after its first non-finite loss.
    """

    def __init__(
        self,
        backbone: nn.Module | Mapping[str, Any],
        head: nn.Module | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        max_pairs: int = 200_000,
        figures: bool = True,
        projector_samples: int = 2000,
        channels_last: bool = True,
        example_input_shape: Sequence[int] | None = None,
        val_split: str = "by_sample",
    ) -> None:
        super().__init__()
        check_int(type(self).__name__, "max_pairs", max_pairs)
        check_choice(type(self).__name__, "val_split", val_split, ("by_sample", "by_class"))
        live = [
            name
            for name, part in (("backbone", backbone), ("head", head), ("optimizer", optimizer))
            if not isinstance(part, Mapping)
        ]
        self.save_hyperparameters(ignore=live)
        if scheduler is not None:  # built in configure_optimizers; its targets are checked now, before any work
            check_lr_scheduler(scheduler)
        self.group_settings = param_groups.GroupSettings()
        if isinstance(optimizer, Mapping):
            optimizer, self.group_settings = param_groups.split_optimizer_config(optimizer)
        self.optimizer_factory = optimizer if callable(optimizer) else build_part(optimizer, "optimizer")
        if example_input_shape is not None:
            self.example_input_array = torch.zeros(1, *example_input_shape)
        # per test loader (0: the test set, 1: the open set), and for validation with held-out classes
        self._test_embeddings: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._val_embeddings: list[tuple[torch.Tensor, torch.Tensor]] = []
        # by_class: validation and test images are of classes the head never learnt, so closed-set accuracy does
        # not exist there; validation measures retrieval (SELECTION[val_split] picks the checkpoint)
        self.held_out_classes = val_split == "by_class"
        self.backbone = backbone if isinstance(backbone, nn.Module) else build_part(backbone, "backbone")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)  # 4-D weights only; checkpoints load into it as usual
        self.head = head if isinstance(head, nn.Module) else build_head(head)
        if not isinstance(self.head, Head):
            raise BadValue(
                type(self).__name__,
                "head",
                type(self.head).__name__,
                "a subclass of arcface_lightning.models.protocol.Head",
            )
        num_classes = self.head.num_classes
        # one metric object per stage (and per definition): torchmetrics keeps their states apart.
        # Training aggregates are plain sums on the device: nan_strategy="disable" skips torchmetrics' NaN check
        # (a host read per update), and the training accuracy is the mean of (prediction == label) because
        # MulticlassAccuracy's bincount reads its input's maximum back to the host on CUDA.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_samples = SumMetric(nan_strategy="disable")
        self.train_acc = MeanMetric(nan_strategy="disable")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_margin = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc_margin = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()  # of SELECTION[val_split]: val/acc, or val/precision_at_1 for by_class
        self.val_acc_best.persistent(True)  # in checkpoints, so a resumed run keeps its best so far
        # true on the device once a training loss is not finite; read on logging steps only (see the class doc).
        # A plain attribute, not a buffer: DDP would overwrite every rank's buffers with rank zero's.
        self._loss_not_finite: torch.Tensor | None = None
        self.predict_flip = False  # embed flip=true: predict_step fuses each image with its mirror
        self._warmup_steps: int | None = None  # the margin warm-up's length in optimizer steps, set once per fit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (batch, embedding_size)."""
        if images.ndim == 4:
            images = images.contiguous(memory_format=self.memory_format)
        return self.backbone(images)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        images, labels = batch
        embeddings = self(images)
        if self.head.margin_warmup_epochs:
            self.head.set_margin_scale(self._margin_scale() if self.training else 1.0)
        # the training objective (margin on the true class) and the predictions, the head's way (protocol.py)
        out = self.head.step(embeddings, labels, seed=self._step_seed() if self.training else 0)
        return out.loss, out.preds, out.margin_preds, labels, embeddings

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, preds, _, labels, _ = self._step(batch)
        self.head.attach(self.optimizers().optimizer)  # before the optimiser steps (and a gradient scaler unscales)
        detached = loss.detach()
        not_finite = ~torch.isfinite(detached)
        self._loss_not_finite = not_finite if self._loss_not_finite is None else self._loss_not_finite | not_finite
        logging_step = self._loggers_write_this_step()
        if (logging_step or heads.reads_are_free(detached)) and self._loss_not_finite.item():
            value = detached.item()
            when = f"at epoch {self.current_epoch}, step {self.global_step}"
            seen = f"is {value} {when}" if not torch.isfinite(detached) else f"was not finite at a step before {when}"
            raise DivergedError(f"diverged: train/loss {seen}; try a lower optimizer.lr or head.s")
        # On CPU each self.log call costs Lightning about 0.5 ms of bookkeeping, 3% of a step of the seed recipe.
        # So epoch aggregates accumulate in torchmetrics objects and go to self.log once per epoch, and the step loss
        # is logged only on the steps the loggers write (every trainer.log_every_n_steps). No update below reads a
        # value back to the host, and the sample count is filled on the device (a tensor made from a Python
        # number would be a synchronising host-to-device copy).
        # The loss enters once per image (a view, no copy): torchmetrics' nan_strategy="disable" drops a `weight`
        # argument (Lightning-AI/torchmetrics#3434), and a short last batch must not count as a full one.
        self.train_loss.update(detached.expand(len(labels)))
        self.train_acc.update((preds == labels).to(detached.dtype))
        self.train_samples.update(detached.new_full((), len(labels)))
        if logging_step:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
            if self.head.margin_warmup_epochs:  # a host number: logged only where the step syncs anyway
                self.log("train/margin_scale", self._margin_scale(), on_step=True, on_epoch=False)
        return loss

    def on_train_start(self) -> None:
        self._warmup_steps = None  # the training set is known now; measured again at each fit

    def _margin_scale(self) -> float:
        """The margin warm-up's factor at this optimizer step (protocol.warmup_factor)."""
        if self._warmup_steps is None:
            batches = self.trainer.num_training_batches
            if math.isinf(batches):
                raise ConfigError(
                    f"head.margin_warmup_epochs={self.head.margin_warmup_epochs} needs a training loader with a "
                    "length (the warm-up counts its steps); allowed: 0 with this loader"
                )
            steps_per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches) if batches else 0
            self._warmup_steps = self.head.margin_warmup_epochs * steps_per_epoch
        return warmup_factor(self.global_step, self._warmup_steps)

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning sends this training step's logs to the loggers: every `log_every_n_steps` optimizer
        steps (global_step still counts the steps before this one), and every step under fast_dev_run."""
        every = self.trainer.log_every_n_steps
        return bool(self.trainer.fast_dev_run) or (every > 0 and (self.global_step + 1) % every == 0)

    def on_train_epoch_end(self) -> None:
        self.head.end_of_epoch(self.current_epoch)
        # Metric objects: Lightning computes them (synced over DDP ranks) and resets them for the next epoch
        self.log("train/loss", self.train_loss)  # mean over the epoch's images, all ranks
        self.log("train/acc", self.train_acc, prog_bar=True)
        self.log("train/samples", self.train_samples)  # images trained on this epoch, summed over ranks

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Metrics; the embeddings and labels go out to callbacks (callbacks.EmbeddingFigures)."""
        if self.held_out_classes:
            embeddings = self(batch[0])
            self._val_embeddings.append((embeddings.detach(), batch[1]))
        else:
            embeddings = self._evaluate(batch, "val", self.val_acc, self.val_acc_margin)
        return {"embeddings": embeddings.detach(), "labels": batch[1]}

    def on_validation_epoch_end(self) -> None:
        if self.held_out_classes:
            batches, self._val_embeddings = self._val_embeddings, []
            if self.trainer.sanity_checking:
                return
            metrics = self._log_embedding_metrics("val", batches)
            self.val_acc_best(metrics["precision_at_1"])
        elif self.trainer.sanity_checking:  # the sanity check's two batches are no epoch
            return
        else:
            self.val_acc_best(self.val_acc.compute())
        self.log(f"{SELECTION[self.hparams.val_split]}_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Loader 0: the test set (accuracy, loss, embeddings). Loader 1, in the open-set protocol: images of classes
        the head never saw, whose embeddings only feed the openset/* retrieval and verification metrics. The
        embeddings and labels also go out to callbacks."""
        if dataloader_idx == 0 and not self.held_out_classes:
            embeddings = self._evaluate(batch, "test", self.test_acc, self.test_acc_margin)
        else:
            embeddings = self(batch[0])
        self._test_embeddings.setdefault(dataloader_idx, []).append((embeddings.detach(), batch[1]))
        return {"embeddings": embeddings.detach(), "labels": batch[1]}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """L2-normalised embeddings of a batch of images, and its labels when the batch has them."""
        images, labels = (batch, None) if isinstance(batch, torch.Tensor) else (batch[0], batch[1])
        embeddings = heads.normalize(self(images).float())
        if self.predict_flip:  # the mirror's unit embedding added (serving/inference.with_flip: the same fusion)
            embeddings = heads.normalize(embeddings + heads.normalize(self(images.flip(-1)).float()))
        out = {"embeddings": embeddings}
        return out if labels is None else {**out, "labels": labels}

    def on_test_epoch_start(self) -> None:
        self._test_embeddings.clear()

    def on_test_epoch_end(self) -> None:
        """Retrieval and verification on each test loader's embeddings (gathered from every rank)."""
        for dataloader_idx, batches in sorted(self._test_embeddings.items()):
            self._log_embedding_metrics("test" if dataloader_idx == 0 else "openset", batches)
        self._test_embeddings.clear()  # free the memory

    def _log_embedding_metrics(self, stage: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Retrieval and verification metrics of one stage's embeddings, gathered from every rank, logged as
        <stage>/<name>; returned as tensors."""
        embeddings, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
        if self.trainer.world_size > 1:  # DistributedSampler gives every rank the same number of samples
            embeddings, labels = self.all_gather(embeddings).flatten(0, 1), self.all_gather(labels).flatten(0, 1)
        metrics = embedding_metrics(embeddings.cpu(), labels.cpu(), max_pairs=self.hparams.max_pairs)
        self.log_dict({f"{stage}/{name}": value for name, value in metrics.items()}, add_dataloader_idx=False)
        return metrics

    def _evaluate(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        stage: str,
        acc: MulticlassAccuracy,
        acc_margin: MulticlassAccuracy,
    ) -> torch.Tensor:
        loss, preds, margin_preds, labels, embeddings = self._step(batch)
        acc(preds, labels)
        acc_margin(margin_preds, labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, add_dataloader_idx=False)
        self.log(f"{stage}/acc", acc, prog_bar=True, add_dataloader_idx=False)
        self.log(f"{stage}/acc_margin", acc_margin, add_dataloader_idx=False)
        return embeddings

    def _step_seed(self) -> int:
        """For heads that draw per step (Partial FC's negatives): (the run's seed, step, rank), so a resumed run
        draws the same."""
        return (torch.initial_seed() * 1_000_003 + self.global_step) * 1_009 + self.global_rank

    def setup(self, stage: str) -> None:
        """The head's distributed setup, once the process group exists (Partial FC keeps this rank's centres)."""
        if self.trainer is not None:
            self.head.setup_distributed(self.trainer.accumulate_grad_batches)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Read by DDP when it wraps the model: the head's per-rank parameters."""
        return [f"head.{name}" for name in self.head.rank_local_parameters()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints are the same whatever the world size: every rank runs this, the head makes its per-rank
        entries whole on rank zero, the only rank that writes the file."""
        self.head.whole_state(checkpoint["state_dict"], prefix="head.")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.head.write_back(getattr(optimizer, "optimizer", optimizer))

    def configure_optimizers(self) -> Any:
        """The optimiser over the model's groups (training/param_groups.py) and the head's own; the scheduler with
        its absolute rates per group. Each group is listed in the log, at the rate the scheduler starts it at."""
        local = {name: self.head.get_parameter(name) for name in self.head.rank_local_parameters()}
        groups = param_groups.plan(self, self.group_settings, exclude=[f"head.{name}" for name in local])
        optimizer, scales = param_groups.build_optimizer(
            self.optimizer_factory, groups, self.head.optimizer_groups(), self.group_settings
        )
        configured: Any = optimizer
        if self.hparams.scheduler is not None:
            lr_scheduler = dict(self.hparams.scheduler)
            factory = dict(lr_scheduler["scheduler"])
            per_group = param_groups.per_group_rates(factory, scales)
            if "total_steps" in factory and factory["total_steps"] is None:
                factory["total_steps"] = self.trainer.estimated_stepping_batches
            lr_scheduler["scheduler"] = build_part(factory, "scheduler")(optimizer=optimizer, **per_group)
            configured = {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
        if self._trainer is None or self.trainer.is_global_zero:  # once, not per rank
            for line in param_groups.describe(optimizer, groups, {n: p.numel() for n, p in local.items()}):
                log.info(line)
        return configured
