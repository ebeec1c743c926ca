"""Seeds as the unit: each statistic against scipy's own test on a case where it must agree with it."""

import numpy as np
import pytest
from scipy import stats

from emalign.studies.seeds import disagreement, effect, reading


def test_two_seeds_disagree_exactly_as_a_paired_t_test():
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + 0.3 + rng.normal(scale=0.5, size=40)  # the same units, shifted: seeds that differ
    out = disagreement([a, b])
    t = stats.ttest_rel(a, b)
    assert out["F"] == pytest.approx(t.statistic ** 2) and out["p"] == pytest.approx(t.pvalue)
    assert out["df"] == [1, 39] and out["disagree"]
    same = disagreement([a, a + 0.0])
    assert same["p"] == 1.0 and not same["disagree"]


def test_one_sample_interval_is_t_over_seed_means_when_units_are_flat():
    # Each seed's Δ is constant over units: the se over units is 0 and only the seeds' spread is left.
    seed_means = [0.3, 0.4, 0.35, 0.25]
    a = [[m] * 10 for m in seed_means]
    out = effect(a, [[0.0] * 10], seeds_a=[0, 1, 2, 3], fixed_b=True)
    ci = stats.ttest_1samp(seed_means, 0.0).confidence_interval(0.95)
    assert out["ci"] == pytest.approx([ci.low, ci.high]) and out["df"] == pytest.approx(3)
    assert out["per_seed"] == {"0": pytest.approx([0.3, 0.0]), "1": pytest.approx([0.4, 0.0]),
                               "2": pytest.approx([0.35, 0.0]), "3": pytest.approx([0.25, 0.0])}
    assert out["reading"] == "detected"


def test_identical_seeds_leave_the_unit_level_t_interval():
    rng = np.random.default_rng(1)
    delta = rng.normal(0.05, 1.0, size=30)
    base = rng.normal(size=30)
    out = effect([base + delta] * 3, [base], seeds_a=[0, 1, 2], fixed_b=True)
    ci = stats.ttest_1samp(delta, 0.0).confidence_interval(0.95)
    assert out["seed_se"] == pytest.approx(0.0, abs=1e-12) and out["df"] == pytest.approx(29)
    assert out["ci"] == pytest.approx([ci.low, ci.high])
    assert out["reading"] == f"not detected; excludes |Δ| > {max(-ci.low, ci.high):.3g}"


def test_two_arms_take_welchs_interval_over_seed_means():
    a_means, b_means = [0.3, 0.5, 0.45, 0.2], [0.1, -0.2]
    out = effect([[m] * 8 for m in a_means], [[m] * 8 for m in b_means], seeds_a=[0, 1, 2, 3], seeds_b=[0, 1])
    welch = stats.ttest_ind(a_means, b_means, equal_var=False)
    ci = welch.confidence_interval(0.95)
    assert out["ci"] == pytest.approx([ci.low, ci.high]) and out["df"] == pytest.approx(welch.df)
    assert set(out["per_seed"]) == {"0", "1"}  # only the seeds both arms ran
    assert out["per_seed"]["1"][0] == pytest.approx(0.7)
    assert set(out["disagree"]) == {"a", "b"}


def test_the_seed_term_and_the_unit_term_add_with_satterthwaites_df():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 25)) + np.array([[0.0], [0.5], [1.0]])
    base = rng.normal(size=25)
    out = effect(a, [base], seeds_a=[0, 1, 2], fixed_b=True)
    seed_var = (a.mean(1) - base.mean()).var(ddof=1) / 3
    unit_var = (a.mean(0) - base).var(ddof=1) / 25
    assert out["se"] ** 2 == pytest.approx(seed_var + unit_var)
    df = (seed_var + unit_var) ** 2 / (seed_var ** 2 / 2 + unit_var ** 2 / 24)
    assert out["df"] == pytest.approx(df)
    assert out["ci"] == pytest.approx([out["mean"] + s * stats.t.ppf(0.975, df) * out["se"] for s in (-1, 1)])


def test_one_seed_gives_no_seed_level_interval():
    out = effect([[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]], seeds_a=[0], fixed_b=True)
    assert out["ci"] is None and out["reading"] == "no interval (one seed)"
    assert out["disagree"]["a"] is None


@pytest.mark.parametrize("ci, text", [([0.1, 0.3], "detected"), ([-0.3, -0.01], "detected"),
                                      ([-0.02, 0.05], "not detected; excludes |Δ| > 0.05"),
                                      ([-0.2, 0.05], "not detected; excludes |Δ| > 0.2")])
def test_a_null_says_what_it_excludes(ci, text):
    assert reading(ci) == text
