"""Training seeds as the unit of an effect: per-seed values, an interval that counts the seeds, a test of
whether they disagree, and what a null excludes.

A fit's seed moves everything after it (its samples, its pairs, its adapter), and two seeds of one arm can
differ far beyond the standard error over prompts, which says only how precisely one fit was measured on
one fixed set of prompts (or labelled pairs: the *units*). So an arm's effect is reported three ways:

- **per seed**: that seed's mean difference over the units ± its unit-level se;
- **seeds as the unit**: the mean of the seed means ± a Student t interval. Its variance is the seed
  means' (their spread over n: against a fixed baseline, which has no training seed, n - 1 df; Welch's
  between two arms, Welch-Satterthwaite df) plus the pooled unit-level variance (units - 1 df); its df
  combine the two by Satterthwaite. Why t and not a bootstrap over seeds: with 2-4 seeds a bootstrap has a
  handful of distinct resamples and its variance is (n - 1)/n of the sample's, narrowest exactly where
  seeds are fewest; t's tails at few df price that in wherever the seeds' spread dominates. Why add the
  unit-level variance: the seed means are measured on the same units, so their spread leaves out which
  units were drawn. The seed-by-unit noise is counted in both terms, so the interval errs wide. Its known
  weakness: seeds that agree by chance make the seed term, and so the interval, small;
- **seeds disagree**: the seeds' per-unit values as a two-way layout without replication (seeds x units,
  the units as blocks), F = MS_seed / MS_residual on (n - 1, (n - 1)(units - 1)) df. p < 0.05 says the
  seeds differ beyond their per-unit noise: no single fit's unit-level se speaks for the arm.

An interval that holds zero is "not detected; excludes |Δ| > X", X the interval's farthest end from zero:
never "did not move".
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats

from emalign.stats import mean_se

LEVEL = 0.95
DISAGREE_P = 0.05


def unit_mean_se(values: Sequence[float]) -> list[Optional[float]]:
    """[mean, se over units] (se None below two units): the project's one ``mean_se``, as a JSON list."""
    return list(mean_se(values))


def disagreement(seeds: Sequence[Sequence[float]]) -> Optional[dict]:
    """Do the seeds (rows: seeds, columns: the same units) differ beyond their per-unit noise? Two-way
    ANOVA without replication, units as blocks; None for fewer than two seeds or units."""
    y = np.asarray(seeds, float)
    s, u = y.shape
    if s < 2 or u < 2:
        return None
    resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
    ms_seed = u * ((y.mean(1) - y.mean()) ** 2).sum() / (s - 1)
    ms_resid = (resid ** 2).sum() / ((s - 1) * (u - 1))
    df = (s - 1, (s - 1) * (u - 1))
    tiny = 1e-12 * float(y.var())  # rounding, not data: identical seeds leave ~1e-17, not 0
    ms_seed, ms_resid = (m if m > tiny else 0.0 for m in (ms_seed, ms_resid))
    if ms_resid == 0:
        p = 1.0 if ms_seed == 0 else 0.0
        return {"F": None, "df": list(df), "p": p, "disagree": p < DISAGREE_P}
    f = ms_seed / ms_resid
    p = float(stats.f.sf(f, *df))
    return {"F": float(f), "df": list(df), "p": p, "disagree": p < DISAGREE_P}


def interval(mean: float, se: Optional[float], df: Optional[float]) -> Optional[list[float]]:
    """mean ± t_{df, 97.5%} se; None where se or df is undefined."""
    if se is None or df is None or not df > 0:
        return None
    half = float(stats.t.ppf(0.5 + LEVEL / 2, df)) * se
    return [mean - half, mean + half]


def reading(ci: Optional[list[float]]) -> str:
    """'detected' where the interval excludes zero, else what it still excludes."""
    if ci is None:
        return "no interval (one seed)"
    if ci[0] > 0 or ci[1] < 0:
        return "detected"
    return f"not detected; excludes |Δ| > {max(abs(ci[0]), abs(ci[1])):.3g}"


def effect(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], seeds_a: Sequence[int],
           seeds_b: Sequence[int] = (), fixed_b: bool = False) -> dict:
    """Arm a minus b. ``a[i][u]``: seed ``seeds_a[i]``'s value on unit u; likewise b. With ``fixed_b`` b is
    one model with no training seed (the baseline): a one-sample interval over a's seeds. Otherwise two
    arms: Welch's interval over both arms' seed means, per-seed values for the seeds both arms ran."""
    ya, yb = np.asarray(a, float), np.asarray(b, float)
    if fixed_b:
        assert len(yb) == 1, "a fixed baseline is one model"
        per_seed = {str(s): unit_mean_se(row - yb[0]) for s, row in zip(seeds_a, ya)}
        means = ya.mean(1) - yb[0].mean()
        spread = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else None
        df = len(means) - 1 or None
    else:
        rows_b = dict(zip(seeds_b, yb))
        per_seed = {str(s): unit_mean_se(row - rows_b[s]) for s, row in zip(seeds_a, ya) if s in rows_b}
        va, vb = (y.mean(1).var(ddof=1) / len(y) if len(y) > 1 else None for y in (ya, yb))
        spread = math.sqrt(va + vb) if va is not None and vb is not None else None
        df = None
        if spread is not None:
            df = ((va + vb) ** 2 / (va ** 2 / (len(ya) - 1) + vb ** 2 / (len(yb) - 1)) if va + vb > 0
                  else min(len(ya), len(yb)) - 1)
    mean, unit_se = unit_mean_se(ya.mean(0) - yb.mean(0))
    se, df_all = None, None
    if spread is not None:
        v_seed, v_unit, df_unit = spread ** 2, (unit_se or 0.0) ** 2, ya.shape[1] - 1
        se = math.sqrt(v_seed + v_unit)
        df_all = (v_seed + v_unit) ** 2 / (v_seed ** 2 / df + v_unit ** 2 / df_unit) if se > 0 else df
    ci = interval(mean, se, df_all)
    return {"per_seed": per_seed, "mean": mean, "seed_se": spread, "unit_se": unit_se, "se": se, "df": df_all,
            "ci": ci, "reading": reading(ci),
            "disagree": {"a": disagreement(ya), **({} if fixed_b else {"b": disagreement(yb)})}}


def disagreeing(e: dict) -> list[str]:
    """Which sides of the effect ("a", "b") have seeds that disagree beyond their per-unit noise."""
    return [side for side, d in e["disagree"].items() if d and d["disagree"]]
