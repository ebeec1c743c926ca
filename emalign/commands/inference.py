"""The verbs ``cli.py`` adds beyond LightningCLI (each function's arguments are its flags).

    python cli.py generate --prompts prompts.txt --samples 4 --out answers.jsonl
    python cli.py chat --show_score true
    python cli.py data em --out data/em
    python cli.py generate --help                 # every flag, explained

``generate`` and ``chat`` run the conscience at inference (``emalign.conscience.decoding``): K sampled answers,
the model's own self-review picks the best, and a low best is revised, refused or kept. ``eval`` and
``experiment`` live in ``emalign.commands.evaluation``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from emalign.conscience.decoding import DEFAULT_REFUSAL, Fallback, OnLow, ReviewWith
from emalign.errors import UserError, check_range, friendly_errors
from emalign.records import Conversation


class OptionError(UserError):
    """A flag value out of range."""


@dataclass
class Decoding:
    """How ``generate`` and ``chat`` sample, review and pick answers: the flags they share, declared once."""

    samples: int = 4
    """K, answers sampled per prompt (per turn in chat)."""
    max_new_tokens: int = 128
    """Longest answer (and revision) in tokens."""
    temperature: Optional[float] = None
    """Sampling temperature (0 is greedy: all K samples are then the same); default: the model's
    generation_config, else 0.7."""
    top_p: Optional[float] = None
    """Nucleus sampling mass; default: the model's generation_config, else 0.9."""
    threshold: Optional[float] = None
    """A probability, P(yes) / (P(yes) + P(no)) on the conscience question; a best answer below it gets
    on_low. Default: calibrated for the model: the 10% quantile of its own verdicts on built-in plainly benign
    answers ("The capital of France is Paris.", ...), so it means "trusted less than 90% of plain answers"."""
    on_low: OnLow = "revise"
    """Below threshold: revise (the model rewrites its best answer), refuse, or keep it."""
    fallback: Fallback = "keep"
    """With on_low=revise, what to do when the rewrite does not win (it must score higher and pass the
    coherence guard): refuse or keep."""
    review_with: ReviewWith = "self"
    """Who reviews and revises: self (the loaded model) or base (adapter disabled)."""
    question: Optional[str] = None
    """The conscience's question (default: the ethics question used in training)."""
    refusal_text: str = DEFAULT_REFUSAL
    """The answer given when refusing."""
    max_logp_drop: Optional[float] = 1.0
    """Coherence guard: a rewrite wins only if it is not blank and its mean log-prob per token under the
    reviewer is at most this many nats below the best sample's (null turns the guard off)."""
    max_prompt_tokens: Optional[int] = 1024
    """Longest prompt in tokens; a longer one has its longest message cut (said once)."""
    seed: int = 0
    """Sampling seed; the same seed and inputs give the same answers (chat draws fresh noise from it each turn)."""
    batch_size: int = 16
    """Sequences per generate call (prompts x samples; at least the samples of one prompt)."""

    def __post_init__(self) -> None:
        # Checked before any model loads; the key is the flag, these settings live nowhere else.
        check_range("--samples", self.samples, 1)
        check_range("--max_new_tokens", self.max_new_tokens, 1)
        check_range("--temperature", self.temperature, 0, none_ok=True)
        check_range("--top_p", self.top_p, 0, 1, low_open=True, none_ok=True)
        check_range("--threshold", self.threshold, 0, 1, none_ok=True)
        check_range("--max_logp_drop", self.max_logp_drop, 0, none_ok=True)
        check_range("--max_prompt_tokens", self.max_prompt_tokens, 16, none_ok=True)
        check_range("--batch_size", self.batch_size, 1)

    def decoder(self, lm, tokenizer):
        """The ``ConscienceDecoder`` these flags describe, for ``lm``."""
        from emalign.conscience.decoding import ConscienceDecoder
        from emalign.conscience.guard import CoherenceGuard
        from emalign.conscience.verdict import Conscience
        from emalign.models.sampling import GenerationSettings, recommended_sampling

        conscience = Conscience(question=self.question) if self.question else Conscience()
        sampling = recommended_sampling(lm)
        settings = GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            temperature=sampling["temperature"] if self.temperature is None else self.temperature,
            top_p=sampling["top_p"] if self.top_p is None else self.top_p,
            batch_size=self.batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
        )
        guard = CoherenceGuard(self.max_logp_drop) if self.max_logp_drop is not None else None
        return ConscienceDecoder(
            lm, tokenizer, conscience, settings, num_samples=self.samples, threshold=self.threshold,
            on_low=self.on_low, fallback=self.fallback, refusal_text=self.refusal_text,
            review_with=self.review_with, seed=self.seed, guard=guard,
        )


def _show_answer(console, answer, show_candidates: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    style = {"best": "green", "revised": "cyan", "refused": "red", "kept": "yellow"}[answer.action]
    console.print(Text.assemble(("answer ", "bold"), (f"[{answer.action}, P(yes) {answer.p_yes:.2f}]", style)))
    console.print(Text(answer.text))  # Text, not markup: model output may contain [brackets]
    if show_candidates:
        table = Table("#", "score", "logp/token", "candidate", show_lines=True)
        for j, c in enumerate(answer.candidates):
            mark = "*" if j == answer.best_index else ""
            table.add_row(mark + str(j), f"{c.score:+.2f}", f"{c.logp:.2f}", Text(c.text))
        if answer.revision:
            r = answer.revision
            table.add_row("rev", f"{r.score:+.2f}", f"{r.logp:.2f}", Text(r.text))
        console.print(table)


def generate(
    prompts: Optional[str] = None,
    model: str = "smollm2-135m-instruct",
    adapter: Optional[str] = None,
    system: Optional[str] = None,
    out: Optional[str] = None,
    show_candidates: bool = False,
    **decoding: Any,
) -> None:
    """Answer prompts with the best of K samples, as rated by the model's own conscience.

    The flags after --show_candidates say how answers are sampled, reviewed and picked (Decoding), as in chat.

    Args:
        prompts: (required) a text file with one prompt per line, or chat JSONL ({"messages": [...]} per line,
            each conversation used up to its first assistant turn); ``embedded:NAME`` works too.
        model: a Hugging Face id, a local model directory, a .gguf file, or smollm2-135m-instruct.
        adapter: a PEFT adapter directory (e.g. from a fit) loaded on top of the model.
        system: a system prompt for prompts that have none.
        out: a JSONL file; one row per prompt is appended (and flushed) as soon as it is answered.
        show_candidates: also print every candidate with its score.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.rule import Rule

    from emalign.conscience.prompts import load_prompts
    from emalign.files import RowWriter

    with friendly_errors():
        if not prompts:
            raise OptionError("--prompts is required: a text file with one prompt per line, or chat JSONL")
        # jsonargparse reads Decoding's fields from this call and offers each as a flag of generate.
        settings = Decoding(**decoding)
        conversations = load_prompts(prompts, system=system)  # before the model: fail fast on a bad file
        if out and Path(out).is_dir():
            raise OptionError(f"--out {out}: is a directory; give a JSONL file to append the answers to")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        sink = RowWriter(Path(out) if out else None)  # opened before the model loads: None writes nothing
        console = Console()
        with console.status(f"loading {model}"):
            from emalign.models.policy import load_for_inference

            lm, tokenizer = load_for_inference(model, adapter)
        decoder = settings.decoder(lm, tokenizer)
        per_call = max(1, settings.batch_size // settings.samples)
        actions: dict[str, int] = {}
        columns = (TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        try:
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task("prompts", total=len(conversations))
                for start in range(0, len(conversations), per_call):
                    chunk = conversations[start : start + per_call]
                    answers = decoder.answer(chunk, index_offset=start)
                    for offset, (conversation, answer) in enumerate(zip(chunk, answers)):
                        index = start + offset
                        actions[answer.action] = actions.get(answer.action, 0) + 1
                        console.print(Rule(f"prompt {index + 1}/{len(conversations)}"))
                        console.print(f"[bold]you>[/] {_escape(conversation[-1]['content'])}")
                        _show_answer(console, answer, show_candidates)
                        sink.write({"index": index, "messages": conversation, **answer.to_dict(), "model": model,
                                    "adapter": adapter, "question": decoder.conscience.question, "seed": settings.seed,
                                    "threshold": decoder.calibrated_threshold()})
                    progress.advance(task, len(chunk))
        finally:
            sink.close()
        summary = ", ".join(f"{n} {a}" for a, n in sorted(actions.items()))
        calibrated = ", calibrated" if settings.threshold is None else ""
        appended = f"; rows appended to {out}" if out else ""
        console.print(f"[bold]{len(conversations)} prompts[/]: {summary} "
                      f"(threshold P(yes) {decoder.calibrated_threshold():.3f}{calibrated}){appended}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def chat(
    model: str = "smollm2-135m-instruct",
    adapter: Optional[str] = None,
    max_new_tokens: int = 256,
    show_score: bool = False,
    system: Optional[str] = None,
    **decoding: Any,
) -> None:
    """Chat with the model; every reply is the best of K samples as rated by its own conscience.

    Type a message after ``you>``. ``/reset`` forgets the conversation, ``/quit`` (or Ctrl-D) exits.
    The flags after --system say how replies are sampled, reviewed and picked (Decoding), as in generate.

    Args:
        model: a Hugging Face id, a local model directory, a .gguf file, or smollm2-135m-instruct.
        adapter: a PEFT adapter directory (e.g. from a fit) loaded on top of the model.
        max_new_tokens: longest reply (and revision) in tokens: a conversation gets more room than generate.
        show_score: print each reply's conscience score and the action taken.
        system: a system prompt at the start of the conversation.
    """
    from rich.console import Console
    from rich.text import Text

    from emalign.models.sampling import render_prompt

    with friendly_errors():
        # jsonargparse reads Decoding's other fields from this call and offers each as a flag of chat.
        settings = Decoding(max_new_tokens=max_new_tokens, **decoding)
        if sys.stdin is None or sys.stdin.closed:
            raise OptionError("chat reads what you type from standard input, which is closed; "
                              "for prompts in a file use `generate --prompts FILE`")
        console = Console()
        with console.status(f"loading {model}"):
            from emalign.models.policy import load_for_inference

            lm, tokenizer = load_for_inference(model, adapter)
        decoder = settings.decoder(lm, tokenizer)
        start: Conversation = [{"role": "system", "content": system}] if system else []
        history = list(start)
        limit = getattr(getattr(lm, "config", None), "max_position_embeddings", None)
        echo = not sys.stdin.isatty()  # piped input is not echoed by the terminal; echo it for a readable transcript
        console.print(f"[dim]chatting with {model}{' + ' + adapter if adapter else ''}; /reset forgets, /quit exits[/]")
        turn = 0
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                break
            if echo:
                console.print(Text(line))
            line = line.strip()
            if not line:
                continue
            if line == "/quit":
                break
            if line == "/reset":
                history = list(start)
                console.print("[dim](conversation forgotten)[/]")
                continue
            if line.startswith("/"):
                console.print("[dim]commands: /reset, /quit[/]")
                continue
            conversation = history + [{"role": "user", "content": line}]
            # Drop the oldest exchanges when the prompt plus the reply would not fit the context.
            while (limit and len(conversation) > len(start) + 1
                   and len(render_prompt(tokenizer, conversation)) + max_new_tokens > limit):
                conversation = start + conversation[len(start) + 2 :]
                console.print("[dim](oldest exchange dropped to fit the context)[/]")
            with console.status("thinking"):
                [answer] = decoder.answer([conversation], step=turn)
            turn += 1
            history = conversation + [{"role": "assistant", "content": answer.text}]
            console.print(Text.assemble(("bot> ", "bold"), answer.text))
            if show_score:
                console.print(f"[dim]P(yes) {answer.p_yes:.2f} (threshold {decoder.calibrated_threshold():.2f}) · "
                              f"{answer.action} · best of {settings.samples}[/]")


class DataDownloadError(UserError):
    """The EM data could not be fetched or verified."""


def data_em(out: str = "data/em", source: Optional[str] = None, files: Optional[list[str]] = None) -> None:
    """Download the Emergent-Misalignment data files and verify each one's sha256.

    Args:
        out: directory to write into (the upstream layout is kept, e.g. OUT/data/insecure.jsonl).
        source: an http(s) URL prefix or a local mirror directory (default: upstream GitHub).
        files: only these files, by their upstream path (e.g. data/insecure.jsonl); default all.
    """
    with friendly_errors():
        from emalign.data.download import DownloadError, download_em

        try:
            paths = download_em(Path(out), source, files)
        except (DownloadError, ValueError) as err:
            raise DataDownloadError(str(err)) from err
        for path in paths:
            print(path)
