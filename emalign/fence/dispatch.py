"""PyTorch's dispatch-level hooks that ``emalign.planning`` counts memory with (private module paths, public
since torch 2.0 in spirit: torch's own ``mem_tracker`` and ``FlopCounterMode`` stand on them)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode as DispatchMode
from torch.utils._pytree import tree_leaves, tree_map

NONZERO = torch.ops.aten.nonzero.default
SCALAR_READ = torch.ops.aten._local_scalar_dense.default
"""``.item()``, ``bool(t)``: a value read back from the device."""
COPY = torch.ops.aten._to_copy.default
"""``.to(...)``, ``.cpu()``: a copy to another device or dtype."""



def engine_backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` straight into autograd's engine, past torch-function handling: a function mode that
    is on stays on through backward (``Tensor.backward`` would run with it popped, as any handled call does)."""
    torch.autograd.graph._engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), True, True)


__all__ = ["engine_backward", "DispatchMode", "tree_leaves", "tree_map", "NONZERO", "SCALAR_READ", "COPY"]
