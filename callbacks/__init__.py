"""Lightning callbacks of emalign (a top-level package so configs can say ``callbacks.ConscienceCallback``)."""

from callbacks.conscience import ConscienceCallback
from callbacks.evaluation import AlignmentEvalCallback
from callbacks.memory import ReleaseFreedMemory
from callbacks.progress import RunProgressBar
from callbacks.signals import StopOnSignal
from emalign.training.checkpoint import RunCheckpoint  # configs name it callbacks.RunCheckpoint

__all__ = [
    "AlignmentEvalCallback", "ConscienceCallback", "ReleaseFreedMemory", "RunCheckpoint", "RunProgressBar",
    "StopOnSignal",
]
