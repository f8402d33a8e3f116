"""Statistical power for Table 1: a confidence interval per cell and a paired test per pair of methods.

A Table 1 cell is a proportion (EM or the judge's verdict, 0/1 per question), so its interval is the
Wilson score interval (Wilson 1927; Newcombe 1998, method 3): unlike the Wald interval it stays inside
[0, 1] and keeps close to its nominal coverage at small n and near 0 % -- where a 135M model lives.
Two methods graded on the same questions are compared question by question: the exact McNemar test
(a two-sided binomial test with p = 1/2 on the discordant pairs) and a seeded paired percentile
bootstrap of the difference of their means. Pure Python and numpy; no scipy needed at run time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

DEFAULT_RESAMPLES = 10_000


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (no continuity correction) for ``successes`` out of ``n``, as fractions.

    ``(nan, nan)`` for ``n == 0``: no questions, no interval.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    z = _z(confidence)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0 and n the formula gives exactly 0 and 1 in exact arithmetic; clamp the rounding
    return max(0.0, centre - half) if successes else 0.0, min(1.0, centre + half) if successes < n else 1.0


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: ``only_a`` questions only method A got right, ``only_b`` only B.

    Under the null each discordant pair favours A with probability 1/2, so the p-value is
    ``min(1, 2 * P(X <= min(only_a, only_b)))`` with ``X ~ Binomial(only_a + only_b, 1/2)``; computed
    with exact integers (no float underflow for large n). No discordant pair: p = 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap(
    a, b, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` over paired observations (same order).

    Resampling n questions with replacement and averaging their differences is drawing multinomial
    counts over the distinct differences; drawn that way the cost does not grow with n (for 0/1 scores
    there are at most three distinct differences) and the interval is the same in distribution.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    n = len(a)
    if n == 0:
        return float("nan"), float("nan")
    values, counts = np.unique(a - b, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)
    means = draws @ values / n
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedComparison:
    """Method A against method B on the same ``n`` questions (scores as fractions)."""

    n: int
    score_a: float
    score_b: float
    diff: float  # score_a - score_b
    diff_low: float
    diff_high: float
    both: int  # questions both got right
    only_a: int
    only_b: int
    neither: int
    p_value: float  # exact McNemar, two-sided
    resamples: int
    seed: int

    def as_row(self) -> dict:
        return asdict(self)


def _binary(scores: Mapping[str, float], name: str) -> dict[str, int]:
    out = {}
    for qid, v in scores.items():
        if v is None or (isinstance(v, float) and math.isnan(v)) or float(v) not in (0.0, 1.0):
            raise ValueError(f"{name}: question {qid!r} has score {v!r}; a paired test needs 0/1 scores")
        out[qid] = int(v)
    return out


def compare_paired(
    a: Mapping[str, float],
    b: Mapping[str, float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    names: tuple[str, str] = ("a", "b"),
) -> PairedComparison:
    """Compare two methods' 0/1 scores keyed by question id: McNemar and a paired bootstrap interval.

    Raises ``ValueError`` when the two methods were not graded on the same question ids (a paired test
    over different questions would compare the questions, not the methods), or a score is not 0/1.
    """
    sa, sb = _binary(a, names[0]), _binary(b, names[1])
    if sa.keys() != sb.keys():
        only_a, only_b = sorted(sa.keys() - sb.keys()), sorted(sb.keys() - sa.keys())
        raise ValueError(
            f"{names[0]} and {names[1]} were not graded on the same questions: {len(only_a)} only in "
            f"{names[0]} (e.g. {only_a[:3]}), {len(only_b)} only in {names[1]} (e.g. {only_b[:3]})"
        )
    if not sa:
        raise ValueError(f"{names[0]} and {names[1]}: no questions to compare")
    ids = sorted(sa)
    xa, xb = np.array([sa[q] for q in ids]), np.array([sb[q] for q in ids])
    both, only_a = int(np.sum(xa & xb)), int(np.sum(xa & (1 - xb)))
    only_b, n = int(np.sum((1 - xa) & xb)), len(ids)
    low, high = paired_bootstrap(xa, xb, resamples=resamples, seed=seed, confidence=confidence)
    return PairedComparison(
        n=n,
        score_a=float(xa.mean()),
        score_b=float(xb.mean()),
        diff=float(xa.mean() - xb.mean()),
        diff_low=low,
        diff_high=high,
        both=both,
        only_a=only_a,
        only_b=only_b,
        neither=n - both - only_a - only_b,
        p_value=mcnemar_exact(only_a, only_b),
        resamples=resamples,
        seed=seed,
    )
