"""What the entry points share around their task: checks at the start, the checkpoint path and loading it, and the
outcome (status ok, failed, diverged or interrupted) written to metrics.json, with one line on the console for a
user error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_utilities.core.rank_zero import rank_zero_only  # the object Lightning sets `.rank` on
from omegaconf import DictConfig, OmegaConf

from arcface_lightning.core.checks import (
    USER_ERRORS,
    BadValue,
    ConfigError,
    DivergedError,
    ModelError,
    Terminated,
    sigterm_exception,
)
from arcface_lightning.core.config import (
    CONF_DIR,
    check_run_keys,
    instantiate_node,
    named_error,
    one_line,
    print_config,
    register_configs,
    root_cause,
)
from arcface_lightning.core.overrides import check_overrides, upgrade_overrides
from arcface_lightning.core.registry import allow

if TYPE_CHECKING:
    import lightning as L

    from arcface_lightning.data.datamodule import ImageDataModule
    from arcface_lightning.serving.checkpoints import Checkpoint
    from arcface_lightning.training.module import ArcFaceModule

log = logging.getLogger(__name__)
Rewrite = Callable[[list[str]], list[str]]  # a command's own rewriting of its arguments (search: model=)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # where Lightning reads a rank


def global_rank() -> int:
    """This process's rank: the one Lightning set (rank_zero_only.rank), else the one its launcher's environment
    gives (as Lightning reads it on import), else 0. Lightning itself is not imported: the commands that use an
    export or an embeddings file never load it."""
    rank = getattr(rank_zero_only, "rank", None)
    if rank is None:
        rank = next((int(os.environ[key]) for key in RANK_VARIABLES if key in os.environ), 0)
    return int(rank)


def terminations() -> tuple[type[BaseException], ...]:
    """What a SIGTERM raises: checks.Terminated (writing.sigterm_raises), and Lightning's SIGTERMException (its
    loops stop at a step boundary) where Lightning is loaded; looked up when caught, so nothing imports it."""
    return (Terminated, sigterm_exception())  # the same class twice where Lightning is not loaded: harmless


def entry_point(config_name: str, task: Callable[[DictConfig], dict[str, Any]], rewrite: Rewrite | None = None):
    """A command's `main` (the Hydra job: conf/<config_name>.yaml composed, `task` run through `run`, its outcome
    in metrics.json; for sweepers, the value of `optimized_metric` where the config names one, NaN for a failed
    job) and `cli` (its console script: moved keys upgraded, `rewrite` applied, a bad override said in one line
    before Hydra composes anything, then `main`). Each entry module is left with its task:
    `main, cli = entry_point("eval", evaluate)`."""

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    @functools.wraps(task)  # main wraps task: Hydra names the job after task's module (<job>.log, --help), not this one
    def main(cfg: DictConfig) -> float | None:
        register_configs()  # also here: launchers run jobs in fresh processes, which need the resolvers too
        metrics = run(task, cfg, in_sweep=HydraConfig.get().mode == RunMode.MULTIRUN)
        name = cfg.get("optimized_metric")
        return float(metrics.get(name) or math.nan) if name else None

    def cli() -> None:
        register_configs()
        argv = upgrade_overrides(sys.argv[1:])
        sys.argv[1:] = rewrite(argv) if rewrite else argv  # hydra.main reads sys.argv
        check_overrides(sys.argv[1:], config_name=config_name)
        main()

    cli.__doc__ = f"the console script of {task.__module__}: conf/{config_name}.yaml, {task.__name__}()"
    return main, cli


def start(cfg: DictConfig) -> None:
    """What every entry point does first: check the top-level keys and the required ones (`???` in the command's
    YAML, named with its `usage` line), print the config if asked, set matmul precision."""
    check_run_keys(cfg)
    missing = [key for key in cfg if OmegaConf.is_missing(cfg, key)]
    if missing:
        usage = cfg.get("usage") or f"give {missing[0]}=<value>"
        raise ConfigError(f"{missing[0]} is required: {usage}")
    allow(cfg.get("allowed_targets"))
    if cfg.get("extras") and cfg.extras.get("print_config") and global_rank() == 0:
        print_config(cfg)
    precision = cfg.get("matmul_precision") or "highest"
    if precision != "highest" or "torch" in sys.modules:  # highest is torch's default: no import just to set it
        import torch

        torch.set_float32_matmul_precision(precision)


def check_ckpt_path(ckpt_path: str | None, output_dir: Path | None = None) -> Checkpoint | None:
    """The checkpoint, opened (memory-mapped: settings only), or None. `last` means <run dir>/checkpoints/last.ckpt
    of this run's dir. A file that is not a readable checkpoint fails now, in one line, rather than after Lightning
    has set everything up."""
    from arcface_lightning.serving.checkpoints import Checkpoint

    if ckpt_path is None:
        return None
    if ckpt_path == "last" and output_dir is not None:
        ckpt_path = str(output_dir / "checkpoints" / "last.ckpt")
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path=last: no {ckpt_path}; pass hydra.run.dir=<the run dir to resume>")
    try:
        return Checkpoint(ckpt_path)
    except ModelError as error:
        raise ConfigError(str(error)) from None


def read_record(output_dir: Path) -> dict[str, Any]:
    """The run dir's metrics.json as a dict; {} where there is none or it cannot be read (a killed run's)."""
    try:
        record = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def resume_point(cfg: DictConfig) -> Checkpoint | None:
    """The checkpoint a training run continues from: `ckpt_path`'s, or with `resume=auto` the run dir's own as it
    stands: nothing for a run that failed or diverged (it starts again) or that saved nothing yet, else the newest of
    checkpoints/last.ckpt (every epoch; a SIGTERM/Ctrl-C saves it where the run stopped) and Lightning's
    hpc_ckpt_<n>.ckpt (saved when SLURM signals a requeue). A finished run never gets here (run() returns first)."""
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume") != "auto":
        return check_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if cfg.get("ckpt_path") is not None:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} cannot combine with resume=auto, which picks the run dir's own "
                          "checkpoint; allowed: one of them")  # fmt: skip
    sweeper = HydraConfig.get().sweeper._target_ if HydraConfig.initialized() else ""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and "Resuming" not in sweeper:
        raise ConfigError(f"resume=auto resumes grid sweeps, not hydra/sweeper={sweeper.rsplit('.', 1)[-1]}; allowed: "
                          "Hydra's grid sweeps (comma lists, sweep=...); Optuna resumes its study from "
                          "hydra.sweeper.storage")  # fmt: skip
    status = read_record(output_dir).get("status")
    saved = [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")]
    saved = [path for path in saved if path.is_file()]
    if status in ("failed", "diverged") or not saved:
        why = f"{status}: starting again" if status in ("failed", "diverged") else "has no checkpoint: starting"
        log.info(f"resume=auto: {output_dir} {why}")
        return None
    newest = max(saved, key=lambda path: path.stat().st_mtime)
    log.info(f"resume=auto: continuing from {newest}")
    return check_ckpt_path(str(newest))


@contextlib.contextmanager
def sigint_as_sigterm() -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) handled like SIGTERM: while Lightning fits or tests, it has a SIGTERM handler that stops at
    the next step boundary (CheckpointOnSigterm then saves last.ckpt, and run() records `interrupted` and the resume
    line), so the first Ctrl-C is passed on to it. Outside Lightning's loops, or at a second Ctrl-C, it is the usual
    KeyboardInterrupt. Yields the list of SIGINTs received. A process started with SIGINT ignored (nohup, `&` in a
    script) keeps ignoring it."""
    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_sigint(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):  # Lightning's handler
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not k.endswith("_step")}


def write_metrics(output_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write metrics.json atomically (a reader never sees half a file); NaN/inf become null (strict JSON)."""
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_classes(datamodule: Any, output_dir: Path) -> None:
    """classes.json in the run dir: the class name of each of the head's class ids, where the data names them (a
    user's images; the same list is in every checkpoint, under the data module's state)."""
    classes = getattr(datamodule, "classes", None)
    if classes is not None and global_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "classes.json").write_text(json.dumps(classes, indent=0) + "\n")


def interrupted(record: dict[str, Any], output_dir: Path, began: float, signal_name: str) -> None:
    """Record a stopped run (status interrupted, and the command that resumes it where last.ckpt was saved) and
    exit non-zero: a stopped run must not pass for a finished one."""
    last = output_dir / "checkpoints" / "last.ckpt"
    resume = f"resume: ckpt_path=last hydra.run.dir={output_dir}" if last.is_file() else "nothing saved to resume"
    record.update(status="interrupted", error=f"{signal_name}; {resume}")
    if global_rank() == 0:
        write_metrics(output_dir, {**record, "wall_time_s": round(time.perf_counter() - began, 3)})
    raise SystemExit(f"interrupted: {record['error']}") from None


def run(task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig, in_sweep: bool = False) -> dict[str, Any]:
    """Run a task and record its outcome in metrics.json (status ok, failed or diverged).

    Alone, a user error or a divergence exits with one line, and any other error keeps its traceback. In a sweep
    (`in_sweep`), every failure is recorded and logged and the job returns, so the other jobs and the report go on.
    """
    output_dir = Path(cfg.paths.output_dir)
    previous = read_record(output_dir) if cfg.get("resume") == "auto" else {}
    if previous.get("status") == "ok":  # in a sweep the sweeper does not launch it (hydra_plugins/...resume)
        log.info(f"resume=auto: {output_dir} finished already: nothing to do (its metrics.json)")
        return previous
    began = time.perf_counter()
    record: dict[str, Any] = {"seed": cfg.get("seed"), "status": "ok"}
    failure: BaseException | None = None
    with sigint_as_sigterm() as sigints:
        try:
            record.update(task(cfg))
        except terminations():  # Lightning stopped at a step boundary (CheckpointOnSigterm saved last.ckpt), or
            # a SIGTERM in sigterm_raises
            interrupted(record, output_dir, began, "SIGINT" if sigints else "SIGTERM")
        except (KeyboardInterrupt, SystemExit) as error:  # Ctrl-C outside Lightning's loops, or Lightning's exit(1)
            if not sigints or (isinstance(error, SystemExit) and error.code in (0, None)):
                raise
            interrupted(record, output_dir, began, "SIGINT")
        except USER_ERRORS as error:
            failure = error
        except Exception as error:
            failure = error
            if in_sweep:
                log.exception("job failed")  # the traceback goes to this job's log file
    if failure is not None:
        status = "diverged" if isinstance(failure, DivergedError) else "failed"
        record.update(status=status, error=one_line(failure))
    record["wall_time_s"] = round(time.perf_counter() - began, 3)
    path = output_dir / "metrics.json"
    # One writer (rank zero under DDP); and a refused resume never overwrites the record of the run it names.
    refused = isinstance(failure, ConfigError) and path.exists()
    if global_rank() == 0 and not refused:
        write_metrics(output_dir, record)
    if failure is None:
        if global_rank() == 0:
            log.info("run dir: %s", output_dir.resolve())
            log.info("metrics: %s", path)
            if any(output_dir.glob("**/events.out.tfevents.*")):
                log.info("curves:  tensorboard --logdir %s", output_dir.resolve())
    elif in_sweep:
        log.error("%s: %s (%s)", record["status"], record["error"], output_dir)
    elif isinstance(failure, USER_ERRORS):
        raise SystemExit(f"error: {record['error']}") from None
    else:
        raise failure
    return record


def build_trainer(cfg: DictConfig, *extra: Any, configured: bool = True) -> L.Trainer:
    """The Trainer of `cfg.trainer`, with the callbacks and loggers `cfg` configures (`configured`) and `extra`
    callbacks. train, evaluate and embed's prediction assemble it here."""
    names = (cfg.get("callbacks") or {}) if configured else {}
    callbacks = [instantiate_node(cfg, f"callbacks.{name}") for name in names]
    loggers = [instantiate_node(cfg, f"logger.{name}") for name in cfg.get("logger") or {}] if configured else []
    return instantiate_node(cfg, "trainer", callbacks=[*callbacks, *extra], logger=loggers or False)


def load_checkpoint(cfg: DictConfig, checkpoint: Checkpoint | str) -> tuple[ArcFaceModule, ImageDataModule]:
    """The module and its data module from a checkpoint (opened here if given as a path); `cfg.data` keys that are
    not null override the data module's saved values (where the files are, how they are loaded). evaluate and embed.
    Imports Lightning, the model and the data modules (seconds): only here, where a checkpoint is loaded."""
    from arcface_lightning.serving.checkpoints import Checkpoint

    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    model = checkpoint.module()  # one line naming the file where the settings or weights do not build
    try:  # model and data settings (dataset, normalisation, split) both come from the checkpoint
        given = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if v is not None}
        return model, checkpoint.data_module(**given)  # null: the checkpoint's value
    except Exception as error:  # a bad data.* value from the command line, or not a checkpoint of this model
        if isinstance(root_cause(error), BadValue):
            raise named_error(cfg, "data", error) from error
        raise ConfigError(f"ckpt_path={checkpoint.path} could not be loaded: {one_line(error)}") from error
