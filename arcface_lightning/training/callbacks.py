"""Lightning callbacks of the project, switched on in conf/callbacks/."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from arcface_lightning.core.checks import BadValue, check_int
from arcface_lightning.data.bin_pairs import BinPairs, read_bin
from arcface_lightning.data.images import ImageFiles
from arcface_lightning.data.pairs import PairList, read_pairs
from arcface_lightning.evaluation.figures import angle_figure, class_angles, sphere_figure
from arcface_lightning.evaluation.metrics import best_threshold, pair_metrics, sample_pairs, threshold_at_far
from arcface_lightning.models.heads import normalize
from arcface_lightning.serving.checkpoints import contract_entry
from arcface_lightning.serving.contract import CONTRACT_KEY, far_key

log = logging.getLogger(__name__)


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (pre-emption, `kill`) Lightning stops at the next step; save last.ckpt before the process ends.

    The checkpoint is mid-epoch: resuming from it continues the step count, not the exact batch order.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
            log.info("SIGTERM: saved %s", self.dirpath / "last.ckpt")


class EmbeddingFigures(L.Callback):
    """TensorBoard figures of the embeddings, fed from the module's validation and test step outputs
    (`{"embeddings", "labels"}`); nothing without a TensorBoard logger, and only rank zero writes.

    - every validation epoch: the angle figure (angle to the own class centre against the nearest other centre)
      and the histograms of both angles, on rank zero's share of the validation set;
    - at test: the same for the test set, the first `projector_samples` test embeddings with their thumbnails in the
      PROJECTOR tab, and for 2-D or 3-D embeddings the circle/sphere figure, also saved as <run dir>/sphere.png.
      Test embeddings are gathered from every rank; the thumbnails are rank zero's, which lead the gathered rows.
    """

    def __init__(self, enabled: bool = True, projector_samples: int = 2000) -> None:
        check_int(type(self).__name__, "projector_samples", projector_samples, minimum=0)
        self.enabled, self.projector_samples = enabled, projector_samples
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._test: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._thumbnails: list[torch.Tensor] = []

    @staticmethod
    def _writer(trainer: L.Trainer) -> Any:
        return next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def _active(self, trainer: L.Trainer) -> bool:
        return self.enabled and self._writer(trainer) is not None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer) and trainer.is_global_zero and not trainer.sanity_checking:
            self._val.append((outputs["embeddings"].cpu(), outputs["labels"].cpu()))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches, self._val = self._val, []
        if batches:
            self._log_angles(trainer, pl_module, "val", *(torch.cat(parts) for parts in zip(*batches, strict=True)))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test, self._thumbnails = [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._active(trainer) or dataloader_idx != 0:  # loader 1 is the open set: metrics only
            return
        self._test.append((outputs["embeddings"], outputs["labels"]))
        if sum(len(t) for t in self._thumbnails) < self.projector_samples:
            self._thumbnails.append(batch[0].detach().cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches, self._test = self._test, []
        if not batches:
            return
        embeddings, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
        if trainer.world_size > 1:  # every rank takes part in the gather; rank zero writes
            embeddings, labels = (
                pl_module.all_gather(embeddings).flatten(0, 1),
                pl_module.all_gather(labels).flatten(0, 1),
            )
        if trainer.is_global_zero:
            self._log_test(trainer, pl_module, embeddings.float().cpu(), labels.cpu())
        self._thumbnails = []

    @staticmethod
    def _centres(pl_module: L.LightningModule) -> torch.Tensor | None:
        """The head's class centres; None for identities the head never learnt (held-out classes: no centre) and
        for centres sharded across ranks (Partial FC: each rank holds a slice, and only rank zero draws)."""
        if getattr(pl_module, "held_out_classes", False) or getattr(pl_module.head, "world", 1) > 1:
            return None
        head = pl_module.head  # one centre per class: a sub-centre head gives each class's dominant one
        centres = head.class_centres() if hasattr(head, "class_centres") else head.weight
        return centres.detach().float().cpu()

    def _log_angles(self, trainer, pl_module, stage: str, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        centres = self._centres(pl_module)
        if centres is None:
            return
        writer, step = self._writer(trainer), trainer.global_step
        own, nearest_other = class_angles(embeddings, labels, centres)
        writer.add_figure(f"{stage}/angles", angle_figure(own, nearest_other, centres), step)
        writer.add_histogram(f"{stage}/angle_to_own_centre", own, step)
        writer.add_histogram(f"{stage}/angle_to_nearest_other_centre", nearest_other, step)

    def _log_test(self, trainer, pl_module, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        writer = self._writer(trainer)
        images = torch.cat(self._thumbnails).float()
        n = min(self.projector_samples, len(images))
        images = images[:n]
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        thumbnails = (images - low) / (high - low).clamp_min(1e-8)  # each image to [0, 1] for the sprite
        writer.add_embedding(
            embeddings[:n],
            metadata=labels[:n].tolist(),
            label_img=thumbnails,
            global_step=trainer.global_step,
            tag="test/embeddings",
        )
        self._log_angles(trainer, pl_module, "test", embeddings, labels)
        centres = self._centres(pl_module)
        if embeddings.shape[1] in (2, 3) and centres is not None:
            figure = sphere_figure(embeddings, labels, centres)
            figure.savefig(Path(trainer.default_root_dir) / "sphere.png")
            writer.add_figure("test/sphere", figure, trainer.global_step)


def pair_sets(pairs: str | Path | list | None) -> list[Path]:
    """`evaluation.pairs` as a list of paths (null: none; one file or a list of them)."""
    paths = [] if not pairs else [pairs] if isinstance(pairs, (str, Path)) else list(pairs)
    return [Path(p).expanduser() for p in paths]


def pair_metric_prefixes(paths: list[Path]) -> list[str]:
    """Where each set's metrics are logged: pairs/ for a single set, pairs/<file stem>/ for a list."""
    return ["pairs"] if len(paths) == 1 else [f"pairs/{p.stem}" for p in paths]


class PairVerification(L.Callback):
    """`evaluation.pairs`: pair sets verified at every validation epoch and at every test. A set is a pair list
    (data/pairs.py: CSV or LFW's pairs.txt) or insightface's `.bin` (data/bin_pairs.py: lfw.bin, cfp_fp.bin, …, read
    as data only). One set is logged as pairs/verification_acc and pairs/verification_acc_std (over its folds, the
    threshold chosen on the other folds: the LFW protocol), pairs/verification_auc, pairs/tar_at_far_1e-3 and 1e-4,
    pairs/threshold (the mean of the folds' thresholds, a cosine); a list of sets as pairs/<name>/<metric>, the name
    being the file's stem (lfw.bin → pairs/lfw/…). Every set is read, and every image checked, at setup, before any
    training. Images are decoded at the data module's image_size and in_channels and prepared as its batches are,
    so a model sees pair images exactly as its test images. `flip`: each image's embedding is the sum of its own and
    its horizontal mirror's unit embeddings, normalised (the field's test-time practice; embed and verify fuse the
    same way, serving/inference.with_flip).

    Every process embeds every set (LFW has 7,701 distinct images, a .bin 12,000), so under DDP each rank logs the
    same numbers without a gather.
    """

    def __init__(
        self, pairs: str | list[str] | None = None, batch_size: int = 256, num_workers: int = 0, flip: bool = False
    ) -> None:
        check_int(type(self).__name__, "batch_size", batch_size)
        check_int(type(self).__name__, "num_workers", num_workers, minimum=0)
        self.paths = pair_sets(pairs)
        names = [p.stem for p in self.paths]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise BadValue(type(self).__name__, "pairs", pairs, f"sets of distinct file names ({twice!r} twice)")
        self.batch_size, self.num_workers, self.flip = batch_size, num_workers, bool(flip)
        self.sets: dict[str, PairList | BinPairs] = {}
        self._decoded: dict[tuple[str, int, int], torch.Tensor] = {}  # a .bin's images, decoded once per size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for path in self.paths:
            if path.stem not in self.sets:
                self.sets[path.stem] = read_bin(path) if path.suffix == ".bin" else read_pairs(path)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._verify(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._verify(trainer, pl_module)

    def _verify(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for path, prefix in zip(self.paths, pair_metric_prefixes(self.paths), strict=True):
            name, pairs = path.stem, self.sets[path.stem]
            x = self._embed(name, pairs, trainer, pl_module)
            if isinstance(pairs, BinPairs):
                a = torch.arange(0, len(x), 2)
                b, same, fold = a + 1, torch.from_numpy(pairs.same), torch.from_numpy(pairs.fold)
            else:
                a, b, same, fold = pairs.a, pairs.b, pairs.same, pairs.fold
            metrics = pair_metrics((x[a] * x[b]).sum(1), same, fold)
            pl_module.log_dict({f"{prefix}/{key}": value for key, value in metrics.items()}, add_dataloader_idx=False)

    def _embed(self, name: str, pairs: PairList | BinPairs, trainer: L.Trainer, pl_module: L.LightningModule):
        data = trainer.datamodule
        channels, size = data.hparams.in_channels, data.hparams.image_size
        if isinstance(pairs, BinPairs):
            key = (name, channels, size)
            if key not in self._decoded:
                self._decoded[key] = torch.from_numpy(pairs.decoded(channels, size))
            batches = self._decoded[key].split(self.batch_size)
        else:
            files = ImageFiles(pairs.index(), channels, size)
            batches = (images for images, _ in DataLoader(files, self.batch_size, num_workers=self.num_workers))
        parts = []
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for images in batches:
                prepared = data.prepare(images.to(pl_module.device))
                embeddings = normalize(pl_module(prepared).float())
                if self.flip:  # the mirror's unit embedding added: the fusion embed and verify use
                    embeddings = embeddings + normalize(pl_module(prepared.flip(-1)).float())
                parts.append(embeddings)
        pl_module.train(was_training)
        return normalize(torch.cat(parts)).cpu()


class VerificationThresholds(L.Callback):
    """Cosine thresholds for `verify`, chosen on the validation images at each validation epoch and saved in every
    checkpoint written after it (in its contract, `arcface_contract`), so the best checkpoint carries the thresholds of
    its own epoch: `far=1e-3` (accepts at most 0.1% of different-identity pairs), one per entry of `fars`, and
    `best_accuracy` (the highest pair accuracy). Pairs: all pairs of validation embeddings, or a seeded balanced
    sample of `max_pairs` (metrics.sample_pairs); a FAR needs at least 1/FAR different-class pairs, else it is left
    out with a warning. Validation embeddings are gathered from every rank (equal shares: Lightning's distributed
    sampler pads them), so every rank computes the same thresholds."""

    def __init__(self, fars: tuple[float, ...] = (1e-3, 1e-4), max_pairs: int = 200_000) -> None:
        check_int(type(self).__name__, "max_pairs", max_pairs, minimum=2)
        self.fars, self.max_pairs = tuple(float(f) for f in fars), max_pairs
        self.thresholds: dict[str, float] = {}
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._val.append((outputs["embeddings"].detach(), outputs["labels"]))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches, self._val = self._val, []
        if not batches:
            return
        embeddings, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
        if trainer.world_size > 1:
            embeddings, labels = (pl_module.all_gather(t).flatten(0, 1) for t in (embeddings, labels))
        x, labels = normalize(embeddings.float()).cpu(), labels.cpu()
        i, j = sample_pairs(labels, self.max_pairs)
        scores, same = (x[i] * x[j]).sum(1), labels[i] == labels[j]
        if same.all() or not same.any():
            log.warning("verification thresholds not chosen: validation pairs need both same and different classes")
            return
        thresholds = {"best_accuracy": best_threshold(scores, same)}
        for far in self.fars:
            try:
                thresholds[far_key(far)] = threshold_at_far(scores, same, far)
            except ValueError as error:
                log.warning("verification threshold not chosen: %s", error)
        self.thresholds = thresholds

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.thresholds:
            checkpoint.setdefault(CONTRACT_KEY, {})["thresholds"] = dict(self.thresholds)


class ContractInCheckpoint(L.Callback):
    """Writes the preprocessing contract into every checkpoint, under `arcface_contract` (checkpoints.py reads it):
    the data module's image size, channels and normalisation, the embedding size, the class names and a format
    version (VerificationThresholds adds the thresholds to the same entry). train.py adds it to every training."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        datamodule = trainer.datamodule
        embedding_size = getattr(pl_module.backbone, "embedding_size", None)
        if datamodule is None or embedding_size is None:  # a loop of the user's own, a backbone without the size
            return
        entry = contract_entry(datamodule.hparams, embedding_size, getattr(datamodule, "classes", None))
        checkpoint.setdefault(CONTRACT_KEY, {}).update(entry)
