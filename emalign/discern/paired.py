"""Paired statistics for labelled pairs: what a judge reads, with intervals that respect the pairing.

Every labelled set gives each prompt one good and one bad answer, so good and bad scores are not
independent samples. All intervals here come from one **pair bootstrap**: resample the pairs (with
replacement, :data:`BOOTSTRAP_RESAMPLES` times, fixed seed), recompute the statistic on each resample,
and take the 2.5th and 97.5th percentiles. Every statistic of one set shares the same resamples, so a
difference between two of them (the judge's margin over a cue) has a paired interval too.

**Tilt and content** (needs a direct and an inverted wording, both oriented so that higher = better):
per answer, ``t = (direct - inverted) / 2`` moves the same way whatever is asked (a yes-tilt), and
``c = (direct + inverted) / 2`` is the part that flips with the question. ``direct = t + c``, so the
share of the good-bad gap that t carries is ``gap(t) / gap(direct)``; the share of the per-answer
variance is ``var(t) / (var(t) + var(c))``.

**Trivial cues** (RewardBench's chosen/rejected accuracy with a rule in place of a model): fixed
rules that score an answer without reading the prompt, oriented before seeing any data ("longer is
better", "more commas is better"). A cue below 0.5 reads the reverse way; the *best cue* is the one
farthest from 0.5, taken in its better orientation.

**Style control** (RM-Bench, Liu et al. 2024, arXiv 2410.16184): *hard* pairs are those where the
bad answer is the longer one, *normal* the rest; a judge that reads length falls below chance on hard.

Below :data:`MIN_PAIRS` pairs no interval is given (``ci`` is ``None`` and ``too_few_pairs`` is set):
with a handful of pairs every resample is one of a few values and a percentile interval means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

from emalign.models.sampling import encode

BOOTSTRAP_RESAMPLES = 2000
MIN_PAIRS = 10
SEED = 0
Cue = Callable[[str], float]


def pair_wins(good: Sequence[float], bad: Sequence[float]) -> np.ndarray:
    """Per pair i: 1 if good[i] > bad[i], 1/2 on a tie, else 0."""
    g, b = np.asarray(good, dtype=float), np.asarray(bad, dtype=float)
    return (g > b) + 0.5 * (g == b)


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    """Mann-Whitney AUROC of good vs bad: the share of (good, bad) combinations with good ahead, ties half.

    From the rank sum (average ranks for ties), in O(n log n): the n x m comparison matrix it equals took
    hours inside 2,000 bootstrap resamples of 10,000 pairs."""
    n_good, n_bad = len(good), len(bad)
    ranks = rankdata(np.concatenate([good, bad]))
    return float((ranks[:n_good].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))


@dataclass(frozen=True)
class PairBootstrap:
    """Pair resamples of one set of ``n`` pairs, shared by every statistic computed on that set."""

    n: int
    resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = SEED

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        object.__setattr__(self, "index", rng.integers(0, max(self.n, 1), (self.resamples, self.n)))

    @property
    def enough(self) -> bool:
        return self.n >= MIN_PAIRS

    def draws(self, good: Sequence[float], bad: Sequence[float]) -> np.ndarray:
        """AUROC on every resample (``good[i]`` and ``bad[i]`` are pair i's scores and travel together)."""
        g, b = np.asarray(good, float), np.asarray(bad, float)
        return np.array([_auroc(g[idx], b[idx]) for idx in self.index])

    def interval(self, draws: np.ndarray) -> Optional[list[float]]:
        """The 2.5th and 97.5th percentiles; None below :data:`MIN_PAIRS` pairs."""
        if not self.enough:
            return None
        lo, hi = np.percentile(draws, [2.5, 97.5])
        return [float(lo), float(hi)]

    def auroc(self, good: Sequence[float], bad: Sequence[float]) -> dict:
        """``{"value", "ci"}``, plus ``too_few_pairs: True`` below :data:`MIN_PAIRS` pairs."""
        value = _auroc(np.asarray(good, float), np.asarray(bad, float))
        if not self.enough:
            return {"value": value, "ci": None, "too_few_pairs": True}
        return {"value": value, "ci": self.interval(self.draws(good, bad))}


def split(direct: Sequence[float], inverted: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per answer, (t, c): t = (direct - inverted) / 2 and c = (direct + inverted) / 2."""
    d, i = np.asarray(direct, float), np.asarray(inverted, float)
    return (d - i) / 2, (d + i) / 2


def tilt_content(direct: tuple[Sequence[float], Sequence[float]],
                 inverted: tuple[Sequence[float], Sequence[float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`split` of the good and of the bad answers: {"t": (good, bad), "c": (good, bad)}."""
    (tg, cg), (tb, cb) = split(direct[0], inverted[0]), split(direct[1], inverted[1])
    return {"t": (tg, tb), "c": (cg, cb)}


def tilt_shares(parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Share of the good-bad gap and of the per-answer variance that the tilt t carries."""
    (tg, tb), (cg, cb) = parts["t"], parts["c"]
    gap_t, gap_c = float(np.mean(tg - tb)), float(np.mean(cg - cb))
    var_t, var_c = float(np.var(np.concatenate([tg, tb]))), float(np.var(np.concatenate([cg, cb])))
    gap = gap_t + gap_c
    return {"gap_t": gap_t, "gap_c": gap_c,
            "gap_share_t": gap_t / gap if gap else None,
            "variance_share_t": var_t / (var_t + var_c) if var_t + var_c else None}


def _commas(text: str) -> float:
    return float(text.count(","))


def cue_functions(tokenizer=None) -> dict[str, Cue]:
    """The trivial cues: length in characters, length in tokens (when a tokenizer is given), commas."""
    cues: dict[str, Cue] = {"length_chars": lambda text: float(len(text))}
    if tokenizer is not None:
        cues["length_tokens"] = lambda text: float(len(encode(tokenizer, text)))
    cues["commas"] = _commas
    return cues


def cue_scores(cues: dict[str, Cue], good: Sequence[str], bad: Sequence[str]) -> dict[str, tuple[list, list]]:
    return {name: ([fn(a) for a in good], [fn(a) for a in bad]) for name, fn in cues.items()}


def style_split(good: Sequence[str], bad: Sequence[str]) -> dict[str, list[int]]:
    """RM-Bench's split by length: ``hard`` pairs have the longer bad answer, ``normal`` the rest."""
    hard = [len(b) > len(g) for g, b in zip(good, bad)]
    return {"hard": [i for i, h in enumerate(hard) if h], "normal": [i for i, h in enumerate(hard) if not h]}


def margin_over_cues(boot: PairBootstrap, judge: tuple[Sequence[float], Sequence[float]],
                     cues: dict[str, tuple[Sequence[float], Sequence[float]]]) -> dict:
    """The judge's AUROC minus the best cue's (the cue farthest from 0.5, in its better orientation).

    Positive means the judge separates the pairs better than any trivial cue; the interval is paired
    (the same pair resamples for the judge and the cue).
    """
    values = {name: _auroc(*map(np.asarray, scores)) for name, scores in cues.items()}
    best = max(values, key=lambda name: abs(values[name] - 0.5))
    sign = 1.0 if values[best] >= 0.5 else -1.0
    oriented = (sign * np.asarray(cues[best][0], float), sign * np.asarray(cues[best][1], float))
    value = _auroc(*map(np.asarray, judge)) - _auroc(*oriented)
    out = {"best_cue": best, "best_cue_auroc": _auroc(*oriented), "reversed": sign < 0, "value": value}
    if not boot.enough:
        return {**out, "ci": None, "too_few_pairs": True}
    draws = boot.draws(*judge) - boot.draws(*oriented)
    return {**out, "ci": boot.interval(draws)}


def _fmt(metric: dict) -> str:
    ci = metric.get("ci")
    return f"{metric['value']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else " [no CI]")


def verdict(name: str, c_auroc: Optional[dict], shares: Optional[dict], margin: dict) -> dict:
    """One headline line: is the judge question-sensitive on this set, and does it beat the best cue?

    Question-sensitive means c's AUROC interval lies wholly above 0.5: the part of the score that flips
    with the question separates good from bad. Without an inverted wording the split cannot be made and
    ``question_sensitive`` is None; so it is below :data:`MIN_PAIRS` pairs. "Beats the best cue" means the
    margin's interval lies above 0.
    """
    sensitive = None if c_auroc is None or c_auroc["ci"] is None else c_auroc["ci"][0] > 0.5
    beats = None if margin["ci"] is None else margin["ci"][0] > 0
    if c_auroc is None:
        parts = [f"{name}: question sensitivity unknown (no inverted wording to split tilt from content)"]
    elif sensitive is None:
        parts = [f"{name}: no verdict (fewer than {MIN_PAIRS} pairs carry no interval)", f"c-AUROC {_fmt(c_auroc)}"]
    else:
        parts = [f"{name}: {'question-sensitive' if sensitive else 'NOT question-sensitive'}",
                 f"c-AUROC {_fmt(c_auroc)}"]
    if shares and shares["gap_share_t"] is not None:
        parts.append(f"tilt carries {shares['gap_share_t']:.0%} of the gap and "
                     f"{shares['variance_share_t']:.0%} of the variance")
    reverse = " read in reverse" if margin["reversed"] else ""
    parts.append(f"judge {'beats' if beats else 'does not beat'} the best cue ({margin['best_cue']}{reverse}, "
                 f"AUROC {margin['best_cue_auroc']:.2f}) by {_fmt(margin)}")
    return {"question_sensitive": sensitive, "beats_best_cue": beats, "line": "; ".join(parts)}
