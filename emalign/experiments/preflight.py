"""The experiment's preflight: before any fit, does each run's judge read the question at all, and will each fit
fit in the GPU's memory?

The conscience of a fit is its frozen base model. Before GPU-hours go into fits, ``experiment`` runs
``discern`` on every base model its runs use (the training question and its inverted wording only),
so that the comparison table carries, beside each run, what its judge reads: the content part's AUROC
(c), the share of the good-bad gap that a question-independent tilt carries, and the judge's margin
over the best trivial cue; and one warning line when the judge is not question-sensitive.
The result is kept in ``OUT/preflight/<model>/discern.json`` and reused on a rerun.

With ``plan: {enabled: true}``, every fit still to run is planned first (``cli.py plan``, its memory per phase at
the real shape, without weights), into ``OUT/runs/NAME/plan.json``; a fit planned above ``plan.gpu_memory``
stops the experiment before any fit starts, in one line per such run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Preflight:
    """Discernment of each run's base model before any fit (see ``python cli.py discern --help``)."""

    enabled: bool = True
    """Run it; false leaves the preflight columns empty."""
    sets: list[str] = field(default_factory=lambda: ["chat", "code"])
    """Labelled sets; the first one fills the comparison table's columns, every one gets a verdict line."""
    limit: Optional[int] = None
    """Only the first N pairs of each set (None: all; below 10 pairs there are no intervals and no verdict)."""
    batch_size: int = 8
    """Answers per review forward."""

    def __post_init__(self):
        from emalign.errors import UserError, check_range

        if not self.sets:
            raise UserError("preflight.sets: needs at least one set")
        check_range("preflight.limit", self.limit, 1, none_ok=True)
        check_range("preflight.batch_size", self.batch_size, 1)


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/")).strip("_")[-80:] or "model"


def run_preflight(settings: Preflight, models: list[str], out_dir: Path,
                  warn: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """{model: preflight columns and verdict lines}, discerning each model once (reused from disk)."""
    from emalign.conscience.verdict import DEFAULT_QUESTION
    from emalign.discern.labelled import INVERTED_QUESTION, Wording
    from emalign.discern.run import run_discern

    if not settings.enabled:
        return {}
    wordings = [Wording("default", DEFAULT_QUESTION), Wording("inverted", INVERTED_QUESTION, inverted=True)]
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(models):
        where = out_dir / "preflight" / _slug(model)
        # Its own cache: a result with the same settings is reused, one with others replaced.
        result = run_discern(where, model, None, settings.sets, wordings, settings.batch_size, settings.limit,
                             show=False, overwrite=True, reuse=True)
        out[model] = columns(result, str(where / "discern.json"))
        for line, sensitive in zip(out[model]["verdicts"], out[model]["question_sensitive"]):
            if sensitive is False:
                warn(f"warning: the judge {model} is not question-sensitive: {line}")
    return out


def columns(result: dict[str, Any], source: str) -> dict[str, Any]:
    """The comparison's preflight columns from a discern result (its first set) and every verdict line."""
    analysis = result["analysis"]
    first = analysis[next(iter(result["sets"]))]
    tilt = first.get("tilt_content", {})
    return {
        "set": next(iter(result["sets"])), "source": source,
        "c_auroc": tilt.get("c", {}).get("auroc"),
        "tilt_gap_share": tilt.get("gap_share_t"),
        "best_cue_margin": first["margin_over_best_cue"],
        "verdicts": [a["verdict"]["line"] for a in analysis.values()],
        "question_sensitive": [a["verdict"]["question_sensitive"] for a in analysis.values()],
    }


@dataclass(frozen=True)
class MemoryPlan:
    """``cli.py plan`` on every fit still to run, before any fit starts (see ``python cli.py plan --help``)."""

    enabled: bool = False
    """Plan the fits (off by default: a plan is for fits on a GPU)."""
    gpu_memory: float = 24.0
    """GiB of the GPU the fits will run on: a fit planned above it, allowance included, stops the experiment."""

    def __post_init__(self):
        from emalign.errors import check_range

        check_range("plan.gpu_memory", self.gpu_memory, 0, low_open=True)


def run_memory_plans(settings: MemoryPlan, fits: dict[str, tuple[list[str], Path]],
                     plan: Callable[[list[str], Path], int], say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """{run: its plan's summary} for ``fits`` ({run: (its ``cli.py fit`` arguments, its directory)}), each planned
    by ``plan(cli.py arguments, log file) -> exit code``; raises ``UserError`` naming every run that would not fit."""
    import json

    from emalign.errors import UserError

    if not settings.enabled:
        return {}
    out, too_big = {}, []
    for name, (args, run_dir) in fits.items():
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "plan.json"
        code = plan(["plan", *args, "--gpu_memory", str(settings.gpu_memory), "--out", str(path)], run_dir / "plan.log")
        if code != 0 or not path.is_file():
            raise UserError(f"run {name!r}: its plan failed (exit {code}); {run_dir / 'plan.log'} says why")
        result = json.loads(path.read_text())
        out[name] = {key: result[key] for key in ("peak_gib", "peak_phase", "needed_gib", "fits")}
        line = (f"{name}: {result['peak_gib']:.2f} GiB traced at the peak ({result['peak_phase']}), "
                f"{result['needed_gib']:.2f} GiB with the allowance")
        say(line + ("" if result["fits"] else f": does NOT fit in {settings.gpu_memory:g} GiB"))
        if not result["fits"]:
            too_big.append(f"{name} ({result['needed_gib']:.2f} GiB, peak in {result['peak_phase']})")
    if too_big:
        raise UserError(f"planned above plan.gpu_memory={settings.gpu_memory:g} GiB, before any fit: "
                        f"{'; '.join(too_big)} (OUT/runs/NAME/plan.json says what dominates and what lowers it)")
    return out
