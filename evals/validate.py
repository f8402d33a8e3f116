"""Invariants of the evaluation tables, as plain functions over rows (the evaluation assets' checks call them).

Each returns ``(checked, problems)``: how many things it looked at and ``"<where>: what is wrong"`` per problem.
Rows are dicts (``pyarrow.Table.to_pylist()``); ``parts`` maps a partition key to its table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import pyarrow as pa

from evals import report
from evals.datasets import find_leakage, questions_from_table
from evals.judge import JUDGE_PROMPTS
from evals.questions import EMBEDDED

ROW_METRICS = ("em", "f1", "cover_em")  # per-question scores in [0, 1]


def _ids_by_cell(rows: Iterable[Mapping]) -> dict[tuple[str, str], list[str]]:
    got: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        got.setdefault((r["method"], r["benchmark"]), []).append(r["question_id"])
    return got


# -- eval_questions and eval_predictions (per partition) ----------------------------------------------------
def question_ids_unique(parts: Mapping[str, pa.Table]) -> tuple[int, list[str]]:
    """``question_id`` is unique within each benchmark partition, whose rows are all of that benchmark."""
    problems, checked = [], 0
    for key, t in parts.items():
        ids = t.column("question_id").to_pylist()
        checked += len(ids)
        problems += [f"{key}: {q} appears {ids.count(q)} times" for q in sorted(set(ids)) if ids.count(q) > 1]
        problems += [f"{key}: row of benchmark {b}" for b in set(t.column("benchmark").to_pylist()) if b != key]
    return checked, problems


def no_training_leakage(
    parts: Mapping[str, pa.Table], training_questions: Sequence[str], training_ids: Sequence[str]
) -> tuple[int, list[str]]:
    """No evaluation question is a training question (by text; by id on the embedded benchmark only)."""
    problems, checked = [], 0
    for key, t in parts.items():
        qs = questions_from_table(t)
        checked += len(qs)
        leaks = find_leakage(qs, training_questions, training_ids if key == EMBEDDED else ())
        problems += [f"{b}/{q}: {why}" for (b, q), why in sorted(leaks.items())]
    return checked, problems


def counts_reconcile(key: str, sampled: int, meta: Mapping, rejected: int) -> list[str]:
    """A partition's source rows = sampled + not sampled + rejected + excluded (training sample, other split)."""
    parts_sum = sampled + meta.get("not_sampled", 0) + rejected
    parts_sum += meta.get("excluded_training", 0) + meta.get("excluded_split", 0)
    if meta and meta.get("rows_in") == parts_sum and meta.get("sampled") == sampled:
        return []
    return [
        f"{key}: rows_in {meta.get('rows_in')} != {sampled} sampled + {meta.get('not_sampled')} "
        f"not sampled + {rejected} rejected + excluded {meta.get('excluded_training')}/{meta.get('excluded_split')}"
    ]


def predictions_match_questions(
    parts: Mapping[str, pa.Table], question_ids: Mapping[str, Sequence[str]]
) -> tuple[int, list[str]]:
    """Each evaluated ``benchmark|method`` partition holds every question of its benchmark exactly once."""
    problems, checked = [], 0
    for key, t in parts.items():
        if t.num_rows == 0:
            continue  # not evaluated (checkpoint missing, no questions): the metadata says why
        checked += t.num_rows
        want = list(question_ids.get(key.split("|")[0], []))
        got = t.column("question_id").to_pylist()
        if sorted(got) != sorted(want):
            problems.append(
                f"{key}: {len(got)} rows ({len(set(got))} distinct) for {len(want)} questions; "
                f"missing {sorted(set(want) - set(got))[:3]}, extra {sorted(set(got) - set(want))[:3]}"
            )
    return checked, problems


def judge_parsable_rate(rows: Iterable[Mapping]) -> tuple[int, float]:
    """Rows the judge was asked about, and the share of them with a yes/no verdict (1.0 when none)."""
    asked = [r for r in rows if r["judge_raw"] is not None]
    return len(asked), sum(1 for r in asked if r["judge"] is not None) / len(asked) if asked else 1.0


# -- eval_table ---------------------------------------------------------------------------------------------
def table_coverage(rows: Iterable[Mapping], question_ids: Mapping[str, Sequence[str]]) -> tuple[int, list[str]]:
    """Per evaluated (method, benchmark) cell, the questions are exactly its benchmark's; checked = cells."""
    got = _ids_by_cell(rows)
    problems = []
    for (method, bench), ids in sorted(got.items()):
        want = question_ids.get(bench)
        if want is None:
            problems.append(f"{method}/{bench}: eval_questions partition {bench} is not materialised")
        elif sorted(ids) != sorted(want):
            problems.append(
                f"{method}/{bench}: {len(ids)} rows ({len(set(ids))} distinct) for {len(want)} questions "
                f"(stale predictions? re-materialise the partition)"
            )
    return len(got), problems


def table_complete(rows: Iterable[Mapping], question_ids: Mapping[str, Sequence[str]]) -> tuple[int, list[str]]:
    """Every evaluated method covers every benchmark that has questions; checked = methods."""
    benches = {b for b, ids in question_ids.items() if ids}
    have: dict[str, set[str]] = {}
    for r in rows:
        have.setdefault(r["method"], set()).add(r["benchmark"])
    return len(have), [
        f"{m}: no predictions for {sorted(benches - bs)}" for m, bs in sorted(have.items()) if benches - bs
    ]


def metrics_in_range(rows: Sequence[Mapping], table_rows: Iterable[Mapping]) -> tuple[int, list[str]]:
    """Per-question EM, F1 and cover-EM in [0, 1]; every cell of the flattened Table 1 in [0, 100]."""
    problems = [
        f"{r['method']}/{r['benchmark']}/{r['question_id']}: {m}={r[m]}"
        for r in rows
        for m in ROW_METRICS
        if r[m] is None or not 0.0 <= r[m] <= 1.0
    ]
    for r in table_rows:
        problems += [
            f"eval_table {r['method']}: {k}={v}"
            for k, v in r.items()
            if k not in ("method", "questions") and v is not None and not 0.0 <= v <= 100.0
        ]
    return len(rows), problems


def judged_or_explained(rows: Sequence[Mapping]) -> tuple[int, list[str]]:
    """Every row has a verdict or says why not (unparsable, skipped), and a known judge prompt and a model."""
    problems = []
    for r in rows:
        where = f"{r['method']}/{r['benchmark']}/{r['question_id']}"
        if r["judge"] is None and not (r["judge_reason"] or "").startswith(("unparsable", "skipped")):
            problems.append(f"{where}: no verdict and no reason")
        if r["judge_prompt_id"] not in JUDGE_PROMPTS or not r["judge_model"]:
            problems.append(f"{where}: judge prompt {r['judge_prompt_id']!r} / model {r['judge_model']!r}")
    return len(rows), problems


def table1_recomputes(t1: pd.DataFrame, rows: Sequence[Mapping]) -> tuple[int, list[str]]:
    """Every Table 1 cell and average recomputes from the prediction rows, in plain Python; checked = cells."""
    problems = report.average_mismatches(t1, rows)
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        for m in report.TABLE1_METRICS:
            cells.setdefault((r["method"], r["benchmark"], m), []).append(float(r[m] or 0.0))  # None verdict = 0
    for (method, bench, m), vals in cells.items():
        got = t1.loc[method, (bench, m)] if method in t1.index and (bench, m) in t1.columns else float("nan")
        if not abs(got - 100.0 * sum(vals) / len(vals)) <= 1e-6:
            problems.append(f"{method}/{bench} {m}: table {got} != recomputed {100.0 * sum(vals) / len(vals):.4f}")
    return len(cells), problems


# -- eval_comparisons ---------------------------------------------------------------------------------------
def comparisons_on_same_questions(
    power_rows: Iterable[Mapping], prediction_rows: Iterable[Mapping]
) -> tuple[int, list[str]]:
    """Each paired comparison was on the same question ids, as many as its n; checked = comparisons."""
    ids = _ids_by_cell(prediction_rows)
    problems, pairs = [], 0
    for r in power_rows:
        mine = ids.get((r["method"], r["benchmark"]), [])
        where = f"{r['method']}/{r['benchmark']} {r['metric']}"
        if len(mine) != r["n"]:
            problems.append(f"{where}: n={r['n']}, eval_predictions has {len(mine)} rows")
        for rel in report.POWER_RELATIONS:
            other = r[rel]
            if other is None:
                continue
            pairs += 1
            theirs = ids.get((other, r["benchmark"]), [])
            if sorted(mine) != sorted(theirs) or len(set(mine)) != len(mine):
                problems.append(
                    f"{where} vs {other}: {len(set(mine) ^ set(theirs))} question ids differ "
                    f"({len(mine)} vs {len(theirs)} rows)"
                )
            if r[f"{rel}_only_method"] + r[f"{rel}_only_other"] > r["n"]:
                problems.append(f"{where} vs {other}: discordant counts exceed n={r['n']}")
    return pairs, problems


def comparisons_match_table1(power_rows: Iterable[Mapping], t1: pd.DataFrame) -> tuple[int, list[str]]:
    """Every Table 1 cell has a comparison row with its score, whose interval holds it, and no row is extra."""
    cells = {(r["method"], r["benchmark"], r["metric"]): r for r in power_rows}
    problems, checked = [], 0
    flat = [(method, bench, metric, value) for method, row in t1.iterrows() for (bench, metric), value in row.items()]
    for method, bench, metric, value in flat:
        if bench == report.AVG or math.isnan(value):
            continue
        checked += 1
        r = cells.pop((method, bench, metric), None)
        if r is None:
            problems.append(f"{method}/{bench} {metric}: in eval_table ({value:.2f}), not in eval_comparisons")
        elif abs(r["score"] - value) > 1e-6:
            problems.append(f"{method}/{bench} {metric}: score {r['score']:.4f} != eval_table {value:.4f}")
        elif not r["ci_low"] - 1e-9 <= r["score"] <= r["ci_high"] + 1e-9:
            problems.append(
                f"{method}/{bench} {metric}: interval [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
                f"misses the score {r['score']:.2f}"
            )
    problems += [f"{m}/{b} {k}: in eval_comparisons, not in eval_table" for m, b, k in sorted(cells)]
    return checked, problems


# -- action_analysis (Figure 3) ------------------------------------------------------------------------------
def shares_sum_to_one(analysis: pd.DataFrame) -> tuple[int, list[str]]:
    """Per method with a correct answer the shares of correct answers sum to 1; every rate is in [0, 1]."""
    problems = []
    for method, sub in analysis.groupby("method"):
        if sub["n_correct"].sum() > 0 and abs(sub["share_of_correct"].fillna(0).sum() - 1.0) > 1e-6:
            problems.append(f"{method}: shares sum to {sub['share_of_correct'].sum():.4f}")
    for col in ("share_of_correct", "success_rate"):
        problems += [
            f"{r.method}/{r.label}: {col}={getattr(r, col)}"
            for r in analysis.itertuples()
            if not pd.isna(getattr(r, col)) and not 0.0 <= getattr(r, col) <= 1.0
        ]
    return len(analysis), problems


def action_counts_match(analysis: pd.DataFrame, rows: Sequence[Mapping]) -> tuple[int, list[str]]:
    """Per method, the answers and correct answers over the action buckets equal the prediction rows'."""
    by = analysis["correct_by"].iloc[0] if len(analysis) else "em"
    want: dict[str, list[int]] = {}
    for r in rows:
        acc = want.setdefault(r["method"], [0, 0])
        acc[0] += 1
        acc[1] += int(bool(r[by]) and float(r[by]) > 0.5)
    got = {m: [int(s["n"].sum()), int(s["n_correct"].sum())] for m, s in analysis.groupby("method")}
    problems = [
        f"{m}: figure counts {got.get(m)} != predictions {w} (answers, correct)"
        for m, w in sorted(want.items())
        if got.get(m) != w
    ]
    problems += [f"{m}: in the figure, not in eval_predictions" for m in sorted(set(got) - set(want))]
    return len(rows), problems


# -- world_model_fidelity -------------------------------------------------------------------------------------
def fidelity_consistent(rows: Sequence[Mapping]) -> tuple[int, list[str]]:
    """Measures in [0, 1], a real result for every query, hallucination = unsupported gold or prediction."""
    problems = []
    for r in rows:
        where = f"{r['method']}/{r['question_id']}/{r['query'][:40]!r}"
        problems += [f"{where}: {m}={r[m]}" for m in ("token_f1", "rouge_l") if not 0.0 <= r[m] <= 1.0]
        if r["real"] is None:
            problems.append(f"{where}: no real search result")
        if r["hallucination"] != (r["unsupported_gold"] or r["unsupported_prediction"]):
            problems.append(f"{where}: hallucination flag inconsistent")
    return len(rows), problems
