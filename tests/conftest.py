"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_EM = ROOT.parent / "shared" / "data" / "em"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from emalign.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template, saved as an HF directory
    (the benchmarks' smoke mode uses the same one)."""
    from bench._common import tiny_model_dir as build

    return build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_policy(tiny_model_dir):
    from emalign.models import LoRA, Policy

    torch.manual_seed(0)
    return Policy(tiny_model_dir, adapter=LoRA(r=4, alpha=8))


def run_cli(args: list[str]) -> int:
    """``cli.py`` in this process (no model import cost); returns the exit code."""
    import sys

    import cli

    saved = sys.argv
    sys.argv = ["cli.py"]
    try:
        cli.main(list(args))
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        sys.argv = saved
    return 0
