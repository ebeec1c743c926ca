"""What a CUDA device does that the meta device does not: autocast's dtype choices, and attention's kernel.

``torch.autocast("cuda", dtype)`` does not run on meta tensors; ``EmulatedAutocast`` makes its choices.

Lightning's ``bf16-mixed`` and ``16-mixed`` run the training step's forward under CUDA autocast: matrix
products in the low precision, reductions and pointwise transcendental ops in float32, and the low-precision
copy of each trainable leaf weight cached for the whole forward. Which dtype an op gives decides how much
every saved activation weighs, so a plan on meta must make the same choices. ``EmulatedAutocast`` makes them as
a ``TorchFunctionMode``, above autograd as real autocast is, so the casts it makes are in the graph and the
copies backward needs stay alive as they do on a GPU.

The op lists are CUDA's, from PyTorch's ``aten/src/ATen/autocast_mode.h`` (``AT_FORALL_LOWER_PRECISION_FP``,
``AT_FORALL_FP32`` and ``AT_FORALL_FP32_SET_OPT_DTYPE``), by the Python names that reach them. Ops not listed run
in their inputs' dtype, as autocast's own fall-through does. What a CPU cannot check is left to the GPU script
(bench/plan_gpu.sh).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from emalign.fence.dispatch import EFFICIENT_ATTENTION, FLASH, FLASH_CPU, tree_map

LOWER = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addmv", "addr", "baddbmm", "addbmm",
    "mv", "chain_matmul", "multi_dot", "einsum", "linalg_vecdot", "prelu", "scaled_dot_product_attention",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
})
"""Run in the low precision (their floating inputs cast down)."""

FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "__rdiv__", "__rtruediv__", "softplus", "layer_norm", "group_norm",
    "norm", "normalize", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "cross_entropy", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist",
    "renorm", "logsumexp",
})
"""Run in float32 (their low-precision floating inputs cast up)."""

FP32_OUTPUT = frozenset({"softmax", "log_softmax", "softmin", "cumprod", "cumsum", "prod", "sum"})
"""Given ``dtype=float32`` when their input is low precision and no dtype is asked (no float32 copy of the input)."""

_LOW_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


class EmulatedAutocast(TorchFunctionMode):
    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """
        Args:
            dtype: the low precision (``bfloat16`` for ``bf16-mixed``, ``float16`` for ``16-mixed``).
        """
        super().__init__()
        self.dtype = dtype
        self._weights: dict[int, torch.Tensor] = {}  # the cast cache: trainable leaves' low-precision copies

    def __exit__(self, *exc) -> None:
        self._weights.clear()  # as autocast drops its cache when the context closes
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in LOWER:
            args, kwargs = tree_map(self._down, (args, kwargs))
        elif name in FP32:
            args, kwargs = tree_map(_up, (args, kwargs))
        elif name in FP32_OUTPUT and "dtype" not in kwargs and any(
                isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) for a in args):
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)

    def _down(self, value):
        if not isinstance(value, torch.Tensor) or value.dtype not in _LOW_INPUTS or value.dtype == self.dtype:
            return value
        if not (value.is_leaf and value.requires_grad):
            return value.to(self.dtype)
        cached = self._weights.get(id(value))
        if cached is None:
            cached = self._weights[id(value)] = value.to(self.dtype)
        return cached


def _up(value):
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


class AttentionKernel(TorchFunctionMode):
    """``scaled_dot_product_attention`` on meta as the target device runs it, by its fused kernel: the output and the
    log-sum-exp saved for backward, no ``L x L`` matrix. Left to itself the meta device takes the math path, which
    keeps one per layer.

    ``cuda``: flash where it applies (no mask, 16-bit, head size up to 256; grouped keys and values read in place),
    else the memory-efficient kernel (grouped keys and values repeated for it). ``cpu``: torch's flash kernel for
    CPU, as a real CPU run takes it (how ``plan --device cpu`` checks a plan)."""

    def __init__(self, target: str = "cuda") -> None:
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "scaled_dot_product_attention":
            return func(*args, **kwargs)
        return fused_attention(self.target, *args, **kwargs)


def fused_attention(target: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """The fused kernel's call as ``scaled_dot_product_attention`` makes it on ``target`` (a boolean mask becomes an
    additive bias of its shape first)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask.logical_not(), float("-inf"))
    if target == "cpu":
        return FLASH_CPU(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        return FLASH(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(query.shape[0], query.shape[-3], query.shape[-2], key.shape[-2])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return EFFICIENT_ATTENTION(query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]
