"""Train: compose the config, fit, test the best checkpoint (by val/acc) once, write metrics.json.

    python -m arcface_lightning.train                                  # default: ArcFace + SimpleCNN on MNIST
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

Outputs go to the Hydra run dir (logs/<task_name>/runs/<time>_<pid>/): .hydra/ (config, overrides), tensorboard/,
checkpoints/ (last.ckpt and the best by val/acc), metrics.json.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from arcface_lightning.data import DataError, first_line
from arcface_lightning.module import ArcFaceModule, DivergedError

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def register_trainer_flags() -> None:
    """Store every Lightning Trainer flag with its default as config `trainer/lightning`, which trainer/default.yaml
    extends: `trainer.<any flag>=...` then works without `+`, and stays in step with the installed Lightning."""
    flags = {
        name: p.default
        for name, p in inspect.signature(L.Trainer.__init__).parameters.items()
        if name != "self" and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    }
    ConfigStore.instance().store(
        group="trainer", name="lightning", node={"_target_": "lightning.pytorch.Trainer", **flags}
    )


register_trainer_flags()
# ${repo_root:} in conf/paths: data/ and logs/ default to the repository, wherever the command is run from
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)
# ${pid:} in run and sweep dir names: two runs started in the same second never share a folder. Cached, so the
# jobs of a sweep (sent to other processes by launchers) see the launching process's value.
OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True, replace=True)


class ConfigError(ValueError):
    """A bad value on the command line or in a config file, found before any training starts."""


def one_line(error: BaseException) -> str:
    """The message a user needs: the root cause of Hydra's wrapped instantiation errors, first line only."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return first_line(error)


def write_metrics(output_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write metrics.json atomically (a reader never sees half a file); NaN/inf become null (strict JSON)."""
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def check_ckpt_path(ckpt_path: str | None, output_dir: Path | None = None) -> str | None:
    """A readable checkpoint file, or None. `last` means <run dir>/checkpoints/last.ckpt of this run's dir."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last" and output_dir is not None:
        ckpt_path = str(output_dir / "checkpoints" / "last.ckpt")
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path=last: no {ckpt_path}; pass hydra.run.dir=<the run dir to resume>")
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist; give the path of a .ckpt file")
    try:  # fail now, with one line, rather than after Lightning has set everything up
        torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ConfigError(f"ckpt_path={ckpt_path} is not a readable checkpoint: {one_line(error)}") from error
    return ckpt_path


def check_launch(cfg: DictConfig) -> None:
    """Lightning's `ddp` re-launches this script once per device; inside a Hydra multirun that would re-run the
    whole sweep in every child. Refuse that combination up front (SLURM starts one task per device itself)."""
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


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, ArcFaceModule, L.Trainer]:
    """Instantiate data module, model and trainer from the config (configuration errors surface here)."""
    datamodule = instantiate(cfg.data)

    def plain(node: Any) -> Any:  # checkpoints keep plain containers only (weights_only-safe)
        return None if node is None else OmegaConf.to_container(node, resolve=True)

    model = ArcFaceModule(
        backbone=plain(cfg.backbone),
        head=plain(cfg.head),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        channels_last=cfg.get("channels_last", True),
        **plain(cfg.get("evaluation") or {}),
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def hparams_for_tensorboard(cfg: DictConfig) -> dict[str, Any]:
    """A flat selection for TensorBoard's HPARAMS tab: each group's class and settings, seed, embedding size."""
    plumbing = {"data_dir", "download", "num_workers", "pin_memory", "eval_batch_size"}
    derived = {"embedding_size", "num_classes", "in_channels", "image_size"}  # interpolated from one place
    params: dict[str, Any] = {"seed": cfg.seed, "embedding_size": cfg.embedding_size}
    for group in ("data", "backbone", "head", "optimizer"):
        node = OmegaConf.to_container(cfg[group], resolve=True)
        params[group] = node.get("dataset") or node["_target_"].rsplit(".", 1)[-1]
        for key, value in node.items():
            keep = not key.startswith("_") and key not in plumbing and (group == "data" or key not in derived)
            if keep and isinstance(value, (int, float, str, bool)):
                params[f"{group}/{key}"] = value
    return params


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not k.endswith("_step")}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then test the checkpoint with the best val/acc; return the final metrics (also in metrics.json)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.output_dir))
    check_launch(cfg)
    try:
        datamodule, model, trainer = build(cfg)
    except (ValueError, TypeError, InstantiationException, MisconfigurationException) as error:
        raise ConfigError(one_line(error)) from error

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
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
            shown = {k: v for k, v in metrics.items() if k in ("val/acc_best", "test/acc", "test/acc_margin")}
            logger.log_hyperparams(hparams_for_tensorboard(cfg), metrics=shown, step=trainer.global_step)
            logger.finalize("success")  # flush now: readers (tests, TensorBoard) must not wait for the writer thread
    return {**metrics, "epochs": trainer.current_epoch, "best_checkpoint": best, "world_size": trainer.world_size}


def run(task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig, in_sweep: bool = False) -> dict[str, Any]:
    """Run a task and record its outcome in metrics.json (status ok, failed or diverged).

    Alone, a user error or a divergence exits with one line, and any other error keeps its traceback. In a sweep
    (`in_sweep`), every failure is recorded and logged and the job returns, so the other jobs and the report go on.
    """
    output_dir = Path(cfg.paths.output_dir)
    start = time.perf_counter()
    record: dict[str, Any] = {"seed": cfg.get("seed"), "status": "ok"}
    failure: BaseException | None = None
    try:
        record.update(task(cfg))
    except SIGTERMException:  # Lightning stopped at a step boundary; CheckpointOnSigterm saved last.ckpt
        record.update(status="interrupted", error=f"SIGTERM; resume: ckpt_path=last hydra.run.dir={output_dir}")
        write_metrics(output_dir, {**record, "wall_time_s": round(time.perf_counter() - start, 3)})
        raise SystemExit(f"interrupted: {record['error']}") from None
    except (ConfigError, DataError, DivergedError) as error:  # explained in one line
        failure = error
    except Exception as error:
        failure = error
        if in_sweep:
            log.exception("job failed")  # the traceback goes to this job's log file
    if failure is not None:
        status = "diverged" if isinstance(failure, DivergedError) else "failed"
        record.update(status=status, error=one_line(failure))
    record["wall_time_s"] = round(time.perf_counter() - start, 3)
    path = output_dir / "metrics.json"
    # One writer (rank zero under DDP); and a refused resume never overwrites the record of the run it names.
    refused = isinstance(failure, ConfigError) and path.exists()
    if rank_zero_only.rank == 0 and not refused:
        write_metrics(output_dir, record)
    if failure is None and rank_zero_only.rank == 0:
        log.info("run dir: %s", output_dir.resolve())
        log.info("metrics: %s", path)
        log.info("curves:  tensorboard --logdir %s", output_dir.resolve())
    elif in_sweep:
        log.error("%s: %s (%s)", record["status"], record["error"], output_dir)
    elif isinstance(failure, (ConfigError, DataError, DivergedError)):
        raise SystemExit(f"error: {record['error']}") from None
    else:
        raise failure
    return record


def check_group_choices(args: list[str]) -> None:
    """Refuse `group=name` when conf/<group>/ has no such file, in one line (Hydra's own message fills a screen)."""
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or "/" in key or not (CONF_DIR / key).is_dir() or "(" in value or value in ("", "null"):
            continue  # not one of our groups (hydra/launcher=... comes from plugins), or a sweep function
        choices = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        for name in value.split(","):
            if name not in choices:
                raise SystemExit(f"error: {key}={name} is not a config in conf/{key}/; allowed: {', '.join(choices)}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    metrics = run(train, cfg, in_sweep=HydraConfig.get().mode == RunMode.MULTIRUN)
    name = cfg.get("optimized_metric")
    # for Hydra sweepers (Optuna): a failed job returns NaN, which Optuna records as a failed trial
    return float(metrics.get(name) or math.nan) if name else None


def cli() -> None:
    check_group_choices(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
