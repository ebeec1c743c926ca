"""RunCheckpoint: ModelCheckpoint that lives in ``{default_root_dir}/checkpoints`` and writes atomically.

A fixed directory lets ``fit --ckpt_path last`` find the previous run's ``last.ckpt``; the write goes
to a temporary file that is renamed into place, so a kill mid-write never leaves a broken checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    def bind(self, trainer: L.Trainer) -> None:
        """Fix the directory before fit resolves ``ckpt_path='last'`` (which happens before ``setup``)."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.bind(trainer)
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, filepath)
        trainer.strategy.barrier("RunCheckpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
