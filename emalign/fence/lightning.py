"""Every use of Lightning's private API (the tested range is pinned in pyproject.toml); see :mod:`emalign.fence`."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

USED = {
    ModelCheckpoint: ("_find_last_checkpoints", "_save_checkpoint", "_monitor_candidates", "_save_last_checkpoint"),
    LightningCLI: ("_parse_ckpt_path",),
    RichProgressBar: ("_init_progress", "_get_train_description", "_update"),
}
"""The private methods overridden or called below, by class (what the test checks)."""


class CheckpointWriter(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose every file goes through ``write`` and that can save ``last`` off schedule."""

    def write(self, trainer: L.Trainer, filepath: str) -> None:
        """Write the checkpoint file (collective, like ``trainer.save_checkpoint``)."""
        trainer.save_checkpoint(filepath, self.save_weights_only)

    def last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """The files ``ckpt_path='last'`` would choose from."""
        return self._find_last_checkpoints(trainer)

    def save_last_now(self, trainer: L.Trainer) -> str:
        """Write the ``last`` checkpoint now (a signal, a stop); returns its path. Collective."""
        candidates = self._monitor_candidates(trainer)
        if self.save_last:
            self._save_last_checkpoint(trainer, candidates)
            return self.last_model_path
        filepath = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
        self._save_checkpoint(trainer, filepath)
        return filepath

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Lightning's own version, with ``write`` in place of ``trainer.save_checkpoint``.
        self.write(trainer, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


class CheckedCkptPathCLI(LightningCLI):
    """A ``LightningCLI`` that hands an explicit ``--ckpt_path`` to ``check_ckpt_path`` before Lightning reads it.

    LightningCLI reads the hyperparameters of an explicit ``--ckpt_path`` before anything else, so a
    truncated file must be caught here to give our error rather than torch's.
    """

    def check_ckpt_path(self, path: str) -> None:
        """Raise a clear error when the explicit checkpoint ``path`` cannot be used (subclasses say how)."""

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and "://" not in str(ckpt_path):
            self.check_ckpt_path(ckpt_path)
        super()._parse_ckpt_path()


class RichBar(RichProgressBar):
    """A ``RichProgressBar`` with the hooks a subclass needs under public names."""

    def metrics_column(self) -> Any:
        """The table column of the metrics line (``None``: Lightning's own)."""
        return None

    def train_description(self, current_epoch: int) -> str:
        """The training bar's label."""
        return super()._get_train_description(current_epoch)

    def set_completed(self, task_id: Any, completed: int) -> None:
        """Move a bar to ``completed`` and redraw."""
        self._update(task_id, completed)

    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)
        if self.metrics_column() is not None and self._metric_component is not None:
            self._metric_component.get_table_column = self.metrics_column

    def _get_train_description(self, current_epoch: int) -> str:
        return self.train_description(current_epoch)


def attached_trainer(module: L.LightningModule) -> Optional[L.Trainer]:
    """The Trainer running ``module``, or None outside a fit (``module.trainer`` raises there)."""
    return module._trainer


def batches_processed(trainer: L.Trainer) -> int:
    """Batches the fit has consumed this epoch (the fit loop's own counter)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
