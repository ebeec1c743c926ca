"""RunCheckpoint: a ModelCheckpoint that lives in ``{default_root_dir}/checkpoints`` and writes atomically.

A fixed directory lets ``fit --ckpt_path last`` find the previous run's ``last.ckpt``; the write goes
to a temporary file that is renamed into place, so a kill mid-write never leaves a broken checkpoint.
``check_checkpoint`` turns a truncated or corrupt file into one clear error before Lightning reads it;
``save_checkpoint_now`` saves off schedule (a signal, a run of non-finite losses).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from emalign.errors import NO_SPACE, UserError, no_space
from emalign.fence.lightning import CheckpointWriter


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from (missing, truncated, corrupt); the message names the file."""


def save_atomic(trainer: L.Trainer, filepath: str, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` to ``filepath.partial``, fsync, then rename: readers see the old file or the new one.

    Collective under DDP/FSDP (every rank must call it), like ``trainer.save_checkpoint``.
    """
    partial = f"{filepath}.partial"
    try:
        trainer.save_checkpoint(partial, weights_only)
        if trainer.is_global_zero:
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, filepath)
            _fsync_dir(Path(filepath).parent)
    except OSError as err:
        Path(partial).unlink(missing_ok=True)  # a half-written file only takes the space a retry needs
        if err.errno in NO_SPACE:
            raise no_space(_shown(filepath), "checkpoint") from err
        raise
    trainer.strategy.barrier("RunCheckpoint.replace")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a power cut right after ``os.replace`` could otherwise lose it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _shown(path: str | Path) -> str:
    """The path as a user would type it: relative to the working directory when below it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_checkpoint(path: str | Path) -> None:
    """Raise ``CheckpointError`` naming ``path`` if it is missing, truncated or corrupt.

    torch checkpoints are zip archives with a CRC per member: a truncated file has no central
    directory and a flipped byte fails its CRC. Both are caught here, before any weights load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {_shown(path)}: no such file{_others(path)}")
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive: the file ends early or is not a torch checkpoint")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"CRC mismatch in {bad}")
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
            raise ValueError("not a Lightning checkpoint (no state_dict/global_step)")
    except Exception as err:  # zipfile, pickle and torch raise many kinds; all mean the same to the user
        raise CheckpointError(f"checkpoint {_shown(path)} is truncated or corrupt ({err}){_others(path)}") from err


def _others(path: Path) -> str:
    """A hint naming the other checkpoints next to ``path`` (e.g. the previous periodic one)."""
    if not path.parent.is_dir():
        return ""
    others = [p for p in path.parent.glob("*.ckpt") if p.name != path.name]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if not others:
        return ""
    names = ", ".join(p.name for p in others[:3])
    return f"; other checkpoints there: {names} (resume from one with --ckpt_path {_shown(others[0])})"


class RunCheckpoint(CheckpointWriter):
    def bind(self, trainer: L.Trainer) -> None:
        """Fix the directory before fit resolves ``ckpt_path='last'`` (which happens before ``setup``)."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.bind(trainer)
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning keeps an earlier fit's checkpoints and versions this fit's names (last-v1.ckpt): say so once.
        found = Path(self.dirpath).glob("*.ckpt") if self.dirpath and os.path.isdir(self.dirpath) else []
        earlier = sorted(p.name for p in found)
        if earlier and trainer.ckpt_path is None and trainer.is_global_zero:
            names = ", ".join(earlier[:3]) + (" ..." if len(earlier) > 3 else "")
            print(f"{_shown(self.dirpath)} holds {names} of an earlier fit: kept; a name this fit would reuse gets "
                  "a -vN suffix (last-v1.ckpt), and --ckpt_path last resumes the newest", flush=True)

    def last_checkpoint(self, trainer: L.Trainer) -> Optional[str]:
        """The file ``ckpt_path='last'`` resolves to (the newest ``last*.ckpt`` here), or None."""
        self.bind(trainer)
        found = [p for p in self.last_checkpoints(trainer) if os.path.isfile(p)]
        return max(found, key=os.path.getmtime) if found else None

    def write(self, trainer: L.Trainer, filepath: str) -> None:
        save_atomic(trainer, filepath, self.save_weights_only)


def save_checkpoint_now(trainer: L.Trainer) -> str:
    """Save a resumable checkpoint now through the run's ``RunCheckpoint`` (or to ``checkpoints/last.ckpt``)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, RunCheckpoint):
            return callback.save_last_now(trainer)
    filepath = str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
    if trainer.is_global_zero:
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(trainer, filepath)
    return filepath


FIT_RECORD = "fit.json"
"""Beside every saved adapter: which fit wrote it (run id, step, time), so a later fit can tell."""


class AdapterExistsError(UserError):
    """A fit would replace an adapter that another fit wrote."""


def adapter_conflict(out: Path, run_id: str, overwrite: bool) -> Optional[str]:
    """The one-line refusal when ``out`` holds a model that a fit other than ``run_id`` wrote, else None.

    A fit may replace only what it wrote itself (the same run, resumed or continued with
    ``--ckpt_path``); anything else needs ``overwrite``. Checked at the start of fit, before any
    training, so refusing loses nothing.
    """
    if overwrite or not ((out / "adapter_config.json").is_file() or (out / "config.json").is_file()):
        return None
    try:
        record = json.loads((out / FIT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("run_id") == run_id:
        return None
    who = (f"fit {record.get('run_id')} ({record.get('global_step')} steps, saved {record.get('saved')})"
           if isinstance(record, dict) else "a fit this run cannot identify (no fit.json)")
    return (f"{_shown(out)} holds the model trained by {who}; this fit (run {run_id}) would replace it at its end: "
            "pass --model.overwrite_adapter true to allow that, or write elsewhere with --trainer.default_root_dir "
            "(resume that fit with --ckpt_path last instead)")


def write_fit_record(out: Path, run_id: str, global_step: int) -> None:
    """Record which fit wrote the model in ``out``."""
    from emalign.files import write_json_atomic

    write_json_atomic(out / FIT_RECORD, {"run_id": run_id, "global_step": global_step,
                                         "saved": time.strftime("%Y-%m-%d %H:%M:%S")})
