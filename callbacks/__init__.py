"""Lightning callbacks of emalign (a top-level package so configs can say ``callbacks.ConscienceCallback``)."""

from callbacks.checkpoint import RunCheckpoint
from callbacks.conscience import ConscienceCallback

__all__ = ["ConscienceCallback", "RunCheckpoint"]
