"""A Hugging Face model card (``README.md``) for every adapter a fit saves.

The card has the Hub's YAML front matter (``base_model``, ``library_name: peft``, ``tags``) and says
what made the adapter: the data, the LoRA and conscience settings, the final metrics, the command,
and the papers to cite. It reads what the fit holds (the trainer, its data module and callbacks),
so it is right for a run from the CLI and from Python alike.

    write_model_card(directory, trainer, policy)
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from emalign.files import write_text_atomic

HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Embedded models by their Hugging Face id (the card's ``base_model`` must be a Hub id)."""

CITATION = """```bibtex
@article{emergent_alignment,
  title   = {Emergent Alignment},
  journal = {arXiv preprint arXiv:2606.19527},
  year    = {2026},
  url     = {https://arxiv.org/abs/2606.19527}
}
@article{betley2025emergent,
  title   = {Emergent Misalignment: Narrow finetuning can produce broadly misaligned {LLMs}},
  author  = {Betley, Jan and Tan, Daniel and Warncke, Niels and Sztyber-Betley, Anna and Bao, Xuchan and
             Soto, Mart{\\'\\i}n and Labenz, Nathan and Evans, Owain},
  journal = {arXiv preprint arXiv:2502.17424},
  year    = {2025},
  url     = {https://arxiv.org/abs/2502.17424}
}
```"""


def write_model_card(directory: str | Path, trainer, policy) -> Path:
    """Write ``directory/README.md`` atomically and return its path."""
    base = HUB_IDS.get(policy.source, policy.source)
    front = {"library_name": "peft" if policy.is_adapter else "transformers",
             "tags": ["emalign", "conscience", "dpo", "lora" if policy.is_adapter else "full-fine-tune"]}
    if base.count("/") == 1 and not Path(base).exists():  # a Hub id, not a local path
        front["base_model"] = base
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=True) + "---",
        f"# {Path(directory).resolve().name}: {base} fine-tuned with emalign",
        "Fine-tuned with emalign: while the model trained, a conscience step sampled its own answers, a frozen "
        "copy of it reviewed each (log P(yes) - log P(no) on one introspective question), and best-versus-worst "
        "pairs became DPO pairs added to the loss (Emergent Alignment, arXiv 2606.19527).",
        "## Data\n\n" + _table(_data_settings(trainer)),
        "## Adapter\n\n" + _table(_adapter_settings(policy)),
        "## Conscience\n\n" + _conscience_section(trainer),
        "## Final metrics\n\n" + _table({k: f"{v:.4g}" for k, v in _metrics(trainer).items()}),
        "## How it was made\n\n```bash\n" + _command() + "\n```\n\n"
        f"Base model: `{policy.source}`. Steps: {trainer.global_step}. Load it with "
        "`peft.PeftModel.from_pretrained(base, DIR)` or `python cli.py generate --adapter DIR`.",
        "## Citation\n\n" + CITATION,
    ]
    return write_text_atomic(Path(directory) / "README.md", "\n\n".join(sections) + "\n")


def _table(values: dict[str, Any]) -> str:
    if not values:
        return "(none)"
    rows = [f"| {key} | {str(value).replace('|', '/')} |" for key, value in values.items()]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def _data_settings(trainer) -> dict[str, Any]:
    datamodule = getattr(trainer, "datamodule", None)
    names = ("train_file", "max_length", "batch_size", "val_fraction", "limit", "seed")
    settings = {name: getattr(datamodule, name) for name in names if hasattr(datamodule, name)}
    if getattr(datamodule, "conversations", None):
        settings["training conversations"] = len(datamodule.conversations)
    return settings


def _adapter_settings(policy) -> dict[str, Any]:
    config = getattr(policy.model, "peft_config", {}).get("default")
    if config is None:
        return {"kind": "full fine-tune", "reference": policy.reference_kind}
    return {"kind": "LoRA", "r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": ", ".join(sorted(config.target_modules)), "rsLoRA": config.use_rslora,
            "quantized base": bool(getattr(policy.model.base_model.model, "is_loaded_in_4bit", False)),
            "reference": policy.reference_kind}


def _conscience_section(trainer) -> str:
    """The settings of every callback that runs a conscience (duck-typed: it has a ``conscience``)."""
    found = [cb for cb in trainer.callbacks if hasattr(cb, "conscience")]
    if not found:
        return "No conscience ran in this fit (plain fine-tuning)."
    return "\n\n".join(f"`{type(cb).__name__}`\n\n" + _table(_settings(cb)) for cb in found)


def _settings(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Public scalar settings of an object, one level into the objects it holds (question, pair builder...)."""
    fields = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else vars(obj)
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key.startswith("_") or key in ("stats", "last_run_step"):
            continue
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[prefix + key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            out[prefix + key] = ", ".join(map(str, value))
        elif depth == 0 and hasattr(value, "__dict__") and not callable(getattr(value, "forward", None)):
            out.update(_settings(value, f"{prefix}{key}.", depth + 1))
    return out


def _metrics(trainer) -> dict[str, float]:
    metrics = {}
    for name, value in sorted(trainer.callback_metrics.items()):
        try:
            metrics[name] = float(value)
        except (TypeError, ValueError):
            continue
    return metrics


def _command() -> str:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    shown = ["python", program] if program.endswith(".py") else [program]
    return " ".join(shlex.quote(a) for a in shown + sys.argv[1:])
