"""A grid sweep that survives pre-emption: `python -m arcface_lightning.train -m ... resume=auto
hydra.sweep.dir=<the sweep dir>` reruns the same command into the same folder and launches only the jobs that have
not finished. A job whose metrics.json says `ok` is not launched at all, so its folder stays as it was (Hydra would
rewrite its .hydra/ files); the others run, and the training task resumes each from its own checkpoint
(train.resume_point). The sweep's job numbers, and so its folders, are those of the first run: each batch is split
around the finished jobs and the launcher is given the first index of each remaining run of jobs.

Hydra only instantiates sweepers from the `hydra_plugins` namespace, hence this package beside arcface_lightning;
it imports nothing heavier than Hydra, since Hydra imports every plugin module at start.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


class ResumingSweeper(BasicSweeper):
    """Hydra's BasicSweeper; with `resume=auto` its launcher skips the finished jobs of the sweep dir."""

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if config.get("resume") == "auto":
            self.launcher = SkipFinished(self.launcher, hydra_context.config_loader, config)


class SkipFinished:
    """Stands in for the sweep's launcher: each batch minus the jobs whose folder holds an `ok` metrics.json."""

    def __init__(self, launcher: Any, config_loader: Any, config: DictConfig) -> None:
        self.launcher, self.config_loader, self.config = launcher, config_loader, config

    def job_dir(self, overrides: Sequence[str], index: int) -> Path:
        """The folder Hydra gives job `index` with these overrides (hydra.sweep.dir / hydra.sweep.subdir)."""
        job = self.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(job):
            job.hydra.job.num = index
        return Path(job.hydra.sweep.dir) / str(job.hydra.sweep.subdir)

    def finished(self, overrides: Sequence[str], folder: Path) -> JobReturn | None:
        """The job's outcome when its folder holds an `ok` record of these very overrides; None: launch it."""
        try:
            record = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("status") != "ok":
            return None
        try:
            ran = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
        except (OSError, yaml.YAMLError):
            ran = None
        if not isinstance(ran, list) or without_resume(ran) != without_resume(overrides):
            theirs = [o for o in without_resume(ran or []) if o not in overrides]
            ours = [o for o in without_resume(overrides) if o not in (ran or [])]
            # SystemExit, not an exception: Hydra would print a traceback; the entry points' user errors read so too
            raise SystemExit(
                f"error: resume=auto: {folder} finished a job with {' '.join(theirs) or ran}, where this command runs "
                f"{' '.join(ours) or 'other overrides'}; allowed: the command that made the sweep, or another "
                "hydra.sweep.dir"
            )
        job = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)
        job.working_dir = str(folder)
        return job

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        results: list[JobReturn | None] = []
        for index, overrides in enumerate(job_overrides, start=initial_job_idx):
            results.append(self.finished(overrides, self.job_dir(overrides, index)))
        done = sum(r is not None for r in results)
        if done:
            log.info(f"resume=auto: {done} of {len(results)} jobs already finished (not launched)")
        start = 0
        while start < len(results):  # each run of consecutive unfinished jobs, launched at its own first index
            if results[start] is not None:
                start += 1
                continue
            end = start
            while end < len(results) and results[end] is None:
                end += 1
            launched = self.launcher.launch(list(job_overrides[start:end]), initial_job_idx=initial_job_idx + start)
            results[start:end] = launched
            start = end
        return results  # type: ignore[return-value]


def without_resume(overrides: Sequence[str]) -> list[str]:
    """A job's overrides but `resume=`: the first run of a sweep may have been started without it."""
    return [o for o in overrides if not o.startswith("resume=")]
