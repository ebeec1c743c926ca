"""emalign: online self-alignment of language models on PyTorch Lightning.

The public API, importable from ``emalign`` itself (each name is imported on first use, so that
``import emalign`` and the command line's ``--help`` stay fast)::

    from emalign import Conscience, ConscienceStep, GenerationSettings, LoRA, PairBuilder, Policy

The README shows it at work in ten lines; ``tests/test_public_api.py`` runs that example.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "Policy": "emalign.models.policy", "LoRA": "emalign.models.policy",
    "load_for_inference": "emalign.models.policy", "GenerationSettings": "emalign.models.sampling",
    "EmergentAlignment": "emalign.training.module", "WarmupCosine": "emalign.training.module",
    "SigmoidDPO": "emalign.training.losses", "PairQueue": "emalign.training.pair_queue",
    "ChatDataModule": "emalign.data.chat",
    "Conscience": "emalign.conscience.verdict", "PairBuilder": "emalign.conscience.verdict",
    "ConscienceStep": "emalign.conscience.step", "ConscienceDecoder": "emalign.conscience.decoding",
    "FilePrompts": "emalign.conscience.prompts",
    "CautionControl": "emalign.conscience.controls", "ShuffledControl": "emalign.conscience.controls",
    "run_eval": "emalign.evaluation.runner", "EvalSettings": "emalign.evaluation.settings",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'emalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
