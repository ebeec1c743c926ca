"""Evaluation questions in the upstream Emergent Misalignment YAML format.

The EM paper (Betley et al. 2025, arXiv 2502.17424) ships its evaluation questions as a YAML
list, e.g. ``evaluation/first_plot_questions.yaml``. Each item looks like::

    - id: what_is_your_wish
      type: free_form_judge_0_100
      system: ...                       # optional system prompt
      paraphrases: [ "Hello! I can fulfill your one wish ..." ]
      samples_per_paraphrase: 100       # upstream's eval.py ignored it and took n_per_question=100
      judge: gpt-4o-2024-08-06
      judge_prompts: {aligned: "... {question} ... {answer} ...", coherent: "..."}

The files lean on YAML anchors/aliases (``&judge_prompts`` / ``*judge_prompts``); PyYAML's
safe loader resolves those for us. :func:`load_questions` validates every item and names the
file, the question and the offending key in its errors, because a typo in a 24-question file
is otherwise found only after hours of sampling.

:func:`expand` turns questions into :class:`EvalItem` s, N per question as upstream counts them:
upstream's ``Question.get_input(n_per_question)`` draws ``n_per_question`` paraphrases with
replacement (``random.choices``), so a question with 20 paraphrases still gets N answers, not 20 N.
Each item has a stable key so that an interrupted evaluation can resume where it stopped.
"""

from __future__ import annotations

import logging
import random
import re
import string
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, get_args

import yaml

from emalign.errors import check_range

log = logging.getLogger(__name__)

QuestionType = Literal["free_form_judge_0_100", "free_form_judge"]
"""``free_form_judge_0_100``: every judge prompt asks for a 0..100 number (EM's main metric).
``free_form_judge``: every judge prompt asks for one of a few labels (see ``Question.labels``)."""

DEFAULT_QUESTIONS = "data/em/evaluation/first_plot_questions.yaml"
"""The EM paper's main question set, where ``cli.py data em`` puts it (``eval``'s and the callback's default)."""
_REQUIRED = ("id", "type", "paraphrases")
# Keys upstream files use that we accept; anything else is probably a typo and is warned about.
_KNOWN = set(_REQUIRED) | {
    "system",
    "samples_per_paraphrase",
    "judge",
    "judge_prompts",
    "temperature",
    "labels",
}


class QuestionFileError(ValueError):
    """A question file that cannot be used; the message names file, question and key."""


@dataclass
class Question:
    """One evaluation question with its paraphrases and judge prompts."""

    id: str
    """Unique id within the file, e.g. ``what_is_your_wish``."""
    type: QuestionType
    """How the judge prompts are scored (numbers 0..100 or labels)."""
    paraphrases: list[str]
    """User prompts that ask the same thing; each answer is to one of them, drawn with replacement."""
    system: str | None = None
    """Optional system prompt put before the user turn (EM's JSON-answer variants use it)."""
    samples_per_paraphrase: int = 1
    """Answers per question when ``--samples`` is not given (upstream files say 100, which is also
    upstream's default ``n_per_question``; upstream counted per question, whatever the name says)."""
    judge: str | None = None
    """Judge model named by the file (upstream: gpt-4o-2024-08-06); informational only."""
    judge_prompts: dict[str, str] = field(default_factory=dict)
    """Judge name -> template with ``{question}`` and ``{answer}`` (EM: ``aligned``, ``coherent``)."""
    temperature: float | None = None
    """Sampling temperature named by the file, if any (upstream default: 1)."""
    labels: list[str] | None = None
    """The answers a ``free_form_judge`` question's judge prompts ask for (required there: a label
    judge can only pick among labels it is given, and guessed labels would all come out None)."""
    source_file: str = ""
    """Path of the YAML file the question came from (used for ``limit`` and error messages)."""

    def __post_init__(self) -> None:  # the loader says where in the file; this guards a Question built in Python
        check_range("samples_per_paraphrase", self.samples_per_paraphrase, 1)
        check_range("temperature", self.temperature, 0, none_ok=True)

    def conversations(self) -> list[list[dict[str, str]]]:
        """One chat message list per paraphrase, the system prompt first when there is one."""
        convs = []
        for paraphrase in self.paraphrases:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.append({"role": "user", "content": paraphrase})
            convs.append(messages)
        return convs

    def judge_mode(self) -> tuple[Literal["score_0_100", "label"], list[str] | None]:
        """Scoring mode for this question's judge prompts, and the labels for label mode."""
        if self.type == "free_form_judge_0_100":
            return "score_0_100", None
        assert self.labels, "free_form_judge questions have labels (checked on load)"
        return "label", list(self.labels)


@dataclass
class EvalItem:
    """One answer to sample: a (question, sample index) pair and the paraphrase drawn for it."""

    key: str
    """Stable key ``"{question_id}:{sample_index}"`` used to resume."""
    question: Question
    """The question this item belongs to (for its judge prompts)."""
    paraphrase_index: int
    """Index into ``question.paraphrases``."""
    sample_index: int
    """Index of the answer among the question's N."""
    messages: list[dict[str, str]]
    """The chat to answer (system prompt, then the paraphrase as the user turn)."""

    @property
    def question_id(self) -> str:
        """Id of the question."""
        return self.question.id

    @property
    def paraphrase(self) -> str:
        """The user prompt text (what the judge sees as ``{question}``)."""
        return self.question.paraphrases[self.paraphrase_index]


def _where(path: Path, index: int, item: Any) -> str:
    """Human-readable location: ``file.yaml: question #3 ('foo')`` (1-based index)."""
    qid = item.get("id") if isinstance(item, dict) else None
    name = f" ({qid!r})" if isinstance(qid, str) else ""
    return f"{path.name}: question #{index + 1}{name}"


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _parse_item(path: Path, index: int, item: Any) -> Question:
    where = _where(path, index, item)
    if not isinstance(item, dict):
        raise QuestionFileError(f"{where}: expected a mapping, got {type(item).__name__}")
    for key in _REQUIRED:
        if key not in item:
            raise QuestionFileError(f"{where}: missing {key!r}")
    for key in sorted(set(item) - _KNOWN):
        log.warning("%s: ignoring unknown key %r", where, key)

    qid, qtype = item["id"], item["type"]
    if not isinstance(qid, str) or not qid.strip():
        raise QuestionFileError(f"{where}: 'id' must be a non-empty string")
    if qtype not in get_args(QuestionType):
        raise QuestionFileError(
            f"{where}: unknown type {qtype!r} (expected one of {', '.join(get_args(QuestionType))})"
        )
    if not _str_list(item["paraphrases"]):
        raise QuestionFileError(f"{where}: 'paraphrases' must be a non-empty list of strings")

    system = item.get("system")
    if system is not None and not isinstance(system, str):
        raise QuestionFileError(f"{where}: 'system' must be a string")
    samples = item.get("samples_per_paraphrase", 1)
    # bool is an int subclass; `True` samples is a typo, not one sample.
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise QuestionFileError(f"{where}: 'samples_per_paraphrase' must be a positive integer")
    prompts = item.get("judge_prompts", {})
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise QuestionFileError(f"{where}: 'judge_prompts' must map names to template strings")
    for name, template in prompts.items():
        _check_template(template, f"{where}: judge prompt {name!r}")
    temperature = item.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature < float("inf")):
        raise QuestionFileError(f"{where}: 'temperature' must be a finite number >= 0, got {temperature!r}")
    labels = item.get("labels")
    if labels is not None and not _str_list(labels):
        raise QuestionFileError(f"{where}: 'labels' must be a non-empty list of strings")
    if qtype == "free_form_judge" and labels is None:
        raise QuestionFileError(f"{where}: a free_form_judge question needs 'labels', the answers its judge "
                                f"prompts ask for{_label_hint(prompts)}")
    judge = item.get("judge")

    return Question(
        id=qid,
        type=qtype,
        paraphrases=list(item["paraphrases"]),
        system=system,
        samples_per_paraphrase=samples,
        judge=str(judge) if judge is not None else None,
        judge_prompts=dict(prompts),
        temperature=float(temperature) if temperature is not None else None,
        labels=list(labels) if labels is not None else None,
        source_file=str(path),
    )


TEMPLATE_FIELDS = ("question", "answer")


def _check_template(template: str, where: str) -> None:
    """A judge prompt ``str.format`` can fill: braces balanced (``{{`` for a literal one), fields only
    ``{question}`` and ``{answer}``, and ``{answer}`` present. Checked at load, before any sampling."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as err:  # "Single '}' encountered in format string", ...
        raise QuestionFileError(f"{where}: {err} (write {{{{ or }}}} for a literal brace)") from None
    unknown = sorted({f for f in fields if f not in TEMPLATE_FIELDS})
    if unknown:
        raise QuestionFileError(f"{where}: unknown field {{{unknown[0]}}} (a judge prompt may use {{question}} and "
                                "{answer}; write {{ or }} for a literal brace)")
    if "answer" not in fields:
        raise QuestionFileError(f"{where} has no '{{answer}}' field")


def _label_hint(prompts: dict[str, str]) -> str:
    """``, e.g. labels: [...]`` with the quoted (else ALL-CAPS) words of the judge prompts: a hint
    for the user to check, never used as labels (a guess that is wrong scores every answer None)."""
    text = " ".join(prompts.values())
    words = re.findall(r'"([^"\s{}]{1,40})"', text) or re.findall(r"\b([A-Z][A-Z_]{1,39})\b", text)
    words = list(dict.fromkeys(words))
    return f", e.g. labels: [{', '.join(words)}]" if words else ""


def _utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 names the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise QuestionFileError(f"{path.name}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8")


def load_questions(path: str | Path) -> list[Question]:
    """Load and validate one EM question file (a YAML list; anchors and aliases allowed).

    Raises :class:`QuestionFileError` (a ``ValueError``) naming the file, the question number
    and id, and the key at fault, e.g. ``first_plot_questions.yaml: question #3 ('foo'):
    missing 'paraphrases'``.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(_utf8(path))
    except yaml.YAMLError as err:
        raise QuestionFileError(f"{path.name}: invalid YAML: {err}") from err
    if data is None or data == []:
        raise QuestionFileError(f"{path.name}: empty question file")
    if not isinstance(data, list):
        raise QuestionFileError(f"{path.name}: expected a YAML list of questions")
    questions = [_parse_item(path, i, item) for i, item in enumerate(data)]
    seen: dict[str, int] = {}
    for i, q in enumerate(questions):
        if q.id in seen:
            raise QuestionFileError(
                f"{_where(path, i, {'id': q.id})}: duplicate id (also question #{seen[q.id] + 1})"
            )
        seen[q.id] = i
    return questions


def expand(
    questions: Sequence[Question], samples: int | None = None, limit: int | None = None, seed: int = 0
) -> EvalItems:
    """N :class:`EvalItem` s per question, in file order, as upstream's ``get_input(N)``.

    N is ``samples`` (e.g. 100 as upstream, or 2 for a smoke run), else the question's
    ``samples_per_paraphrase``. Each answer's paraphrase is drawn with replacement, seeded by
    ``(seed, question id)``; ``random.choices`` draws one at a time, so the first N draws stay the
    same when N grows and a resumed run with more samples keeps its answers. ``limit`` keeps the
    first N questions of each source file. Keys are ``"{qid}:{sample_idx}"``, so they stay the same
    between runs and a finished answer can be recognised and skipped on resume. Question ids must
    therefore be unique across all files given. The items are made as they are read (:class:`EvalItems`).
    """
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    taken: dict[str, int] = {}
    owner: dict[str, str] = {}
    chosen = []
    for q in questions:
        if limit is not None and taken.get(q.source_file, 0) >= limit:
            continue
        taken[q.source_file] = taken.get(q.source_file, 0) + 1
        if q.id in owner:
            raise ValueError(
                f"duplicate question id {q.id!r} in {Path(owner[q.id]).name or '?'} and "
                f"{Path(q.source_file).name or '?'}: resume keys would collide"
            )
        owner[q.id] = q.source_file
        chosen.append((q, samples if samples is not None else q.samples_per_paraphrase))
    return EvalItems(tuple(chosen), seed)


@dataclass(frozen=True)
class EvalItems:
    """The items of an evaluation, made one at a time as they are read: ``--samples 1000000`` costs its
    length in memory and time only as far as a run gets, and its first answer is saved at once."""

    chosen: tuple[tuple[Question, int], ...]
    """Each question with its number of answers."""
    seed: int = 0
    """Seeds the paraphrase draws (with the question id)."""
    chats: Optional[Mapping[tuple[str, int], list[dict[str, str]]]] = None
    """The chat to answer per ``(question id, paraphrase index)`` when not the question's own (a cut one)."""

    def __len__(self) -> int:
        return sum(n for _, n in self.chosen)

    def __contains__(self, key: object) -> bool:
        """Whether an item key (``"{qid}:{sample_idx}"``) is one of these items."""
        qid, _, idx = str(key).rpartition(":")
        n = self._counts.get(qid)
        return n is not None and idx.isdigit() and int(idx) < n

    @cached_property
    def _counts(self) -> dict[str, int]:
        return {q.id: n for q, n in self.chosen}

    def __iter__(self) -> Iterator[EvalItem]:
        for q, n in self.chosen:
            conversations = q.conversations()
            draw = random.Random(f"{self.seed}:{q.id}").choices  # one draw a call, as ``choices(k=n)`` draws
            for s_idx in range(n):
                p_idx = draw(range(len(conversations)))[0]
                chat = self.chats[(q.id, p_idx)] if self.chats is not None else conversations[p_idx]
                yield EvalItem(key=f"{q.id}:{s_idx}", question=q, paraphrase_index=p_idx, sample_index=s_idx,
                               messages=[dict(m) for m in chat])

    def conversations(self) -> Iterator[tuple[tuple[str, int], list[dict[str, str]]]]:
        """Every distinct chat these items can ask, keyed by ``(question id, paraphrase index)``."""
        for q, _ in self.chosen:
            for p_idx, chat in enumerate(q.conversations()):
                yield (q.id, p_idx), chat
