"""Lightning callbacks of the project, switched on in conf/callbacks/."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

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
