"""Train: compose the config, fit, test the best checkpoint (by val/acc) once, write metrics.json.

    python -m arcface_lightning.train                                  # the default experiment (mnist_default)
    python -m arcface_lightning.train experiment=seed_mnist            # the seed script's recipe, measured right
    python -m arcface_lightning.train experiment=mnist_fast            # ≥ 99% in under 20 s on 2 CPU cores
    python -m arcface_lightning.train experiment=mnist_3d              # 3-D embeddings: sphere.png in the run dir
    python -m arcface_lightning.train experiment=seed_mnist debug=profile   # where an epoch's time goes
    python -m arcface_lightning.train head.s=16 head.m=0.3 embedding_size=64 trainer.max_epochs=5
    python -m arcface_lightning.train head=cosface data=fashion_mnist data.batch_size=128 seed=1
    python -m arcface_lightning.train hydra.run.dir=logs/train/runs/<run> ckpt_path=last   # resume that run
    python -m arcface_lightning.train -m head.s=8,16,32 head.m=0.1,0.3,0.5               # sweep (+ report)
    python -m arcface_lightning.train trainer=ddp_cpu                                     # DDP, 2 CPU processes
    python -m arcface_lightning.train --cfg job                        # print the composed config, run nothing
    python -m arcface_lightning.train debug=fdr                        # one batch per stage: does it run?

Outputs go to the Hydra run dir (logs/<task_name>/runs/<time>_<pid>/): .hydra/ (config, overrides), tensorboard/,
checkpoints/ (last.ckpt and the best by val/acc), metrics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from arcface_lightning.core.checks import BadValue
from arcface_lightning.core.config import (
    CONF_DIR,
    REPO_ROOT,
    ConfigError,
    check_types,
    instantiate_node,
    named_error,
    register_configs,
    root_cause,
    selection_metric,
)
from arcface_lightning.core.registry import TargetNotAllowed, check_lr_scheduler, check_part, current_target
from arcface_lightning.core.runs import (
    build_trainer,
    entry_point,
    final_metrics,
    resume_point,
    run,
    start,
    write_classes,
)
from arcface_lightning.models.head_memory import GIB, available_bytes, head_memory, optimizer_state_per_value
from arcface_lightning.models.partial_fc import AUTO_SHARD_CLASSES
from arcface_lightning.serving.checkpoints import Checkpoint
from arcface_lightning.training.callbacks import ContractInCheckpoint, pair_metric_prefixes, pair_sets
from arcface_lightning.training.module import ArcFaceModule, build_part
from arcface_lightning.training.param_groups import split_optimizer_config

# beside the hyper-parameters in TensorBoard's HPARAMS tab (by_class runs have no closed-set accuracy)
HPARAMS_METRICS = ("val/acc_best", "val/precision_at_1_best", "test/acc", "test/acc_margin", "test/precision_at_1")
__all__ = [
    "CONF_DIR",
    "REPO_ROOT",
    "build",
    "cli",
    "main",
    "register_configs",
    "run",
    "train",
]  # what notebooks and scripts use
log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then test the checkpoint with the best val/acc; return the final metrics (also in metrics.json)."""
    start(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    resumed = resume_point(cfg)
    check_launch(cfg)
    datamodule, model, trainer = build(cfg)
    if resumed is not None:
        check_resume(model, resumed)
    write_classes(datamodule, Path(cfg.paths.output_dir))

    # Lightning reads a resumed checkpoint again itself, to restore the loops, optimisers and callbacks
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resumed.path) if resumed else None)
    metrics = final_metrics(trainer.callback_metrics)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None:  # now: loading the best checkpoint for the test restores its (earlier) training time
        metrics["time/fit_s"] = round(timer.time_elapsed("train"), 3)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    # Test once, on the model selected by validation; with no checkpoint (fast_dev_run) the final weights.
    for results in trainer.test(model, datamodule=datamodule, ckpt_path=best or None):
        metrics.update(final_metrics(results))
    if timer is not None:
        metrics["time/test_s"] = round(timer.time_elapsed("test"), 3)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            shown_keys = (
                "val/acc_best",
                "val/precision_at_1_best",
                "test/acc",
                "test/acc_margin",
                "test/precision_at_1",
            )
            shown = {k: v for k, v in metrics.items() if k in shown_keys}
            logger.log_hyperparams(hparams_for_tensorboard(cfg), metrics=shown, step=trainer.global_step)
            logger.finalize("success")  # flush now: readers (tests, TensorBoard) must not wait for the writer thread
    return {
        **metrics,
        "epochs": trainer.current_epoch,
        "best_checkpoint": best,
        "world_size": trainer.world_size,
        "tags": list(cfg.get("tags") or []),
    }


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, ArcFaceModule, L.Trainer]:
    """Instantiate data module, model and trainer from the config; a bad value raises a ConfigError naming its key."""
    check_selection(cfg)
    datamodule = instantiate_node(cfg, "data")
    num_classes = datamodule.count_classes()  # a user's images: indexed now, their classes named and counted
    if cfg.data.get("num_classes") is None:  # for the head's ${data.num_classes}
        cfg.data.num_classes = num_classes
    make_optimizer = check_optimization(cfg)
    trainer = build_trainer(cfg, ContractInCheckpoint())  # not a config choice: every checkpoint has its contract
    check_head_memory(cfg, make_optimizer, trainer)
    try:
        # conf/model/: the backbone, head, optimizer and scheduler groups wired up. From a plain copy: Hydra resolves
        # the node it instantiates in place, and the error below needs cfg's interpolations to name their source.
        model = instantiate(OmegaConf.to_container(cfg.model, resolve=True))
    except Exception as error:  # name the group the failing class was configured in (model: its own arguments)
        cause = root_cause(error)
        if isinstance(cause, TargetNotAllowed):  # it names the group's key already (optimizer._target_=...)
            raise ConfigError(str(cause)) from error
        text, owner = str(error), getattr(cause, "owner", None)
        targets = {group: cfg[group]._target_ for group in ("backbone", "head")}
        groups = [g for g, target in targets.items() if f"'{target}'" in text or target.endswith(f".{owner}")]
        groups += ["head"] if owner == "PartialFC" else []  # head.sample_rate / head.sharded wrap the head
        raise named_error(cfg, groups[0] if groups else "model", error) from error
    return datamodule, model, trainer


def check_selection(cfg: DictConfig) -> None:
    """`evaluation.select` must name a metric one of `evaluation.pairs` logs (pairs/<metric> for one set,
    pairs/<set>/<metric> for a list), before any work: ModelCheckpoint would say so only after the first epoch."""
    select = OmegaConf.select(cfg, "evaluation.select", default=None)
    if select is None:
        return
    selection_metric(cfg.data.val_split, "name", select)  # the form of the name
    metric = str(select).rpartition("/")[2]
    pairs = pair_sets(OmegaConf.select(cfg, "evaluation.pairs", default=None))
    logged = [f"{prefix}/{metric}" for prefix in pair_metric_prefixes(pairs)]
    if select not in logged:
        raise ConfigError(f"evaluation.select={select} is not a metric of evaluation.pairs; allowed: "
                          f"{', '.join(logged) or 'none (evaluation.pairs is null)'}")  # fmt: skip


def check_head_memory(cfg: DictConfig, make_optimizer: Any, trainer: L.Trainer) -> None:
    """Log what the head's weights, gradients and optimiser state will take per process, before the head exists,
    and refuse in one line when that alone exceeds the memory the process can have (models/head_memory.py)."""
    head = OmegaConf.to_container(cfg.head, resolve=True)
    sample_rate, sharded = head.pop("sample_rate", 1.0), head.pop("sharded", False)
    try:
        with torch.device("meta"):  # the parameters' shapes without their memory
            values = sum(p.numel() for p in build_part(current_target(head), "head").parameters())
        classes, size = int(head["num_classes"]), int(head["embedding_size"])
    except Exception:  # a bad head value: the model's build names it next, in its own words
        return
    world = trainer.world_size
    shards = world > 1 and (sharded is True or (sharded == "auto" and classes >= AUTO_SHARD_CLASSES))
    memory = head_memory(values, classes, size, optimizer_state_per_value(make_optimizer), sample_rate, shards, world,
                         global_batch=int(cfg.data.batch_size) * world)  # fmt: skip
    device = trainer.strategy.root_device
    available = available_bytes(device, processes_on_host=1 if device.type == "cuda" else trainer.num_devices)
    log.info(f"head memory: {memory.describe()}; this process can have {available / GIB:.1f} GiB")
    if memory.total > available:
        raise ConfigError(
            f"head: its weights, gradients and optimiser state take {memory.total / GIB:.2f} GiB per process "
            f"({memory.rows}), more than the {available / GIB:.1f} GiB this process can have; allowed: fewer "
            "classes, head.sample_rate < 1, or head.sharded=true over more devices"
        )


def check_optimization(cfg: DictConfig) -> Any:
    """Build the optimizer and scheduler once on a stand-in parameter, so that a bad value fails now, in one line,
    and not when Lightning calls configure_optimizers after setting everything up. Returns the optimizer's factory."""
    check_part(OmegaConf.to_container(cfg.optimizer, resolve=True), "optimizer")
    if cfg.get("scheduler") is not None:
        check_lr_scheduler(OmegaConf.to_container(cfg.scheduler, resolve=True))
    for key in ("lr", "weight_decay", "momentum"):  # torch's own messages do not name the key
        value = cfg.optimizer.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise ConfigError(f"optimizer.{key}={value!r} is invalid; allowed: a number ≥ 0")
    try:  # no_decay_norm_bias and head_lr_scale are the module's, not torch.optim's (training/param_groups.py)
        torch_config = split_optimizer_config(OmegaConf.to_container(cfg.optimizer, resolve=True))[0]
    except BadValue as error:
        raise ConfigError(f"optimizer.{error.name}={error.value!r} is invalid; allowed: {error.allowed}") from error
    try:
        check_types(OmegaConf.create(torch_config), "optimizer")
        make_optimizer = instantiate(torch_config)
        optimizer = make_optimizer(params=[torch.nn.Parameter(torch.zeros(1))])
    except ConfigError:
        raise
    except Exception as error:
        raise named_error(cfg, "optimizer", error) from error
    if cfg.get("scheduler") is None:
        return make_optimizer
    factory = OmegaConf.select(cfg, "scheduler.scheduler")
    if factory is None:
        raise ConfigError("scheduler.scheduler is missing: the config of a partial torch.optim.lr_scheduler class")
    if factory.get("total_steps", 0) is None:
        factory = OmegaConf.merge(factory, {"total_steps": 1})
    check_types(factory, "scheduler.scheduler")
    try:
        instantiate(factory)(optimizer=optimizer)
    except Exception as error:
        raise named_error(cfg, "scheduler.scheduler", error) from error
    interval = cfg.scheduler.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ConfigError(f"scheduler.interval={interval!r} is invalid; allowed: epoch, step")
    return make_optimizer


def check_resume(model: ArcFaceModule, checkpoint: Checkpoint) -> None:
    """The checkpoint to resume holds the tensors this config builds, shape for shape: one line naming the first
    that differs (another embedding_size, backbone or number of classes), not Lightning's state_dict error."""
    saved, ckpt_path = checkpoint.data["state_dict"], checkpoint.path
    built = model.state_dict()
    for name, tensor in built.items():
        if name not in saved and not name.endswith("num_batches_tracked"):
            raise ConfigError(f"ckpt_path={ckpt_path} has no {name}: it is not a checkpoint of this model's config")
        if name in saved and tuple(saved[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"ckpt_path={ckpt_path} holds {name} of shape {tuple(saved[name].shape)} but this config builds "
                f"{tuple(tensor.shape)}: resume with the settings it was trained with (embedding_size, backbone, "
                "head, data)"
            )
    extra = [name for name in saved if name not in built and not name.startswith("head.state_")]
    if extra:
        raise ConfigError(f"ckpt_path={ckpt_path} holds {extra[0]}, which this config does not build")


def check_launch(cfg: DictConfig) -> None:
    """Lightning's `ddp` re-launches this script once per device; inside a Hydra multirun that would re-run the
    whole sweep in every child. Refuse that combination up front (SLURM starts one task per device itself)."""
    sample_rate, sharded = cfg.head.get("sample_rate", 1.0), cfg.head.get("sharded", False)
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    if accumulate != 1 and (sample_rate != 1.0 or sharded is True):
        key = "head.sample_rate" if sample_rate != 1.0 else "head.sharded"
        value = sample_rate if sample_rate != 1.0 else sharded
        raise ConfigError(
            f"{key}={value} cannot combine with trainer.accumulate_grad_batches={accumulate}: Partial FC steps its "
            "sampled centres at every batch; allowed: trainer.accumulate_grad_batches=1"
        )
    strategy, devices = str(cfg.trainer.get("strategy")), cfg.trainer.get("devices")
    relaunches = strategy.startswith("ddp") and not any(k in strategy for k in ("spawn", "fork", "notebook"))
    several = str(devices) not in ("1", "auto", "None") or (cfg.trainer.get("num_nodes") or 1) > 1
    in_multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if relaunches and several and in_multirun and not SLURMEnvironment.detect():
        raise ConfigError(
            f"trainer.strategy={strategy} with several devices cannot run inside a Hydra multirun (-m): it "
            "re-launches the script per device. Use trainer.strategy=ddp_spawn, or one device per job "
            "(hydra/launcher=joblib, submitit_slurm)"
        )


def hparams_for_tensorboard(cfg: DictConfig) -> dict[str, Any]:
    """A flat selection for TensorBoard's HPARAMS tab: each group's class and settings, seed, embedding size."""
    plumbing = {"data_dir", "download", "num_workers", "pin_memory", "eval_batch_size"}
    derived = {"embedding_size", "num_classes", "in_channels", "image_size"}  # interpolated from one place
    params: dict[str, Any] = {"seed": cfg.seed, "embedding_size": cfg.embedding_size}
    if cfg.get("tags"):
        params["tags"] = ",".join(cfg.tags)
    for group in ("data", "backbone", "head", "optimizer"):
        node = OmegaConf.to_container(cfg[group], resolve=True)
        params[group] = node.get("dataset") or node["_target_"].rsplit(".", 1)[-1]
        for key, value in node.items():
            keep = not key.startswith("_") and key not in plumbing and (group == "data" or key not in derived)
            items = value.items() if isinstance(value, dict) else [("", value)]  # one level of nodes: data.augment
            for sub, leaf in items if keep else ():
                if isinstance(leaf, (int, float, str, bool)):
                    params[f"{group}/{key}.{sub}" if sub else f"{group}/{key}"] = leaf
    return params


main, cli = entry_point("train", train)


if __name__ == "__main__":
    cli()
