"""Lightning callbacks of emalign: configs name them `emalign.callbacks.ConscienceCallback` and so on."""

from emalign.callbacks.conscience import ConscienceCallback
from emalign.callbacks.evaluation import AlignmentEvalCallback
from emalign.callbacks.memory import ReleaseFreedMemory
from emalign.callbacks.progress import RunProgressBar
from emalign.callbacks.signals import StopOnSignal
from emalign.training.checkpoint import RunCheckpoint  # its home is training; configs find it here

__all__ = [
    "AlignmentEvalCallback", "ConscienceCallback", "ReleaseFreedMemory", "RunCheckpoint", "RunProgressBar",
    "StopOnSignal",
]
