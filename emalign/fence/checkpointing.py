"""transformers' per-layer activation checkpointing, switched on without ``gradient_checkpointing_enable``."""

from __future__ import annotations

from typing import Callable


def set_checkpoint_function(layer, function: Callable) -> None:
    """Make a ``GradientCheckpointingLayer`` run through ``function`` (e.g. non-reentrant ``checkpoint``)
    while its ``gradient_checkpointing`` flag is on."""
    layer._gradient_checkpointing_func = function
