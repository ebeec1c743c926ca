"""Rollout tables for the loggers that show tables: TensorBoard (as a markdown text) and W&B (a Table).

TRL logs its completions the same way. Other loggers (CSV) get nothing here; ``rollouts.jsonl``
keeps every rollout for all of them.

    log_rollout_table(trainer, step, rows)   # rows: dicts with the same keys
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger  # the packages are imported only when used

KEY = "conscience/rollouts"


def run_id(trainer: L.Trainer) -> str:
    """This fit's id: the logger's version (``version_3``, the folder of its metrics), else the start time."""
    version = trainer.logger.version if trainer.logger is not None else None
    if version is None:
        return time.strftime("%Y%m%dT%H%M%S")
    return f"version_{version}" if isinstance(version, int) else str(version)


def log_rollout_table(trainer: L.Trainer, step: int, rows: list[dict[str, Any]]) -> None:
    """Log ``rows`` as one table per logger that has tables, at ``step``."""
    if not rows:
        return
    columns = list(rows[0])
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(KEY, markdown_table(columns, rows), global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(key=KEY, columns=columns, data=[[row[c] for c in columns] for row in rows], step=step)


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A markdown table (TensorBoard renders its text summaries as markdown); cells on one line."""
    def cell(value: Any) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
