"""Statistics every wing uses: a mean with its standard error, and a binomial interval.

The seed-level intervals of a study are :mod:`emalign.studies.seeds`; the paired bootstrap of discernment is
:mod:`emalign.discern.paired`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def mean_se(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; None when undefined
    (no values for the mean; fewer than two for the standard error)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var / len(xs))


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
