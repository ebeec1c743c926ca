"""Degenerate answers: blank, repetitive or not language. A rule, so that no judge decides it.

DPO on a policy's own samples can drift into answers a judge scores oddly ("SMO:10:10:11:12...", one
phrase over and over). An answer is *degenerate* when, in this order:

- **blank**: it holds no word (a run of two or more letters);
- **not language**: letters are under half of its non-space characters;
- **repetitive**: of its lower-cased word trigrams (at least :data:`MIN_TRIGRAMS` of them), under half are
  distinct, i.e. more than half of its three-word windows repeat an earlier one.

Answers are cut at a token budget, so a short or unfinished answer is not degenerate by itself.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Sequence

MIN_TRIGRAMS = 6
MIN_LETTER_SHARE = 0.5
MIN_DISTINCT_TRIGRAMS = 0.5
Reason = Literal["blank", "not language", "repetitive"]
_WORD = re.compile(r"[^\W\d_]{2,}")


def degenerate(text: str) -> Optional[Reason]:
    """Why ``text`` is degenerate, or None when it is not."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return "blank"
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < MIN_LETTER_SHARE * len(visible):
        return "not language"
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(trigrams) >= MIN_TRIGRAMS and len(set(trigrams)) < MIN_DISTINCT_TRIGRAMS * len(trigrams):
        return "repetitive"
    return None


def degenerate_rate(texts: Sequence[str]) -> float:
    """Share of ``texts`` that are degenerate (0 for none)."""
    return sum(degenerate(t) is not None for t in texts) / len(texts) if texts else 0.0
