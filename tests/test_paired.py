"""Paired statistics of discernment: each number against a hand computation, and the verdict line."""

from __future__ import annotations

import numpy as np
import pytest

from emalign.discern.labelled import LabelledPair, analyse
from emalign.discern.paired import (
    MIN_PAIRS,
    PairBootstrap,
    cue_functions,
    margin_over_cues,
    style_split,
    tilt_content,
    tilt_shares,
)


def test_tilt_and_content_by_hand():
    # Two pairs. direct = t + c, inverted = c - t (both oriented so that higher = better).
    direct = ([3.0, 1.0], [1.0, 0.0])
    inverted = ([-1.0, 1.0], [-1.0, 0.0])
    parts = tilt_content(direct, inverted)
    np.testing.assert_allclose(parts["t"][0], [2.0, 0.0])  # (3 - -1) / 2, (1 - 1) / 2
    np.testing.assert_allclose(parts["t"][1], [1.0, 0.0])
    np.testing.assert_allclose(parts["c"][0], [1.0, 1.0])
    np.testing.assert_allclose(parts["c"][1], [0.0, 0.0])
    shares = tilt_shares(parts)
    # gap(t) = mean(2-1, 0-0) = .5; gap(c) = mean(1, 1) = 1; direct gap 1.5 -> t carries 1/3.
    assert shares["gap_t"] == 0.5 and shares["gap_c"] == 1.0 and shares["gap_share_t"] == pytest.approx(1 / 3)
    # var(t) over [2, 0, 1, 0] = .6875; var(c) over [1, 1, 0, 0] = .25.
    assert shares["variance_share_t"] == pytest.approx(0.6875 / (0.6875 + 0.25))


def test_pair_bootstrap_resamples_pairs_together():
    boot = PairBootstrap(12, resamples=50, seed=3)
    good, bad = np.arange(12.0), np.arange(12.0) - 0.5  # every good beats its own bad, not every other bad
    draws = boot.draws(good, bad)
    for idx, value in zip(boot.index, draws):  # each draw is the AUROC of the resampled pairs, by hand
        wins = sum((g > b) + 0.5 * (g == b) for g in good[idx] for b in bad[idx])
        assert value == pytest.approx(wins / 144)
    out = boot.auroc(good, bad)
    assert out["ci"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))


def test_too_few_pairs_carry_no_interval():
    out = PairBootstrap(1).auroc([1.0], [0.0])  # the old DeLong interval said [1.0, 1.0] here
    assert out == {"value": 1.0, "ci": None, "too_few_pairs": True}
    assert PairBootstrap(MIN_PAIRS).auroc(list(range(MIN_PAIRS)), [0.0] * MIN_PAIRS)["ci"] is not None


def test_cues_and_style_split_by_hand():
    good, bad = ["a, b, c", "short", "mid one"], ["xx", "a longer one", "mid two"]
    cues = cue_functions()
    assert [cues["length_chars"](a) for a in good] == [7.0, 5.0, 7.0] and cues["commas"](good[0]) == 2.0
    # Hard: the bad answer is strictly longer (pair 1 only; pair 2 ties).
    assert style_split(good, bad) == {"hard": [1], "normal": [0, 2]}


def test_margin_takes_the_best_cue_in_its_better_orientation():
    n = 20
    judge = (list(np.arange(n) + 0.5), list(np.arange(n)))  # every good beats its own bad: AUROC > .5
    cues = {"weak": ([1.0] * n, [1.0] * n),  # all ties: 0.5
            "strong_reversed": ([0.0] * n, [1.0] * n)}  # always prefers the bad answer: AUROC 0
    boot = PairBootstrap(n, resamples=200)
    out = margin_over_cues(boot, judge, cues)
    assert out["best_cue"] == "strong_reversed" and out["reversed"] and out["best_cue_auroc"] == 1.0
    judge_auroc = np.mean([[g > b for b in judge[1]] for g in judge[0]])
    assert out["value"] == pytest.approx(judge_auroc - 1.0)
    assert out["ci"][1] < 0  # the judge is worse than reading the cue in reverse


def _pairs(n: int, rng) -> list[LabelledPair]:
    out = []
    for i in range(n):
        good, bad = "g" * int(rng.integers(20, 40)), "b" * int(rng.integers(20, 40))
        out.append(LabelledPair(f"prompt {i}", good, bad))
    return out


def test_verdict_flips_on_a_pure_tilt_judge():
    """A judge whose scores are pure tilt (it says yes to either question for the good answer) is not
    question-sensitive; one whose scores flip with the question is. Everything else is equal."""
    rng = np.random.default_rng(0)
    n = 60
    pairs = _pairs(n, rng)
    good, bad = rng.normal(1, 1, n), rng.normal(0, 1, n)  # the same separation for both judges
    tilt = analyse("tilt", pairs, (good, bad), (-good, -bad))  # inverted says the opposite: pure t
    content = analyse("content", pairs, (good, bad), (good, bad))  # inverted agrees: pure c
    assert tilt["verdict"]["question_sensitive"] is False
    assert tilt["tilt_content"]["gap_share_t"] == pytest.approx(1.0)
    assert tilt["tilt_content"]["c"]["auroc"]["value"] == 0.5
    assert tilt["verdict"]["line"].startswith("tilt: NOT question-sensitive; c-AUROC 0.50")
    assert content["verdict"]["question_sensitive"] is True
    assert content["tilt_content"]["gap_share_t"] == pytest.approx(0.0)
    assert content["verdict"]["line"].startswith("content: question-sensitive; c-AUROC")
    # The judge's own AUROC is the same in both: only the split tells them apart.
    assert tilt["judge"]["auroc"] == content["judge"]["auroc"]


def test_analyse_reports_cues_split_and_margin_by_hand():
    pairs = [LabelledPair("p", "long good answer", "bad"), LabelledPair("q", "ok", "a bad, longer one")] * 6
    direct = ([1.0, 1.0] * 6, [0.0, 0.0] * 6)  # the judge gets every pair right: AUROC 1
    out = analyse("s", pairs, direct, None)
    # Lengths: good {16, 2}, bad {3, 17}, each kind equally often: 16>3 wins, 16>17, 2>3, 2>17 lose -> 1/4.
    assert out["cues"]["length_chars"]["auroc"]["value"] == pytest.approx(0.25)
    assert out["cues"]["length_chars"]["accuracy"]["value"] == pytest.approx(0.5)  # 16>3 yes, 2>17 no
    # Commas: good {0, 0}, bad {0, 1}: tie, loss, tie, loss -> 1/4 as well; the first of the tied cues is best.
    assert out["cues"]["commas"]["auroc"]["value"] == pytest.approx(0.25)
    margin = out["margin_over_best_cue"]
    assert margin["best_cue"] == "length_chars" and margin["reversed"] and margin["value"] == pytest.approx(0.25)
    assert out["style"]["hard"]["n"] == 6 and out["style"]["normal"]["n"] == 6
    assert out["style"]["hard"]["judge"]["value"] == 1.0
    assert "tilt_content" not in out and out["verdict"]["question_sensitive"] is None
    assert out["verdict"]["line"].startswith("s: question sensitivity unknown")


def test_auroc_is_mann_whitney_u_over_n_m_with_ties():
    """The rank-sum AUROC (O(n log n)) against scipy's U statistic, on scores with many ties."""
    from scipy.stats import mannwhitneyu

    from emalign.discern.paired import _auroc

    rng = np.random.default_rng(3)
    for n, m in [(1, 1), (5, 7), (60, 40), (300, 2)]:
        good, bad = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, m).astype(float)
        assert _auroc(good, bad) == pytest.approx(mannwhitneyu(good, bad).statistic / (n * m))


def test_the_pair_bootstrap_interval_agrees_with_scipy():
    """An independent oracle: scipy.stats.bootstrap, pairs resampled together (``paired=True``), percentile
    intervals, its own random draws. An index that stopped resampling would give [AUROC, AUROC]."""
    from scipy import stats

    from emalign.discern.paired import _auroc

    rng = np.random.default_rng(7)
    good, bad = rng.normal(0.8, 1, 40), rng.normal(0, 1, 40)
    ours = PairBootstrap(40, resamples=4000).auroc(good, bad)
    theirs = stats.bootstrap((good, bad), lambda g, b: _auroc(g, b), paired=True, vectorized=False,
                             n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert ours["ci"][1] - ours["ci"][0] > 0.1  # a real spread over resamples
    assert ours["ci"] == pytest.approx([theirs.low, theirs.high], abs=0.02)


def test_mean_se_by_hand():
    from emalign.stats import mean_se

    mean, se = mean_se([1.0, 2.0, 4.0, None, float("nan")])  # None and NaN are not values
    assert mean == pytest.approx(7 / 3)
    assert se == pytest.approx((7 / 3 / 3) ** 0.5)  # sample variance ((4 + 1 + 25) / 9) / 2 = 7/3, over n = 3
    assert mean_se([5.0]) == (5.0, None) and mean_se([]) == (None, None)


@pytest.mark.parametrize("judge_wins", [True, False])
def test_the_verdict_says_whether_the_judge_beats_the_best_cue(judge_wins):
    from emalign.discern.paired import verdict

    n = 40
    rng = np.random.default_rng(1)
    lengths = (rng.normal(0, 1, n), rng.normal(0, 1, n))  # a cue that knows nothing: AUROC about .5
    separated = (np.arange(n) + n, np.arange(n) + 0.0)  # every good answer above every bad one: AUROC 1
    judge = separated if judge_wins else lengths
    cues = {"length_chars": separated if not judge_wins else lengths}
    margin = margin_over_cues(PairBootstrap(n), judge, cues)
    line = verdict("s", None, None, margin)
    assert line["beats_best_cue"] is judge_wins
    assert ("judge beats the best cue" in line["line"]) is judge_wins
