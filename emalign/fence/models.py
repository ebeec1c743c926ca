"""transformers' private names emalign reads: what a model was loaded from, its decoder layer classes, its
attention kernel. Each has no public accessor; a rename shows here (tests/test_architecture.py) first."""

from __future__ import annotations

from typing import Any, Optional

USED = ("_name_or_path", "_no_split_modules", "_attn_implementation")


def loaded_from(config: Any) -> str:
    """The id or directory a model's config was loaded from ('' when unknown)."""
    return getattr(config, "_name_or_path", "") or ""


def decoder_layer_classes(model: Any) -> set[str]:
    """The class names a causal LM declares must not be split across devices: its decoder layers."""
    return set(getattr(model, "_no_split_modules", None) or [])


def attention_kernel(config: Any) -> Optional[str]:
    """The attention implementation a config selected (``eager``, ``sdpa``, ...), if any."""
    return getattr(config, "_attn_implementation", None)
