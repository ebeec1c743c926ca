"""``python cli.py discern``: measure how well a model's conscience tells good answers from bad ones.

    python cli.py discern --out runs/discern_base
    python cli.py discern --adapter runs/demo/adapter --sets chat --out runs/discern_demo
    python cli.py discern --sets '[my_pairs.jsonl]' --questions '["Was that kind? Answer Yes or No."]'

The work is :func:`emalign.discern.run.run_discern`; this module turns the flags into its arguments.
"""

from __future__ import annotations

from typing import Optional, Union

from emalign.commands.inference import OptionError
from emalign.conscience.verdict import DEFAULT_QUESTION
from emalign.discern.labelled import EXTRA_QUESTIONS, INVERTED_QUESTION, Wording
from emalign.discern.run import run_discern
from emalign.errors import friendly_errors


def _wordings(questions: Union[list[str], str, None], inverted: Optional[str]) -> list[Wording]:
    if questions is None:
        questions = [DEFAULT_QUESTION, *EXTRA_QUESTIONS]
    questions = [questions] if isinstance(questions, str) else list(questions)
    if not questions or any(not q.strip() for q in questions):
        raise OptionError("--questions needs at least one non-empty question")
    wordings = [Wording("default" if q == DEFAULT_QUESTION else f"q{i + 1}", q) for i, q in enumerate(questions)]
    if inverted:
        wordings.append(Wording("inverted", inverted, inverted=True))
    return wordings



def discern(
    out: str = "runs/discern",
    model: str = "smollm2-135m-instruct",
    adapter: Optional[str] = None,
    sets: Union[list[str], str] = "code chat",
    questions: Union[list[str], str, None] = None,
    inverted: Optional[str] = INVERTED_QUESTION,
    batch_size: int = 8,
    limit: Optional[int] = None,
    overwrite: bool = False,
) -> None:
    """What the conscience reads: content or a yes-tilt, against trivial cues, with a verdict per set.

    How well it separates good from bad answers, and whether through the question or a yes-tilt the same
    whichever way it is asked (c and t), against trivial cues (length, commas), on hard and normal pairs (the
    bad answer longer or not), with paired intervals and a verdict line per set.

    Every answer is scored exactly as the training loop scores rollouts (Conscience.review). With
    --adapter the adapted model itself (adapter on) asks and answers the question: this measures the
    fine-tuned model's own conscience, not the frozen base's.

    Args:
        out: output directory for discern.json and discern.md.
        model: a Hugging Face id, a local model directory, a .gguf file, or smollm2-135m-instruct.
        adapter: a PEFT adapter directory (e.g. from a fit); it is on while reviewing.
        sets: labelled sets, space separated or a list: `code` (88 secure vs insecure code twins),
            `chat` (160 hand-written, length-balanced chat pairs over EM's themes), or JSONL files of {"prompt", "good",
            "bad", optional "theme", optional "subtle"}.
        questions: direct question wordings (default: the training default plus two others).
        inverted: a question whose "yes" means bad, scored with yes/no swapped and compared with the
            first direct wording; null skips it.
        batch_size: answers per review forward.
        limit: only the first N pairs of each set.
        overwrite: replace an OUT/discern.json made with other settings (without it, such a run refuses
            before scoring; a rerun with the same settings replaces its own result).
    """
    with friendly_errors():
        if batch_size < 1:
            raise OptionError(f"--batch_size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise OptionError(f"--limit must be at least 1, got {limit}")
        names = sets.replace(",", " ").split() if isinstance(sets, str) else list(sets)
        if not names:
            raise OptionError("--sets needs at least one set")
        run_discern(out, model, adapter, names, _wordings(questions, inverted), batch_size, limit,
                    overwrite=overwrite)
