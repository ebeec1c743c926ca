"""glibc malloc settings so a CPU fit gives freed tensor memory back to the system.

glibc serves a large request with its own ``mmap`` and unmaps it on free, but each such free raises the
threshold for the next ones (up to 32 MiB). After the first training step, activations of a few MiB
therefore come from the heap, and the heap keeps what was freed: the demo fit held its freed
activations between steps, and the conscience's differently sized tensors fragmented the heap further.
A fixed threshold keeps every tensor of 1 MiB or more in a mapping of its own, returned to the system
when the tensor is freed.

The price is time: every large tensor is a fresh mapping whose pages fault in again, so SFT steps and,
more, checkpointed pair steps (which allocate their activations twice) run longer. Both sides are
measured in bench/README.md, "Answered probes: allocator". So configs choose: ``emalign.callbacks.ReleaseFreedMemory``
applies it to a CPU fit. A threshold set through glibc's own ``MALLOC_MMAP_THRESHOLD_`` is left as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
DEFAULT_THRESHOLD = 1 << 20


def release_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes. Returns whether the setting took effect."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): its allocator has no such setting
        return False
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold))
