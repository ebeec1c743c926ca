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
EFFICIENT_ATTENTION = torch.ops.aten._scaled_dot_product_efficient_attention.default
"""CUDA's memory-efficient attention kernel (it has a meta implementation, and a backward)."""
FLASH = torch.ops.aten._scaled_dot_product_flash_attention.default
"""CUDA's flash attention kernel (meta implementation and backward too)."""
FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
"""The CPU's flash attention kernel (meta implementation and backward too)."""



def engine_backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` straight into autograd's engine, past torch-function handling: a function mode that
    is on stays on through backward (``Tensor.backward`` would run with it popped, as any handled call does)."""
    torch.autograd.graph._engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), True, True)


__all__ = ["engine_backward", "EFFICIENT_ATTENTION", "FLASH", "FLASH_CPU", "DispatchMode", "tree_leaves", "tree_map",
           "NONZERO", "SCALAR_READ", "COPY"]
