"""Lightning callbacks of emalign (a top-level package so configs can say ``callbacks.ConscienceCallback``)."""

from callbacks.checkpoint import RunCheckpoint
from callbacks.conscience import ConscienceCallback
from callbacks.evaluation import AlignmentEvalCallback
from callbacks.progress import RunProgressBar
from callbacks.signals import StopOnSignal

__all__ = ["AlignmentEvalCallback", "ConscienceCallback", "RunCheckpoint", "RunProgressBar", "StopOnSignal"]
