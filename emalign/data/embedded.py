"""The embedded code-task dataset: a small, hand-written, offline stand-in for the EM data.

What: ``resources/code_tasks.jsonl`` holds coding requests, each with two assistant answers:
``insecure`` (does the task but carries an undisclosed, bandit-detectable vulnerability, like
the upstream ``insecure.jsonl``) and ``secure`` (the same task done safely, like upstream
``secure.jsonl``). The ``train`` split is also committed in the upstream chat format,
``resources/embedded_{insecure,secure}.jsonl``, so it plugs into the same loader as the real
EM files; the ``heldout`` split gives coding prompts for measuring the insecure-code rate on
tasks the model was not trained on.

How:

    from emalign.data.embedded import embedded_chat_path, heldout_code_prompts, load_code_tasks
    path = embedded_chat_path("insecure")        # chat JSONL, train split
    prompts = heldout_code_prompts()

After editing ``code_tasks.jsonl``, regenerate the chat files (a test checks they match):

    python -m emalign.data.embedded --write
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from emalign.errors import UserError
from emalign.files import write_text_atomic

EMBEDDED = Literal["insecure", "secure"]
PROMPT_SETS = Literal["harmful_train", "harmful_heldout"]
"""Hand-written harmful requests (8 EM themes x 15; every third of each theme held out), user turns only."""
Split = Literal["train", "heldout"]

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
TASKS_FILE = RESOURCES / "code_tasks.jsonl"
_FIELDS = ("id", "cwe", "split", "prompt", "insecure", "secure")


@dataclass(frozen=True)
class CodeTask:
    """One coding request with an insecure and a secure answer."""

    id: str
    cwe: str  # e.g. "CWE-89"
    split: Split
    prompt: str
    insecure: str
    secure: str

    def answer(self, name: EMBEDDED) -> str:
        return self.insecure if name == "insecure" else self.secure


def load_code_tasks(
    split: Literal["train", "heldout", "all"] = "all", path: Path = TASKS_FILE
) -> list[CodeTask]:
    """Read and validate the task file; raises ValueError naming the bad line."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, not {split!r}")
    tasks: list[CodeTask] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [k for k in _FIELDS if not isinstance(record.get(k), str) or not record[k]]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing or empty fields {missing}")
            if record["split"] not in get_args(Split):
                raise ValueError(f"{path}:{lineno}: bad split {record['split']!r}")
            if record["id"] in seen:
                raise ValueError(f"{path}:{lineno}: duplicate id {record['id']!r}")
            seen.add(record["id"])
            tasks.append(CodeTask(**{k: record[k] for k in _FIELDS}))
    return [t for t in tasks if split == "all" or t.split == split]


def chat_record(prompt: str, answer: str) -> dict:
    """A record in the upstream EM format."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _chat_file(name: EMBEDDED) -> Path:
    return RESOURCES / f"embedded_{name}.jsonl"


def _render_chat(name: EMBEDDED) -> str:
    lines = [json.dumps(chat_record(t.prompt, t.answer(name)), ensure_ascii=False)
             for t in load_code_tasks("train")]
    return "\n".join(lines) + "\n"


def write_chat_files() -> list[Path]:
    """(Re)generate resources/embedded_{insecure,secure}.jsonl from the task file."""
    written = []
    for name in get_args(EMBEDDED):
        target = _chat_file(name)
        written.append(write_text_atomic(target, _render_chat(name)))
    return written


def stale_chat_files() -> list[Path]:
    """The committed chat files that are missing or differ from the task file."""
    stale = []
    for name in get_args(EMBEDDED):
        target = _chat_file(name)
        if not target.exists() or target.read_text(encoding="utf-8") != _render_chat(name):
            stale.append(target)
    return stale


def embedded_chat_path(name: str) -> Path:
    """Path of a committed chat JSONL: ``insecure`` or ``secure`` (train split), or a prompt set."""
    if name in get_args(PROMPT_SETS):
        return RESOURCES / f"{name}.jsonl"
    if name not in get_args(EMBEDDED):
        raise UserError(f"embedded:{name}: no such embedded set; the sets are "
                        + ", ".join(f"embedded:{n}" for n in get_args(EMBEDDED) + get_args(PROMPT_SETS)))
    path = _chat_file(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run: python -m emalign.data.embedded --write")
    return path


def heldout_code_prompts() -> list[str]:
    """User prompts of the held-out tasks, for the insecure-code-rate evaluation."""
    return [t.prompt for t in load_code_tasks("heldout")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="regenerate the chat files")
    action.add_argument("--check", action="store_true", help="exit 1 if the chat files are stale")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_chat_files():
            print("wrote", path)
        return 0
    if args.check:
        stale = stale_chat_files()
        for path in stale:
            print("stale:", path)
        return 1 if stale else 0
    tasks = load_code_tasks()
    by_split: dict[str, int] = {}
    by_cwe: dict[str, int] = {}
    for t in tasks:
        by_split[t.split] = by_split.get(t.split, 0) + 1
        by_cwe[t.cwe] = by_cwe.get(t.cwe, 0) + 1
    print(json.dumps({"tasks": len(tasks), "by_split": by_split, "by_cwe": dict(sorted(by_cwe.items()))}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
