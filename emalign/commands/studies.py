"""The study verbs of ``cli.py``: what a fit did, and whether the model fixes its own bad answers.

    python cli.py effect --out runs/effect --runs base= method_s0=runs/method_s0/adapter
    python cli.py self_correction --out runs/self_correction --limit 8

``effect`` is :mod:`emalign.studies.effect`; ``self_correction`` is :mod:`emalign.studies.self_correction`.
Each result records the command that made it, rebuilt from the settings (defaults included), so that it
reruns as it ran whatever the working directory's shell history says.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict
from typing import Any, Literal

from emalign.errors import friendly_errors
from emalign.studies.effect import EffectSettings, run_effect
from emalign.studies.self_correction import CorrectionSettings, run_self_correction


def _command(verb: str, flags: dict[str, Any]) -> str:
    """``python cli.py VERB --key value ...``, lists as their items after the flag."""
    words = ["python", "cli.py", verb]
    for key, value in flags.items():
        if value is None:
            continue
        words += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return shlex.join(words)


def effect(runs: list[str], out: str, model: str = "smollm2-135m-instruct", **settings: Any) -> None:
    """What fits did on held-out prompts, by measures their loop did not optimise; seeds as the unit.

    The frozen base's verdicts under four wordings (with content c and tilt t), the policies' own log-prob
    margins on labelled pairs, the degeneracy and caution rates; paired differences to the first run.

        python cli.py effect --out runs/effect --runs base= method_s0=runs/method_s0/adapter \\
            method_s1=runs/method_s1/adapter shuffled_s0=runs/shuffled_s0/adapter

    The flags after --model are the measurement settings (EffectSettings), the same for every run.

    Args:
        runs: NAME=ADAPTER_DIR[@CHECKPOINT] (NAME=: the base model); the first is the baseline; runs named
            ARM_sSEED are the seeds of one arm.
        out: directory: one JSON per run (reused on a rerun with the same settings), effect.json and effect.md.
        model: the base model of every run.
    """
    with friendly_errors():
        measured = EffectSettings(**settings)  # jsonargparse offers EffectSettings' fields as flags
        command = _command("effect", {"out": out, "runs": runs, "model": model, **asdict(measured)})
        run_effect(runs, out, model, measured, command)


def self_correction(out: str, model: str = "smollm2-135m-instruct",
                    sets: list[Literal["code", "chat"]] = ["code", "chat"], **settings: Any) -> None:
    """Given a bad answer as its own, does the model fix it? The method's revision against a plain resample.

    Insecure code (bandit findings removed, revisions that keep code) and bad chat answers (the frozen
    model's c and t, degeneracy, caution), paired per task or pair.

        python cli.py self_correction --out runs/self_correction --limit 8

    Args:
        out: directory: code.json and chat.json, each written as it lands.
        model: the model that revises and judges.
        sets: which arms.
    """
    with friendly_errors():
        measured = CorrectionSettings(**settings)  # jsonargparse offers CorrectionSettings' fields as flags
        command = _command("self_correction", {"out": out, "model": model, "sets": list(sets), **asdict(measured)})
        run_self_correction(out, model, list(sets), measured, command)
