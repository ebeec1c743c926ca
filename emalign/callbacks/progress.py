"""RunProgressBar: Lightning's RichProgressBar made to read right for emalign's fits.

    trainer:
      callbacks:
        - class_path: emalign.callbacks.RunProgressBar   # first, so it announces a conscience run before it starts

- A step-based fit (``max_steps``) shows ``step 12/30`` and seconds per step, not "Epoch 1/-2" and
  a rate that reads "0.00it/s" when a step takes longer than rich's speed window.
- Metric names are folded onto the next line when the terminal is narrow, never cut to "conscience/approv…";
  output to a file or pipe is drawn 160 columns wide, so a log keeps them whole.
- A conscience run gets its own line: what it is doing while it runs (sampling and reviewing M x K
  rollouts) and what it made afterwards (rollouts generated and reviewed, pairs, seconds), so a slow
  step says why it is slow.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

import lightning as L
from rich.progress import ProgressColumn, Task
from rich.table import Column
from rich.text import Text

from emalign.fence.lightning import RichBar


class SecondsPerStep(ProgressColumn):
    """Mean seconds per completed step of this bar (steps done before a resume not counted)."""

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields.get("start", 0)
        if not task.elapsed or done <= 0:
            return Text("-- s/step", style="dim")
        return Text(f"{task.elapsed / done:.1f} s/step", style="dim")


class RunProgressBar(RichBar):
    def __init__(self, refresh_rate: int = 1, leave: bool = True) -> None:
        """
        Args:
            refresh_rate: redraws per second.
            leave: keep the finished bar on screen.
        """
        # Written to a file or pipe, rich assumes 80 columns and folds the metrics down to one character
        # per line beside a long conscience line; a log has room for a wider table.
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs={"width": 160} if wide else None)
        self._conscience_task: Optional[Any] = None
        self._conscience_started = 0.0

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        if trainer.max_steps > 0:  # rich's it/s needs several updates inside its window: wrong for slow steps
            columns[-1] = SecondsPerStep()
        return columns

    def metrics_column(self) -> Column:
        return Column(overflow="fold", ratio=1)  # fold long metric names instead of cutting them

    def train_description(self, current_epoch: int) -> str:
        if self.trainer.max_steps > 0:
            return f"{'step':{len(self.validation_description)}}"
        return super().train_description(current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None and trainer.max_steps > 0:
            task = self.progress.tasks[self.train_progress_bar_id]
            start = task.fields.get("start", trainer.global_step)
            self.progress.update(self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step,
                                 start=start)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        conscience = _conscience_due(trainer)
        if conscience is None or self.progress is None:
            return
        rollouts = conscience.num_prompts * conscience.samples_per_prompt
        text = f"conscience (step {trainer.global_step}): sampling and reviewing {rollouts} rollouts"
        self._show_conscience(text)
        self._conscience_started = time.perf_counter()
        self.refresh(hard=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.max_steps > 0 and self.train_progress_bar_id is not None:
            self.set_completed(self.train_progress_bar_id, trainer.global_step)
        conscience = next((c for c in trainer.callbacks if _is_conscience(c)), None)
        if conscience is None or conscience.last_run_step != trainer.global_step - 1 or not self._conscience_started:
            return
        last = conscience.last  # the StepResult of the run just made
        rollouts, pairs = (len(last.rollouts), len(last.pairs)) if last is not None else (0, 0)
        seconds = time.perf_counter() - self._conscience_started
        self._conscience_started = 0.0
        self._show_conscience(f"conscience (step {conscience.last_run_step}): {rollouts} rollouts generated and "
                              f"reviewed, {pairs} pairs, {seconds:.0f} s", done=True)

    def _show_conscience(self, text: str, done: bool = False) -> None:
        if self._conscience_task is None or self._conscience_task not in self.progress.task_ids:
            self._conscience_task = self.progress.add_task(text, total=1)
        self.progress.update(self._conscience_task, description=text, completed=int(done))


def _is_conscience(callback: L.Callback) -> bool:
    return all(hasattr(callback, a) for a in ("every_n_steps", "num_prompts", "samples_per_prompt", "last_run_step"))


def _conscience_due(trainer: L.Trainer):
    """The conscience callback that will run before this step, if any."""
    step = trainer.global_step
    for callback in trainer.callbacks:
        if _is_conscience(callback) and step % callback.every_n_steps == 0 and step != callback.last_run_step:
            return callback
    return None
