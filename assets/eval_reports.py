"""Evaluation reports over the graded predictions of ``assets/evaluation.py``: Table 1 (``eval_table``), its
intervals and paired tests (``eval_comparisons``), Figure 3 (``action_analysis``) and the world-model
fidelity of the SFT-3 and RL checkpoints."""

import base64
import dataclasses
import math
from collections.abc import Collection

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from agent.engines import load_engine, release_engines
from agent.models import EMBEDDED_MODEL
from agent.rollout import Rollout, search_tool
from assets.evaluation import (
    EMBEDDED,
    EMBEDDED_JUDGE_NOTE,
    FIDELITY_METHODS,
    FIDELITY_SCHEMA,
    GROUP,
    METHODS,
    _checkpoint,
    _partition_files,
    _questions,
    _read_predictions,
    _result,
    checkpoint_template,
)
from assets.metadata import bar_plot, markdown_table, table_metadata, timed
from assets.pairs import NOT_MATERIALISED, _table
from assets.resources import SearchEngineResource
from assets.settings import rollout_settings
from assets.storage import StorageResource
from assets.trajectories import EngineConfig
from evals import report
from evals.fidelity import (
    aggregate_fidelity,
    compare_observation,
    probe_simulated_results,
    simulated_observations,
)
from evals.judge import JUDGE_PROMPTS
from evals.report import flatten_table1, unflatten_table1
from qadata.answers import score
from qadata.io import atomic_write_text
from qadata.paths import table_path
from qadata.sql import _ident, _sql_literal

TABLE_METRICS = ("em", "judge")  # flattened as ``<metric>_<benchmark>``: metric names hold no underscore
ROW_METRICS = ("em", "f1", "cover_em")


# -- eval_table (Table 1) -----------------------------------------------------------------------
def _write_views(storage: StorageResource) -> str:
    """DuckDB views over the evaluation tables, for a plain ``duckdb`` shell (``autocoa sql`` has them built in)."""
    home = storage.home
    preds = str(table_path(home, ["eval_predictions"]).parent / "partition=*" / "data.parquet")
    sql = (
        "-- DuckDB views over the evaluation tables: `duckdb -init views.sql`, or execute this file in a session.\n"
        "-- `autocoa sql` already offers eval_predictions, eval_table and action_analysis as views.\n"
        f"CREATE OR REPLACE VIEW {_ident('eval_predictions')} AS SELECT * FROM read_parquet("
        f"{_sql_literal(preds)}, hive_partitioning = true, union_by_name = true);\n"
        f"CREATE OR REPLACE VIEW {_ident('eval_table')} AS SELECT * FROM read_parquet("
        f"{_sql_literal(str(table_path(home, ['eval_table'])))});\n"
        "-- Table 1 recomputed in SQL, long form: percent per (method, benchmark)\n"
        "CREATE OR REPLACE VIEW eval_scores AS SELECT method, benchmark, count(*) AS questions, 100 * avg(em) AS em,\n"
        "  100 * avg(coalesce(judge::INTEGER, 0)) AS judge FROM eval_predictions GROUP BY ALL ORDER BY ALL;\n"
    )
    path = storage.artifact_dir("eval_table") / "views.sql"
    atomic_write_text(path, sql)
    return str(path)


class EvalTableConfig(dg.Config):
    paper_table1: str = Field(
        "",
        description=(
            "CSV of the paper's Table 1 (paper_row, method, benchmark, metric, value), shown beside ours; "
            "default: configs/paper_table1.csv of this repository (shipped with its header only)."
        ),
    )


@dg.asset(
    group_name=GROUP,
    deps=["eval_predictions"],
    kinds={"python", "parquet", "duckdb"},
    tags={"autocoa/stage": "evaluation"},
)
def eval_table(
    context: dg.AssetExecutionContext, config: EvalTableConfig, storage: StorageResource
) -> dg.Output[pa.Table]:
    """Table 1: EM and LLM-judged accuracy (percent) per method and benchmark with macro averages, from every materialised eval_predictions partition."""
    md: dict = {}
    with timed(md):
        rows, counts = _read_predictions(storage)
        if rows.num_rows == 0:
            raise dg.Failure(
                f"eval_table: none of the {len(counts)} materialised eval_predictions partitions holds "
                "predictions; materialise eval_predictions (and the checkpoints it evaluates) first"
            )
        df = rows.select(["method", "benchmark", "question_id", *TABLE_METRICS, "judge_model"]).to_pandas()
        methods = [m for m in METHODS if m in set(df["method"])] + sorted(set(df["method"]) - set(METHODS))
        t1 = report.table1(df, metrics=TABLE_METRICS, methods=methods)
        intervals = report.table1_power(df, metrics=TABLE_METRICS, methods=methods, paired=False)
        table = flatten_table1(t1, df.groupby("method").size().to_dict())
        views = _write_views(storage)
    try:
        paper = report.paper_table1(TABLE_METRICS, config.paper_table1 or None)
    except (ValueError, FileNotFoundError) as exc:
        raise dg.Failure(f"eval_table: the paper's Table 1 cannot be read: {exc}") from exc
    complete = [m for m in methods if not math.isnan(t1.loc[m, (report.AVG, "em")])]
    context.log.info(
        "eval_table: %d methods x %d benchmarks from %d partitions (%d empty)",
        len(methods),
        len(t1.columns) // len(TABLE_METRICS) - 1,
        len(counts),
        sum(1 for n in counts.values() if n == 0),
    )
    md.update(table_metadata(table, preview_columns=["method", "questions", "em_avg", "judge_avg"]))
    md.update(
        {
            "table1": dg.MetadataValue.md(
                report.table1_markdown(
                    t1,
                    intervals=intervals,
                    caption=(
                        "**Table 1 (ours)**: percent [95% Wilson interval]; Avg = unweighted mean over the benchmarks; — = the "
                        "method lacks that benchmark; paired tests in eval_comparisons. LLM = judged by "
                        + ", ".join(sorted(set(df["judge_model"])))
                        + (f" ({EMBEDDED_JUDGE_NOTE})" if EMBEDDED_MODEL in set(df["judge_model"]) else "")
                        + "."
                    ),
                )
            ),
            "ours_vs_paper": dg.MetadataValue.md(report.ours_vs_paper_markdown(t1, paper)),
            "paper_table1": dg.MetadataValue.md(
                report.table1_markdown(
                    paper,
                    caption=f"**The paper's Table 1** ({report.PAPER_TABLE1_SOURCE}; "
                    f"copied into {paper.attrs['path']})",
                )
                if len(paper.index)
                else f"The paper's Table 1 is not filled in yet ({paper.attrs['path']} holds no rows)."
            ),
            "paper_table1_rows": len(paper.index),
            "paper_average_flags": dg.MetadataValue.json(paper.attrs["average_flags"]),
            "methods": dg.MetadataValue.json(methods),
            "partitions_read": len(counts),
            "partitions_not_evaluated": dg.MetadataValue.json(sorted(k for k, n in counts.items() if n == 0)),
            "duckdb_views": dg.MetadataValue.path(views),
            "sql": dg.MetadataValue.md(
                'Queryable as DuckDB views: `autocoa sql "select * from eval_table"`, '
                '`autocoa sql "select method, benchmark, avg(em) from eval_predictions group by all"` '
                f"(one view per asset, built from the Parquet tables), or `duckdb -init {views}` (adds `eval_scores`)."
            ),
        }
    )
    if complete:
        md["averages_plot"] = bar_plot(
            complete,
            {
                "EM": [t1.loc[m, (report.AVG, "em")] for m in complete],
                "LLM": [t1.loc[m, (report.AVG, "judge")] for m in complete],
            },
            "Table 1 averages (methods with every benchmark)",
            "percent",
        )
    return dg.Output(table, metadata=md)


def _question_ids(storage: StorageResource) -> dict[str, list[str]]:
    return {
        k: pq.read_table(f, columns=["question_id"]).column("question_id").to_pylist()
        for k, f in _partition_files(storage, "eval_questions").items()
    }


@dg.asset_check(
    asset="eval_table",
    blocking=True,
    description=(
        "Coverage: for every evaluated (method, benchmark), each eval_questions question appears exactly once and no other."
    ),
)
def eval_table_coverage(storage: StorageResource) -> dg.AssetCheckResult:
    if _table(storage, "eval_table") is None:
        return NOT_MATERIALISED
    rows, _ = _read_predictions(storage)
    questions = _question_ids(storage)
    got: dict[tuple[str, str], list[str]] = {}
    for r in rows.select(["method", "benchmark", "question_id"]).to_pylist():
        got.setdefault((r["method"], r["benchmark"]), []).append(r["question_id"])
    problems = []
    for (method, bench), ids in sorted(got.items()):
        want = questions.get(bench)
        if want is None:
            problems.append(f"{method}/{bench}: eval_questions partition {bench} is not materialised")
        elif sorted(ids) != sorted(want):
            problems.append(
                f"{method}/{bench}: {len(ids)} rows ({len(set(ids))} distinct) for {len(want)} questions "
                f"(stale predictions? re-materialise the partition)"
            )
    return _result(rows.num_rows, problems, "all partitions", evaluated_cells=len(got))


@dg.asset_check(
    asset="eval_table",
    description=(
        "Completeness: every evaluated method covers every benchmark that has questions (else its averages are missing)."
    ),
)
def eval_table_complete(storage: StorageResource) -> dg.AssetCheckResult:
    rows, _ = _read_predictions(storage)
    benches = {b for b, ids in _question_ids(storage).items() if ids}
    have: dict[str, set[str]] = {}
    for r in rows.select(["method", "benchmark"]).to_pylist():
        have.setdefault(r["method"], set()).add(r["benchmark"])
    problems = [f"{m}: no predictions for {sorted(benches - bs)}" for m, bs in sorted(have.items()) if benches - bs]
    return _result(len(have), problems, "all partitions", dg.AssetCheckSeverity.WARN)


@dg.asset_check(
    asset="eval_table",
    blocking=True,
    description=("Metrics in range: per-question EM, F1 and cover-EM in [0, 1], Table 1 cells in [0, 100]."),
)
def eval_table_metrics_in_range(storage: StorageResource) -> dg.AssetCheckResult:
    table = _table(storage, "eval_table")
    if table is None:
        return NOT_MATERIALISED
    rows, _ = _read_predictions(storage)
    problems = [
        f"{r['method']}/{r['benchmark']}/{r['question_id']}: {m}={r[m]}"
        for r in rows.select(["method", "benchmark", "question_id", *ROW_METRICS]).to_pylist()
        for m in ROW_METRICS
        if r[m] is None or not 0.0 <= r[m] <= 1.0
    ]
    for r in table.to_pylist():
        problems += [
            f"eval_table {r['method']}: {k}={v}"
            for k, v in r.items()
            if k not in ("method", "questions") and v is not None and not 0.0 <= v <= 100.0
        ]
    return _result(rows.num_rows, problems, "all partitions")


@dg.asset_check(
    asset="eval_table",
    blocking=True,
    description=(
        "The judge answered yes or no for every row, or the row says why not (unparsable or skipped), with its prompt id and model."
    ),
)
def eval_table_judged_or_explained(storage: StorageResource) -> dg.AssetCheckResult:
    rows, _ = _read_predictions(storage)
    problems = []
    for r in rows.select(
        ["method", "benchmark", "question_id", "judge", "judge_reason", "judge_prompt_id", "judge_model"]
    ).to_pylist():
        where = f"{r['method']}/{r['benchmark']}/{r['question_id']}"
        if r["judge"] is None and not (r["judge_reason"] or "").startswith(("unparsable", "skipped")):
            problems.append(f"{where}: no verdict and no reason")
        if r["judge_prompt_id"] not in JUDGE_PROMPTS or not r["judge_model"]:
            problems.append(f"{where}: judge prompt {r['judge_prompt_id']!r} / model {r['judge_model']!r}")
    unparsable = sum(1 for j in rows.column("judge").to_pylist() if j is None)
    return _result(rows.num_rows, problems, "all partitions", unparsable=unparsable)


@dg.asset_check(
    asset="eval_table",
    blocking=True,
    description=(
        "Every Table 1 cell and average recomputes from the prediction rows (an independent plain-Python route)."
    ),
)
def eval_table_recomputes(storage: StorageResource) -> dg.AssetCheckResult:
    table = _table(storage, "eval_table")
    if table is None:
        return NOT_MATERIALISED
    t1 = unflatten_table1(table)
    rows = _read_predictions(storage)[0].select(["method", "benchmark", "question_id", *TABLE_METRICS]).to_pylist()
    problems = report.average_mismatches(t1, rows)
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        for m in TABLE_METRICS:
            cells.setdefault((r["method"], r["benchmark"], m), []).append(float(r[m] or 0.0))  # None verdict = 0
    for (method, bench, m), vals in cells.items():
        got = t1.loc[method, (bench, m)] if method in t1.index and (bench, m) in t1.columns else float("nan")
        if not abs(got - 100.0 * sum(vals) / len(vals)) <= 1e-6:
            problems.append(f"{method}/{bench} {m}: table {got} != recomputed {100.0 * sum(vals) / len(vals):.4f}")
    return _result(len(cells), problems, "all partitions")


# -- eval_comparisons (Table 1 with power) ------------------------------------------------------
class EvalComparisonsConfig(dg.Config):
    resamples: int = Field(10_000, description="Paired bootstrap resamples per comparison.")
    seed: int = Field(0, description="Bootstrap seed.")
    confidence: float = Field(0.95, description="Level of every interval.")
    plot_benchmark: str = Field(EMBEDDED, description="The benchmark whose scores and intervals are plotted.")


@dg.asset(
    group_name=GROUP,
    deps=["eval_predictions", "eval_table"],
    kinds={"python", "parquet"},
    tags={"autocoa/stage": "evaluation"},
)
def eval_comparisons(
    context: dg.AssetExecutionContext, config: EvalComparisonsConfig, storage: StorageResource
) -> dg.Output[pa.Table]:
    """Table 1 with power: per method, benchmark and metric, the 95% Wilson interval and paired tests (exact McNemar, bootstrap) against ReAct on the reasoning model and the predecessor stage, from eval_predictions."""
    md: dict = {}
    with timed(md):
        rows, _ = _read_predictions(storage)
        if rows.num_rows == 0:
            raise dg.Failure("eval_comparisons: eval_predictions holds no predictions; materialise it first")
        df = rows.select(["method", "benchmark", "question_id", *TABLE_METRICS]).to_pandas()
        try:
            power = report.table1_power(
                df, metrics=TABLE_METRICS, resamples=config.resamples, seed=config.seed, confidence=config.confidence
            )
        except ValueError as exc:  # different question ids: a stale partition (eval_table_coverage names it)
            raise dg.Failure(f"eval_comparisons: {exc}; re-materialise the stale eval_predictions partitions") from exc
        table = report.power_table(power)
        png = None
        if config.plot_benchmark in set(power["benchmark"]):
            path = storage.artifact_dir("eval_comparisons") / f"intervals_{config.plot_benchmark}.png"
            png = report.plot_intervals(
                power,
                config.plot_benchmark,
                path,
                title=(f"EM per method on {config.plot_benchmark}, 95% Wilson intervals"),
            )
    em = power[power["metric"] == "em"]
    compared = {r: int(em[r].notna().sum()) for r in report.POWER_RELATIONS}
    context.log.info(
        "eval_comparisons: %d cells, %d paired comparisons with %s and %d with a predecessor",
        len(power),
        compared["reference"],
        report.REFERENCE_METHOD,
        compared["predecessor"],
    )
    md.update(
        table_metadata(
            table,
            preview_columns=[
                "method",
                "benchmark",
                "metric",
                "n",
                "score",
                "ci_low",
                "ci_high",
                "reference_p",
                "predecessor_p",
            ],
        )
    )
    md.update(
        {
            "table1_power": dg.MetadataValue.md(report.power_markdown(power)),
            "reference": report.REFERENCE_METHOD,
            "predecessors": dg.MetadataValue.json(report.PREDECESSOR),
            "em_comparisons": dg.MetadataValue.json(compared),
            "min_questions_per_cell": int(power["n"].min()),
            "resamples": config.resamples,
            "seed": config.seed,
        }
    )
    if png is not None:
        md["intervals_plot"] = dg.MetadataValue.md(
            f"![EM with 95% CI](data:image/png;base64,{base64.b64encode(png).decode()})"
        )
        md["png"] = dg.MetadataValue.path(str(path))
    else:
        md["intervals_plot"] = f"no predictions on {config.plot_benchmark}: nothing plotted"
    return dg.Output(table, metadata=md)


def _ids_by_cell(storage: StorageResource) -> dict[tuple[str, str], list[str]]:
    got: dict[tuple[str, str], list[str]] = {}
    for r in _read_predictions(storage)[0].select(["method", "benchmark", "question_id"]).to_pylist():
        got.setdefault((r["method"], r["benchmark"]), []).append(r["question_id"])
    return got


@dg.asset_check(
    asset="eval_comparisons",
    blocking=True,
    description=(
        "Every paired comparison was on the same question ids: both methods' eval_predictions hold exactly the same "
        "questions, as many as the row's n, and the discordant counts fit in n."
    ),
)
def eval_comparisons_same_questions(storage: StorageResource) -> dg.AssetCheckResult:
    table = _table(storage, "eval_comparisons")
    if table is None:
        return NOT_MATERIALISED
    ids = _ids_by_cell(storage)
    problems, pairs = [], 0
    for r in table.to_pylist():
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
    return _result(pairs, problems, "whole table", rows=table.num_rows)


@dg.asset_check(
    asset="eval_comparisons",
    blocking=True,
    description=("Every eval_table cell has a row whose score equals it, and each interval holds its score."),
)
def eval_comparisons_match_table1(storage: StorageResource) -> dg.AssetCheckResult:
    table, t1 = _table(storage, "eval_comparisons"), _table(storage, "eval_table")
    if table is None or t1 is None:
        return NOT_MATERIALISED
    cells = {(r["method"], r["benchmark"], r["metric"]): r for r in table.to_pylist()}
    problems, checked = [], 0
    flat = [
        (method, bench, metric, value)
        for method, row in unflatten_table1(t1).iterrows()
        for (bench, metric), value in row.items()
    ]
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
    return _result(checked, problems, "whole table")


# -- action_analysis (Figure 3) -----------------------------------------------------------------
class ActionAnalysisConfig(dg.Config):
    correct: str = Field("em", description="What counts as correct: 'em' (exact match) or 'judge' (the LLM judge).")
    cap: int = Field(5, description="Action counts of cap or more share one bucket ('5+').")


@dg.asset(
    group_name=GROUP,
    deps=["eval_predictions", "eval_table"],
    kinds={"python", "parquet"},
    tags={"autocoa/stage": "evaluation"},
)
def action_analysis(
    context: dg.AssetExecutionContext, config: ActionAnalysisConfig, storage: StorageResource
) -> dg.Output[pa.Table]:
    """Figure 3: per method, the share of correct answers and the success rate by number of actions, from eval_predictions."""
    if config.correct not in ("em", "judge"):
        raise dg.Failure(f"action_analysis: config 'correct' must be 'em' or 'judge', got {config.correct!r}")
    md: dict = {}
    with timed(md):
        rows, _ = _read_predictions(storage)
        if rows.num_rows == 0:
            raise dg.Failure("action_analysis: eval_predictions holds no predictions; materialise it first")
        df = rows.select(["method", "benchmark", "question_id", "n_actions", "em", "judge"]).to_pandas()
        order = {m: i for i, m in enumerate(METHODS)}
        df = df.sort_values("method", key=lambda s: s.map(lambda m: order.get(m, len(order))), kind="stable")
        analysis = report.action_analysis(df, correct=config.correct, cap=config.cap)
        path = storage.artifact_dir("action_analysis") / "figure3.png"
        label = {"em": "EM", "judge": "LLM judge"}[config.correct]
        png = report.plot_action_analysis(analysis, path, title=f"Figure 3 (ours): action analysis, correct = {label}")
    table = pa.Table.from_pandas(analysis, preserve_index=False)
    table = table.append_column("correct_by", pa.array([config.correct] * table.num_rows, pa.string()))

    def pivot(column: str) -> str:
        wide = analysis.pivot(index="method", columns="label", values=column).reindex(
            list(dict.fromkeys(analysis["method"]))
        )
        return markdown_table(
            [{"method": m, **{k: "—" if pd.isna(v) else f"{v:.2f}" for k, v in r.items()}} for m, r in wide.iterrows()]
        )

    context.log.info(
        "action_analysis: %d methods, figure written to %s (%d bytes)", analysis["method"].nunique(), path, len(png)
    )
    md.update(
        table_metadata(table, preview_columns=["method", "label", "n", "n_correct", "share_of_correct", "success_rate"])
    )
    md.update(
        {
            "figure3": dg.MetadataValue.md(f"![Figure 3](data:image/png;base64,{base64.b64encode(png).decode()})"),
            "png": dg.MetadataValue.path(str(path)),
            "png_bytes": len(png),
            "correct_by": config.correct,
            "share_of_correct": dg.MetadataValue.md(pivot("share_of_correct")),
            "success_rate": dg.MetadataValue.md(pivot("success_rate")),
        }
    )
    return dg.Output(table, metadata=md)


@dg.asset_check(
    asset="action_analysis",
    blocking=True,
    description=("Per method with a correct answer, the shares of correct answers sum to 1; every rate is in [0, 1]."),
)
def action_analysis_shares_sum_to_one(storage: StorageResource) -> dg.AssetCheckResult:
    table = _table(storage, "action_analysis")
    if table is None:
        return NOT_MATERIALISED
    df = table.to_pandas()
    problems = []
    for method, sub in df.groupby("method"):
        if sub["n_correct"].sum() > 0 and abs(sub["share_of_correct"].fillna(0).sum() - 1.0) > 1e-6:
            problems.append(f"{method}: shares sum to {sub['share_of_correct'].sum():.4f}")
    for col in ("share_of_correct", "success_rate"):
        problems += [
            f"{r.method}/{r.label}: {col}={getattr(r, col)}"
            for r in df.itertuples()
            if not pd.isna(getattr(r, col)) and not 0.0 <= getattr(r, col) <= 1.0
        ]
    return _result(len(df), problems, "whole table")


@dg.asset_check(
    asset="action_analysis",
    blocking=True,
    description=(
        "Per method, the answers and correct answers counted over the action buckets equal those of eval_predictions."
    ),
)
def action_analysis_counts_match_predictions(storage: StorageResource) -> dg.AssetCheckResult:
    table = _table(storage, "action_analysis")
    if table is None:
        return NOT_MATERIALISED
    df = table.to_pandas()
    by = df["correct_by"].iloc[0] if len(df) else "em"
    rows = _read_predictions(storage)[0].select(["method", by]).to_pylist()
    want: dict[str, list[int]] = {}
    for r in rows:
        acc = want.setdefault(r["method"], [0, 0])
        acc[0] += 1
        acc[1] += int(bool(r[by]) and float(r[by]) > 0.5)
    got = {m: [int(s["n"].sum()), int(s["n_correct"].sum())] for m, s in df.groupby("method")}
    problems = [
        f"{m}: figure counts {got.get(m)} != predictions {w} (answers, correct)"
        for m, w in sorted(want.items())
        if got.get(m) != w
    ]
    problems += [f"{m}: in the figure, not in eval_predictions" for m in sorted(set(got) - set(want))]
    return _result(len(rows), problems, "whole table")


# -- world_model_fidelity -----------------------------------------------------------------------
FidelityRollout = rollout_settings(
    "FidelityRollout",
    "Rollout settings of the fidelity run (simulated environment: the policy writes its own search results).",
    temperature=0.0,
    max_actions=2,
    max_context=1536,
    max_turn_tokens=128,  # per turn, and per simulated search result
    force_answer=True,
    search_k=2,  # passages the real search returns per query (embedded 2, paper 3)
)


class FidelityConfig(dg.Config):
    n: int | None = Field(
        4, description="Held-out questions per checkpoint: the first n of eval_questions 'embedded'; None = all."
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="Engine settings; the model is each checkpoint in turn."
    )
    rollout: FidelityRollout = Field(
        default_factory=FidelityRollout, description="Rollout settings: agent.rollout.RolloutConfig."
    )
    seed: int = Field(0, description="Sampling seed.")
    probe: bool = Field(
        True,
        description=(
            "Also probe every checkpoint with the same held-out queries (each question's text as a search the policy "
            "took), so checkpoints compare query by query even when a policy never searches by itself."
        ),
    )


def _fidelity_rows(method, ckpt, questions, trajs, search) -> list[dict]:
    """Rows for the searches the policy opened itself (source "policy")."""
    pairs = [(q, t, query, sim) for q, t in zip(questions, trajs) for query, sim in simulated_observations(t)]
    real = search([p[2] for p in pairs]) if pairs else []
    rows = []
    for (q, t, query, sim), (real_text, _) in zip(pairs, real):
        f = compare_observation(sim, real_text, q.golden_answers, t.answer)
        rows.append(
            {
                "method": method,
                "checkpoint": ckpt,
                "source": "policy",
                "question_id": q.question_id,
                "question": q.question,
                "golden_answers": list(q.golden_answers),
                "prediction": t.answer,
                "em": score(t.answer, q.golden_answers).em,
                "query": query,
                "simulated": sim,
                "real": real_text,
                **f.as_row(),
            }
        )
    return rows


def _probe_rows(method, ckpt, questions, simulated: list[str], search) -> list[dict]:
    """Rows for the probes (source "probe"): the query is the question; no trajectory, so no prediction."""
    real = search([q.question for q in questions]) if questions else []
    return [
        {
            "method": method,
            "checkpoint": ckpt,
            "source": "probe",
            "question_id": q.question_id,
            "question": q.question,
            "golden_answers": list(q.golden_answers),
            "prediction": None,
            "em": None,
            "query": q.question,
            "simulated": sim,
            "real": real_text,
            **compare_observation(sim, real_text, q.golden_answers).as_row(),
        }
        for q, sim, (real_text, _) in zip(questions, simulated, real)
    ]


def build_fidelity(existing: Collection[str]):
    deps = [a for a in ("search_index", *(f"{m}_checkpoint" for m in FIDELITY_METHODS)) if a in existing]

    @dg.asset(
        name="world_model_fidelity",
        group_name=GROUP,
        deps=deps,
        kinds={"python", "parquet"},
        ins={"eval_questions": dg.AssetIn(partition_mapping=dg.SpecificPartitionsPartitionMapping([EMBEDDED]))},
        tags={"autocoa/stage": "evaluation"},
        description=(
            "How close each SFT-3 and RL checkpoint's own simulated search results are to the real "
            "search engine's results for the same queries, on held-out questions."
        ),
    )
    def world_model_fidelity(
        context: dg.AssetExecutionContext,
        config: FidelityConfig,
        eval_questions: pa.Table,
        storage: StorageResource,
        search_engine: SearchEngineResource,
    ) -> dg.Output[pa.Table]:
        questions = _questions(eval_questions)[: config.n] if config.n is not None else _questions(eval_questions)
        rcfg = config.rollout.build(seed=config.seed, simulated=True)
        search = search_tool(search_engine.get_engine(), config.rollout.search_k)
        md: dict = {}
        rows, skipped, runs = [], [], []
        with timed(md):
            for method in FIDELITY_METHODS:
                ckpt = _checkpoint(storage, method)
                if ckpt is None:
                    skipped.append(f"{method}_checkpoint")
                    continue
                spec = dataclasses.replace(config.engine.spec(config.rollout.max_context), model=ckpt)
                release_engines(keep={spec})
                engine = load_engine(spec, storage.artifact_dir("models"))
                template = checkpoint_template(ckpt)
                rollout = Rollout(engine, None, rcfg)
                prompts = [template.prompt_ids(rollout.tokenizer, q.question) for q in questions]
                trajs = rollout.run([(q.key, ids) for q, ids in zip(questions, prompts)])
                new = _fidelity_rows(method, ckpt, questions, trajs, search)
                probes = []
                if config.probe:
                    sims = probe_simulated_results(
                        engine,
                        prompts,
                        [q.question for q in questions],
                        max_tokens=config.rollout.max_turn_tokens,
                        temperature=config.rollout.temperature,
                        seed=config.seed,
                    )
                    probes = _probe_rows(method, ckpt, questions, sims, search)
                runs.append(
                    {
                        "method": method,
                        "trajectories": len(trajs),
                        "simulated_searches": len(new),
                        "probes": len(probes),
                        "em_simulated_env": round(
                            sum(score(t.answer, q.golden_answers).em for q, t in zip(questions, trajs))
                            / max(1, len(trajs)),
                            3,
                        ),
                    }
                )
                context.log.info(
                    "world_model_fidelity %s: %d trajectories, %d of the policy's own simulated searches "
                    "and %d probes compared",
                    method,
                    len(trajs),
                    len(new),
                    len(probes),
                )
                rows += new + probes
        table = pa.Table.from_pylist(rows, schema=FIDELITY_SCHEMA)
        agg = aggregate_fidelity(rows, by=["method", "source"]).round(3)
        md.update(
            table_metadata(
                table,
                preview_columns=[
                    "method",
                    "source",
                    "question_id",
                    "query",
                    "simulated",
                    "real",
                    "token_f1",
                    "hallucination",
                ],
            )
        )
        md.update(
            {
                "questions": len(questions),
                "checkpoints_evaluated": dg.MetadataValue.json([r["method"] for r in runs]),
                "checkpoints_missing": dg.MetadataValue.json(skipped),
                "runs": dg.MetadataValue.md(markdown_table(runs)),
                "fidelity": dg.MetadataValue.md(
                    markdown_table(agg.to_dict("records")) if len(agg) else "_(no simulated search)_"
                ),
            }
        )
        if len(agg):
            labels = [f"{r['method']} ({r['source']})" for r in agg.to_dict("records")]
            md["fidelity_plot"] = bar_plot(
                labels,
                {
                    "token F1": list(agg["token_f1"]),
                    "ROUGE-L": list(agg["rouge_l"]),
                    "hallucination rate": list(agg["hallucination"]),
                },
                "World-model fidelity: simulated vs real search results",
                "share",
            )
        if not runs:
            md["status"] = f"no SFT-3 or RL checkpoint is materialised (looked for {', '.join(skipped)}); table empty"
            context.log.warning("world_model_fidelity: %s", md["status"])
        return dg.Output(table, metadata=md)

    return world_model_fidelity


@dg.asset_check(
    asset="world_model_fidelity",
    blocking=True,
    description=(
        "Fidelity measures are in [0, 1], every compared query has a real result, and hallucination = unsupported gold or prediction."
    ),
)
def world_model_fidelity_consistent(storage: StorageResource) -> dg.AssetCheckResult:
    table = _table(storage, "world_model_fidelity")
    if table is None:
        return NOT_MATERIALISED
    problems = []
    for r in table.to_pylist():
        where = f"{r['method']}/{r['question_id']}/{r['query'][:40]!r}"
        problems += [f"{where}: {m}={r[m]}" for m in ("token_f1", "rouge_l") if not 0.0 <= r[m] <= 1.0]
        if r["real"] is None:
            problems.append(f"{where}: no real search result")
        if r["hallucination"] != (r["unsupported_gold"] or r["unsupported_prediction"]):
            problems.append(f"{where}: hallucination flag inconsistent")
    return _result(table.num_rows, problems, "whole table")


CHECKS = [
    eval_table_coverage,
    eval_table_complete,
    eval_table_metrics_in_range,
    eval_table_judged_or_explained,
    eval_table_recomputes,
    eval_comparisons_same_questions,
    eval_comparisons_match_table1,
    action_analysis_shares_sum_to_one,
    action_analysis_counts_match_predictions,
    world_model_fidelity_consistent,
]


def build_assets(existing: Collection[str]) -> list:
    return [eval_table, eval_comparisons, action_analysis, build_fidelity(existing)]
