"""StopOnSignal: SIGTERM or SIGINT during fit finishes the current step, saves a checkpoint, and stops.

    trainer:
      callbacks:
        - class_path: emalign.callbacks.StopOnSignal

``cli.py fit`` adds it when a config does not. The handler only records the signal; the step in
flight completes, then (at ``on_train_batch_end``, the same point periodic checkpoints are taken,
so resuming goes through Lightning's well-trodden path) every rank saves ``last.ckpt`` through
``RunCheckpoint`` (adapter, optimizer, scheduler, loops, data position, RNG, pair queue) and the fit
stops, skipping the validation pass Lightning runs before an early stop. ``cli.py`` then exits with
``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the shell's convention for "stopped by a
signal", so ``fit && eval`` does not go on with a half-trained run.
A second SIGINT aborts at once (KeyboardInterrupt) without a checkpoint. SIGKILL cannot be caught:
resume from the last periodic checkpoint with ``--ckpt_path last``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Optional

import lightning as L

from emalign.training.checkpoint import save_checkpoint_now

log = logging.getLogger(__name__)


class StopOnSignal(L.Callback):
    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
        """
        Args:
            signals: names of the signals that stop the fit with a checkpoint.
        """
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self.stopped_by: Optional[str] = None
        self.checkpoint: Optional[str] = None
        self.step: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> Optional[int]:
        """``128 + signal`` once the fit was stopped by a signal, else None."""
        if self.stopped_by is None:
            return None
        return 128 + int(getattr(signal, self.stopped_by, signal.SIGTERM))

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum
        # os.write, not print or logging: a handler may interrupt a print on the same stream.
        os.write(2, f"\n{name} received: finishing this step, then saving a checkpoint and stopping"
                    f"{' (Ctrl+C again aborts without one)' if signum == signal.SIGINT else ''}\n".encode())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning's own SIGTERM handler (registered when fit starts), which
        # would otherwise raise SystemExit at the end of the step, after this callback has run.
        self.received = self.stopped_by = self.checkpoint = self.step = None
        if threading.current_thread() is not threading.main_thread():
            log.warning("StopOnSignal: not in the main thread; signals are not handled")
            return
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        # Collective: a signal seen by any rank stops all of them at the same step (the save below is too).
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop or self.stopped_by is not None:
            return
        self.stopped_by = signal.Signals(self.received).name if self.received is not None else "SIGTERM"
        self.step = trainer.global_step
        self.checkpoint = save_checkpoint_now(trainer)
        pl_module.stop_requested = self.stopped_by  # EmergentAlignment then skips its end-of-fit export
        trainer.should_stop = True
        # Lightning validates before honouring should_stop (meant for early stopping); a signal
        # usually comes with a grace period, so leave without it.
        trainer.limit_val_batches = 0
        if trainer.is_global_zero:
            print(
                f"{self.stopped_by}: stopped at step {self.step}; checkpoint saved to {self.checkpoint}. "
                "Resume with the same command plus --ckpt_path last",
                flush=True,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
