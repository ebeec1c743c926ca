"""Statistics every wing uses: a mean with its standard error, and a binomial interval.

The seed-level intervals of a study are :mod:`emalign.studies.seeds` (scipy's t and F quantiles); the paired
bootstrap of discernment is :mod:`emalign.discern.paired`. Where scipy serves, it is used; what stays our own,
and why: the Wilson interval takes fractional successes (a tie counts half a win), which
``scipy.stats.binomtest`` refuses; the pair bootstrap draws one set of resamples shared by every statistic of a
set, so that differences between statistics pair (``scipy.stats.bootstrap`` resamples per call; a test checks
our interval against it); the OpenAI judge's retries stay its own (``urllib3.Retry`` has no whole-request
deadline, no cancelling of queued retries on Ctrl+C, and does not retry a 200 whose body is not JSON).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def mean_se(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; None when undefined
    (no values for the mean; fewer than two for the standard error)."""
    from scipy.stats import sem

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    return sum(xs) / len(xs), (float(sem(xs, ddof=1)) if len(xs) > 1 else None)


def wilson_interval(k: int | float, n: int | float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (95% for z = 1.96).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at k = 0 or k = n,
    which matters for small per-question counts. ``n = 0`` gives ``(nan, nan)``.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)
