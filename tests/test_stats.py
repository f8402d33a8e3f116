"""Table 1 with power: the Wilson interval, the exact McNemar test and the paired bootstrap against reference
computations (scipy.stats, a published table, exact binomial sums by hand), and the per-cell table built on them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from evals import stats
from evals.report import PREDECESSOR, REFERENCE_METHOD, TABLE1_METHODS, compared_with, table1, table1_power

scipy_stats = pytest.importorskip("scipy.stats")


# -- Wilson interval ------------------------------------------------------------------------------
# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857-872,
# Table I, method 3 (score interval without continuity correction), 95%: a published, hand-checkable reference.
NEWCOMBE_1998 = [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)]


@pytest.mark.parametrize("k,n,low,high", NEWCOMBE_1998)
def test_wilson_interval_matches_newcombes_published_table(k, n, low, high):
    got = stats.wilson_interval(k, n)
    assert got[0] == pytest.approx(low, abs=5e-5) and got[1] == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize("n", [1, 4, 17, 100, 150, 500])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_interval_matches_scipy(n, confidence):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        want = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        low, high = stats.wilson_interval(k, n, confidence)
        assert (low, high) == pytest.approx((want.low, want.high), abs=1e-12), (k, n)
        assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_interval_edges():
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    assert stats.wilson_interval(0, 10)[0] == 0.0 and stats.wilson_interval(10, 10)[1] == 1.0
    for bad in [(-1, 3), (4, 3), (1, -1)]:
        with pytest.raises(ValueError, match="successes"):
            stats.wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson_interval(1, 3, confidence=1.0)


# -- exact McNemar --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "only_a,only_b,want",
    [
        (0, 5, 2 / 32),  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
        (1, 9, 2 * 11 / 1024),  # 2 * (1 + 10) / 2^10
        (2, 8, 2 * 56 / 1024),  # 2 * (1 + 10 + 45) / 2^10
        (3, 3, 1.0),  # balanced: the doubled tail exceeds 1
        (0, 0, 1.0),  # no discordant question: no evidence either way
    ],
)
def test_mcnemar_exact_hand_checked(only_a, only_b, want):
    assert stats.mcnemar_exact(only_a, only_b) == pytest.approx(want, rel=1e-15)
    assert stats.mcnemar_exact(only_b, only_a) == stats.mcnemar_exact(only_a, only_b)


@pytest.mark.parametrize("only_a,only_b", [(1, 2), (4, 11), (10, 25), (30, 31), (57, 20), (400, 460), (1200, 1300)])
def test_mcnemar_exact_matches_scipy_binomtest(only_a, only_b):
    want = scipy_stats.binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue
    assert stats.mcnemar_exact(only_a, only_b) == pytest.approx(want, rel=1e-9)  # no underflow at n = 2500
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 2)


# -- paired bootstrap -----------------------------------------------------------------------------
def _pair(n=120, seed=3):
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < 0.35).astype(float)
    b = np.where(rng.random(n) < 0.7, a, (rng.random(n) < 0.2).astype(float))  # correlated, as paired methods are
    return a, b


def test_paired_bootstrap_matches_index_resampling_and_scipy():
    a, b = _pair()
    low, high = stats.paired_bootstrap(a, b, resamples=20_000, seed=0)
    # the textbook route: resample question indices, average the differences
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(a), size=(20_000, len(a)))
    means = (a - b)[idx].mean(axis=1)
    by_index = np.quantile(means, [0.025, 0.975])
    ref = scipy_stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis),
        paired=True,
        n_resamples=20_000,
        method="percentile",
        random_state=2,
    ).confidence_interval
    step = 1 / len(a)  # a difference of means moves in steps of 1/n: Monte Carlo noise of one or two steps
    for want in (by_index, (ref.low, ref.high)):
        assert low == pytest.approx(want[0], abs=2 * step) and high == pytest.approx(want[1], abs=2 * step)
    assert low < a.mean() - b.mean() < high


def test_paired_bootstrap_is_seeded_and_degenerate_cases():
    a, b = _pair()
    assert stats.paired_bootstrap(a, b, seed=5) == stats.paired_bootstrap(a, b, seed=5)
    assert stats.paired_bootstrap(a, a) == (0.0, 0.0)  # the same answers: no difference in any resample
    assert stats.paired_bootstrap(np.ones(9), np.zeros(9)) == (1.0, 1.0)
    assert all(math.isnan(v) for v in stats.paired_bootstrap([], []))
    with pytest.raises(ValueError, match="one length"):
        stats.paired_bootstrap([1, 0], [1])


# -- the paired comparison ------------------------------------------------------------------------
def test_compare_paired_counts_test_and_interval():
    a = {"q1": 1, "q2": 1, "q3": 0, "q4": 0, "q5": 1, "q6": 1}
    b = {"q6": 1, "q5": 0, "q4": 1, "q3": 0, "q2": 0, "q1": 0}  # order does not matter: paired by id
    c = stats.compare_paired(a, b, resamples=2000, seed=7)
    assert (c.n, c.both, c.only_a, c.only_b, c.neither) == (6, 1, 3, 1, 1)
    assert c.score_a == pytest.approx(4 / 6) and c.score_b == pytest.approx(2 / 6) and c.diff == pytest.approx(2 / 6)
    assert c.p_value == stats.mcnemar_exact(3, 1) == pytest.approx(0.625)
    ids = sorted(a)
    assert (c.diff_low, c.diff_high) == stats.paired_bootstrap(
        [a[q] for q in ids], [b[q] for q in ids], resamples=2000, seed=7
    )
    assert c.as_row()["resamples"] == 2000


def test_compare_paired_refuses_different_questions_and_non_binary_scores():
    a = {"q1": 1, "q2": 0, "q3": 1}
    with pytest.raises(
        ValueError,
        match=r"not graded on the same questions: 1 only in react/nq .*'q3'.* 1 only in "
        r"sft/nq .*'q9'",
    ):
        stats.compare_paired(a, {"q1": 1, "q2": 0, "q9": 1}, names=("react/nq", "sft/nq"))
    with pytest.raises(ValueError, match="0/1 scores"):
        stats.compare_paired(a, {"q1": 1, "q2": 0.5, "q3": 1})
    with pytest.raises(ValueError, match="no questions"):
        stats.compare_paired({}, {})


# -- Table 1 with power ---------------------------------------------------------------------------
def _rows(method, bench, ems, judges=None, ids=None):
    ids = ids or [f"q{i}" for i in range(len(ems))]
    judges = judges or [None] * len(ems)
    return [
        {"method": method, "benchmark": bench, "question_id": q, "em": float(e), "judge": j}
        for q, e, j in zip(ids, ems, judges)
    ]


def test_predecessor_map_is_a_tree_rooted_at_the_base_model():
    assert set(PREDECESSOR) == set(TABLE1_METHODS) - {"base_cot", "react_base", "react_reasoning"}
    for method in PREDECESSOR:
        seen, m = [], method
        while m in PREDECESSOR:  # every chain ends at the base model with CoT, without a cycle
            assert m not in seen
            seen.append(m)
            m = PREDECESSOR[m]
        assert m == "base_cot"
    assert compared_with("sft123_rl1") == {"reference": REFERENCE_METHOD, "predecessor": "sft_stage3"}
    assert compared_with(REFERENCE_METHOD) == {"reference": None, "predecessor": None}


def test_table1_power_cells_and_paired_comparisons():
    ems = {
        "base_cot": [1, 0, 0, 0, 0, 0, 0, 0],
        "react_reasoning": [1, 1, 0, 0, 0, 0, 0, 0],
        "sft_stage1": [1, 1, 1, 1, 0, 0, 0, 0],
        "sft_stage2": [1, 1, 1, 1, 1, 0, 0, 1],
    }
    rows = [r for m, e in ems.items() for r in _rows(m, "embedded", e, [bool(x) for x in e])]
    rows += _rows("sft_stage2", "nq", [1, 0])  # no reference and no predecessor on nq: an interval, no test
    power = table1_power(rows, resamples=3000, seed=1)
    assert list(dict.fromkeys(power["method"])) == ["base_cot", "react_reasoning", "sft_stage1", "sft_stage2"]
    cell = power.set_index(["method", "benchmark", "metric"])
    r = cell.loc[("sft_stage1", "embedded", "em")]
    assert (r["n"], r["correct"], r["score"]) == (8, 4, 50.0)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(100 * v for v in stats.wilson_interval(4, 8)))
    assert r["reference"] == "react_reasoning" and r["reference_diff"] == 25.0 and r["reference_score"] == 25.0
    assert (r["reference_only_method"], r["reference_only_other"]) == (2, 0)
    assert r["reference_p"] == stats.mcnemar_exact(2, 0) == 0.5
    assert r["predecessor"] == "base_cot" and r["predecessor_diff"] == 37.5 and r["predecessor_p"] == 0.25
    ref = stats.compare_paired(
        {f"q{i}": v for i, v in enumerate(ems["sft_stage1"])},
        {f"q{i}": v for i, v in enumerate(ems["react_reasoning"])},
        resamples=3000,
        seed=1,
    )
    assert (r["reference_diff_low"], r["reference_diff_high"]) == (100 * ref.diff_low, 100 * ref.diff_high)
    s2 = cell.loc[("sft_stage2", "embedded", "judge")]
    assert s2["predecessor"] == "sft_stage1" and s2["score"] == 75.0 and s2["predecessor_diff"] == 25.0
    rr = cell.loc[("react_reasoning", "embedded", "em")]
    assert pd.isna(rr["reference"]) and pd.isna(rr["predecessor"]) and math.isnan(rr["reference_p"])
    nq = cell.loc[("sft_stage2", "nq", "judge")]  # judge None counts 0, as in Table 1
    assert nq["score"] == 0.0 and pd.isna(nq["reference"]) and pd.isna(nq["predecessor"])
    t1 = table1(rows)
    for (method, bench, metric), v in cell["score"].items():
        assert v == pytest.approx(t1.loc[method, (bench, metric)])  # the same numbers as Table 1
    only_intervals = table1_power(rows, paired=False)
    assert only_intervals["reference"].isna().all() and (only_intervals["ci_low"] == power["ci_low"]).all()


def test_table1_power_refuses_pairs_on_different_questions_and_repeats():
    rows = _rows("react_reasoning", "embedded", [1, 0, 1]) + _rows(
        "sft_stage1", "embedded", [1, 1, 1], ids=["q0", "q1", "q7"]
    )
    with pytest.raises(
        ValueError, match="sft_stage1/embedded and react_reasoning/embedded were not graded on the same"
    ):
        table1_power(rows)
    with pytest.raises(ValueError, match="question 'q1' is graded more than once"):
        table1_power(_rows("base_cot", "nq", [1, 0], ids=["q1", "q1"]))
