"""ReleaseFreedMemory: a CPU fit gives the memory of freed tensors back to the system as it goes.

    trainer:
      callbacks:
        - class_path: emalign.callbacks.ReleaseFreedMemory

glibc otherwise keeps freed activations in its heap, and the conscience's differently shaped tensors made
the heap grow further: without this callback the demo peaks much higher. It costs time, since every large
tensor is then a fresh mapping whose pages fault in again (``emalign/models/allocator.py`` says why), so it is a
choice per config: the demo turns it on, a machine with memory to spare leaves it off. Both are measured
in bench/README.md, "Current results: memory profile of the demo" and "Answered probes: allocator".
"""

from __future__ import annotations

import logging

import lightning as L

from emalign.errors import check_range
from emalign.models.allocator import DEFAULT_THRESHOLD, release_freed_memory

log = logging.getLogger(__name__)


class ReleaseFreedMemory(L.Callback):
    def __init__(self, threshold_mib: float = DEFAULT_THRESHOLD / 2**20) -> None:
        """
        Args:
            threshold_mib: tensors of this many MiB or more are returned to the system when freed.
        """
        check_range("threshold_mib", threshold_mib, 0)
        self.threshold_mib = threshold_mib
        self.applied = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the first step: the weights are loaded, activations have not been allocated yet."""
        if trainer.strategy.root_device.type != "cpu":
            return  # GPU tensors live in the CUDA caching allocator; glibc holds only host-side buffers
        self.applied = release_freed_memory(int(self.threshold_mib * 2**20))
        if not self.applied:
            log.info("ReleaseFreedMemory: no glibc mallopt here, or MALLOC_MMAP_THRESHOLD_ is set; left as it is")
