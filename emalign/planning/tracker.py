"""Device memory counted op by op: every tensor storage from the op that makes it until it is freed.

    memory = LiveMemory(vocab_size=152064)
    memory.track_module(model)                # what lives before the step: weights, adapter
    with memory, memory.phase("train step"):
        loss = model(...).sum(); loss.backward()
    memory.phases["train step"].peak          # bytes: the most alive at once in that phase

A ``TorchDispatchMode`` sees each op's outputs below autograd, so activations saved for backward, gradients,
KV caches and temporaries are counted as long as something holds them. It runs the same on real tensors and
on the meta device, where nothing is allocated: that is how ``plan`` forecasts a 7B step on a CPU. On meta, the
few ops whose output depends on the data are answered by stated assumptions (``META_ASSUMPTIONS``).

Each storage has a kind for the breakdown at a phase's peak (``report.LEVERS`` names them all): set when it is
tracked (``counting_as`` sets the default), and changed by ``retag`` (gradients when they land, optimizer state
after a step, the KV cache as each decoder layer extends it).
The device allocator's rounding and caching are not counted: ``plan`` adds an allowance for them.
"""

from __future__ import annotations

import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from emalign.fence.dispatch import COPY, NONZERO, SCALAR_READ, DispatchMode, tree_leaves

META_ASSUMPTIONS = (
    "positions picked by a mask (nonzero) are taken as all of them: an upper bound on the gathered states",
    "a scalar read from the device (a finiteness check, a count) reads 1",
    "a copy to the host stays on the meta device and is not device memory",
)


@dataclass
class Phase:
    """One phase's peak: the bytes alive at its highest point, and by kind."""

    peak: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)
    allocated: int | None = None
    """On a GPU: ``torch.cuda.max_memory_allocated`` over the phase (the allocator's own count)."""
    reserved: int | None = None
    """On a GPU: ``torch.cuda.max_memory_reserved`` over the phase (what the caching allocator held)."""


class LiveMemory(DispatchMode):
    def __init__(self, vocab_size: int, cuda: bool = False) -> None:
        """
        Args:
            vocab_size: a tensor whose last dimension has this size is counted as logits (or their gradient).
            cuda: also read the CUDA allocator's peaks per phase (a step run on a GPU, to check a plan).
        """
        super().__init__()
        self.cuda = cuda
        self.vocab_size = vocab_size
        self.live = 0
        self.by_kind: Counter[str] = Counter()
        self.phases: dict[str, Phase] = {}
        self.default_kind = "activations"
        # id(storage) -> [kind, bytes]. A storage's Python object lives as long as the storage (torch keeps it),
        # so its id is stable, and its finalizer removes the entry before the id can be reused.
        self._storages: dict[int, list] = {}
        self._current: Phase | None = None

    # -- what is alive ------------------------------------------------------------------------------------------
    def track(self, tensor: torch.Tensor, kind: str | None = None) -> None:
        """Count ``tensor``'s storage from now until it is freed (once, however many views share it)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._storages:
            return
        if kind is None:
            kind = "logits" if tensor.dim() >= 2 and tensor.shape[-1] == self.vocab_size else self.default_kind
        size = storage.nbytes()
        self._storages[key] = [kind, size]
        weakref.finalize(storage, self._free, key)
        self.live += size
        self.by_kind[kind] += size
        if self._current is not None and self.live > self._current.peak:
            self._current.peak, self._current.at_peak = self.live, dict(self.by_kind)

    def _free(self, key: int) -> None:
        kind, size = self._storages.pop(key)
        self.live -= size
        self.by_kind[kind] -= size

    def retag(self, tensors: Iterable[torch.Tensor], kind: str) -> None:
        """Count these tensors' storages as ``kind`` from now on (tracking them if they were not)."""
        for tensor in tensors:
            entry = self._storages.get(id(tensor.untyped_storage()))
            if entry is None:
                self.track(tensor, kind)
            elif entry[0] != kind:
                self.by_kind[entry[0]] -= entry[1]
                self.by_kind[kind] += entry[1]
                entry[0] = kind

    def track_module(self, module: torch.nn.Module) -> None:
        """A model's parameters and buffers, as the kinds the breakdown names (4-bit ones with their constants)."""
        for param in module.parameters():
            state = getattr(param, "quant_state", None)  # bitsandbytes' Params4bit: packed uint8 + constants
            if state is not None:
                for tensor in [param, *_tensors_of(state)]:
                    self.track(tensor, "4-bit weights")
            else:
                self.track(param, "adapter" if param.requires_grad else "weights")
        for buffer in module.buffers():
            self.track(buffer, "weights")

    def watch_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Count each parameter's gradient as a gradient from the moment it lands."""
        for param in params:
            param.register_post_accumulate_grad_hook(lambda p: self.retag([p.grad], "gradients"))

    # -- phases -------------------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str, default_kind: str = "activations") -> Iterator[Phase]:
        """Record the peak of what is alive while the block runs (what was alive at its start included)."""
        phase = Phase(peak=self.live, at_peak=dict(self.by_kind))
        self.phases[name] = phase
        before = self._current
        self._current = phase
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            with self.counting_as(default_kind):
                yield phase
        finally:
            self._current = before
            if self.cuda:
                torch.cuda.synchronize()
                phase.allocated, phase.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()

    @contextmanager
    def counting_as(self, kind: str) -> Iterator[None]:
        """Count what the block makes as ``kind`` (unless it is logits)."""
        before, self.default_kind = self.default_kind, kind
        try:
            yield
        finally:
            self.default_kind = before

    # -- the dispatch -------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        answered = _on_meta(func, args, kwargs)
        if answered is not _NOT_META:
            return answered
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out


def _tensors_of(state) -> list[torch.Tensor]:
    """The tensors a bitsandbytes ``QuantState`` holds (absmax, code, offset, and its nested state's)."""
    found = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
    nested = getattr(state, "state2", None)
    return found + (_tensors_of(nested) if nested is not None else [])


_NOT_META = object()


def _on_meta(func, args, kwargs):
    """The ``META_ASSUMPTIONS`` answer for a data-dependent op on meta tensors, else ``_NOT_META``."""
    first = args[0] if args else None
    if not (isinstance(first, torch.Tensor) and first.device.type == "meta"):
        return _NOT_META
    if func is NONZERO:
        return torch.empty((first.numel(), first.dim()), dtype=torch.long, device="meta")
    if func is SCALAR_READ:
        return True if first.dtype == torch.bool else 1
    if func is COPY and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
        return torch.empty(first.shape, dtype=kwargs.get("dtype") or first.dtype, device="meta")
    return _NOT_META
