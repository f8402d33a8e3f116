"""Evaluation reports over the graded predictions (``eval_predictions``): Table 1 (``eval_table``), its intervals
and paired tests (``eval_comparisons``) and Figure 3 (``action_analysis``), computed by ``evals/tables.py``."""

from collections.abc import Collection

import dagster as dg
import pyarrow as pa
from pydantic import Field

from assets.eval_common import GROUP, check_result, png_markdown, question_ids, read_predictions
from assets.metadata import bar_plot, markdown_table, table_metadata, timed
from assets.storage import NOT_MATERIALISED, StorageResource, read_table
from evals import report, tables, validate
from evals.questions import EMBEDDED
from evals.report import TABLE1_METRICS, unflatten_table1
from qadata.io import atomic_write_text

POWER_PREVIEW = ["method", "benchmark", "metric", "n", "score", "ci_low", "ci_high", "reference_p", "predecessor_p"]
PANELS = ("share_of_correct", "success_rate")  # Figure 3's two panels, shown as tables


# -- eval_table (Table 1) -----------------------------------------------------------------------
def _write_views(storage: StorageResource) -> str:
    """DuckDB views over the evaluation tables, for a plain ``duckdb`` shell (``autocoa sql`` has them built in)."""
    path = storage.artifact_dir("eval_table") / "views.sql"
    atomic_write_text(path, report.duckdb_views(storage.home))
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
        rows, counts = read_predictions(storage)
        if rows.num_rows == 0:
            raise dg.Failure(
                f"eval_table: none of the {len(counts)} materialised eval_predictions partitions holds "
                "predictions; materialise eval_predictions (and the checkpoints it evaluates) first"
            )
        res = tables.table1(
            rows.select(["method", "benchmark", "question_id", *TABLE1_METRICS, "judge_model"]).to_pandas()
        )
        views = _write_views(storage)
    try:
        paper = report.paper_table1(TABLE1_METRICS, config.paper_table1 or None)
    except (ValueError, FileNotFoundError) as exc:
        raise dg.Failure(f"eval_table: the paper's Table 1 cannot be read: {exc}") from exc
    empty = sorted(k for k, n in counts.items() if n == 0)
    context.log.info(
        f"eval_table: {len(res.methods)} methods x {res.n_benchmarks} benchmarks from {len(counts)} partitions "
        f"({len(empty)} empty)"
    )
    md.update(table_metadata(res.table, preview_columns=["method", "questions", "em_avg", "judge_avg"]))
    md.update({k: dg.MetadataValue.md(v) for k, v in res.markdown(paper).items()})
    md.update(
        {
            "paper_table1_rows": len(paper.index),
            "paper_average_flags": dg.MetadataValue.json(paper.attrs["average_flags"]),
            "methods": dg.MetadataValue.json(res.methods),
            "partitions_read": len(counts),
            "partitions_not_evaluated": dg.MetadataValue.json(empty),
            "duckdb_views": dg.MetadataValue.path(views),
            "sql": dg.MetadataValue.md(
                'Queryable as DuckDB views: `autocoa sql "select * from eval_table"`, '
                '`autocoa sql "select method, benchmark, avg(em) from eval_predictions group by all"` '
                f"(one view per asset, built from the Parquet tables), or `duckdb -init {views}` (adds `eval_scores`)."
            ),
        }
    )
    if res.complete:
        title = "Table 1 averages (methods with every benchmark)"
        md["averages_plot"] = bar_plot(res.complete, res.averages(), title, "percent")
    return dg.Output(res.table, metadata=md)


@dg.asset_check(asset="eval_table", blocking=True)
def eval_table_coverage(storage: StorageResource) -> dg.AssetCheckResult:
    """Coverage: for every evaluated (method, benchmark), each eval_questions question appears exactly once and no other."""
    if read_table(storage, "eval_table") is None:
        return NOT_MATERIALISED
    rows, _ = read_predictions(storage)
    ids = rows.select(["method", "benchmark", "question_id"]).to_pylist()
    cells, problems = validate.table_coverage(ids, question_ids(storage))
    return check_result(rows.num_rows, problems, "all partitions", evaluated_cells=cells)


@dg.asset_check(asset="eval_table")
def eval_table_complete(storage: StorageResource) -> dg.AssetCheckResult:
    """Completeness: every evaluated method covers every benchmark that has questions (else its averages are missing)."""
    rows = read_predictions(storage)[0].select(["method", "benchmark"]).to_pylist()
    checked, problems = validate.table_complete(rows, question_ids(storage))
    return check_result(checked, problems, "all partitions", dg.AssetCheckSeverity.WARN)


@dg.asset_check(asset="eval_table", blocking=True)
def eval_table_metrics_in_range(storage: StorageResource) -> dg.AssetCheckResult:
    """Metrics in range: per-question EM, F1 and cover-EM in [0, 1], Table 1 cells in [0, 100]."""
    table = read_table(storage, "eval_table")
    if table is None:
        return NOT_MATERIALISED
    rows = read_predictions(storage)[0].select(["method", "benchmark", "question_id", *validate.ROW_METRICS])
    return check_result(*validate.metrics_in_range(rows.to_pylist(), table.to_pylist()), "all partitions")


@dg.asset_check(asset="eval_table", blocking=True)
def eval_table_judged_or_explained(storage: StorageResource) -> dg.AssetCheckResult:
    """The judge answered yes or no for every row, or the row says why not (unparsable or skipped), with its prompt id and model."""
    columns = ["method", "benchmark", "question_id", "judge", "judge_reason", "judge_prompt_id", "judge_model"]
    rows = read_predictions(storage)[0].select(columns).to_pylist()
    unparsable = sum(1 for r in rows if r["judge"] is None)
    return check_result(*validate.judged_or_explained(rows), "all partitions", unparsable=unparsable)


@dg.asset_check(asset="eval_table", blocking=True)
def eval_table_recomputes(storage: StorageResource) -> dg.AssetCheckResult:
    """Every Table 1 cell and average recomputes from the prediction rows (an independent plain-Python route)."""
    table = read_table(storage, "eval_table")
    if table is None:
        return NOT_MATERIALISED
    rows = read_predictions(storage)[0].select(["method", "benchmark", "question_id", *TABLE1_METRICS]).to_pylist()
    return check_result(*validate.table1_recomputes(unflatten_table1(table), rows), "all partitions")


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
    bench = config.plot_benchmark
    with timed(md):
        rows, _ = read_predictions(storage)
        if rows.num_rows == 0:
            raise dg.Failure("eval_comparisons: eval_predictions holds no predictions; materialise it first")
        df = rows.select(["method", "benchmark", "question_id", *TABLE1_METRICS]).to_pandas()
        try:
            res = tables.comparisons(df, resamples=config.resamples, seed=config.seed, confidence=config.confidence)
        except ValueError as exc:  # different question ids: a stale partition (eval_table_coverage names it)
            raise dg.Failure(f"eval_comparisons: {exc}; re-materialise the stale eval_predictions partitions") from exc
        png = path = None
        if bench in set(res.power["benchmark"]):
            path = storage.artifact_dir("eval_comparisons") / f"intervals_{bench}.png"
            png = report.plot_intervals(res.power, bench, path, title=f"EM per method on {bench}, 95% Wilson intervals")
    compared = res.compared
    context.log.info(
        f"eval_comparisons: {len(res.power)} cells, {compared['reference']} paired comparisons with "
        f"{report.REFERENCE_METHOD} and {compared['predecessor']} with a predecessor"
    )
    md.update(table_metadata(res.table, preview_columns=POWER_PREVIEW))
    md.update(
        {
            "table1_power": dg.MetadataValue.md(report.power_markdown(res.power)),
            **res.summary(),
            "resamples": config.resamples,
            "seed": config.seed,
        }
    )
    if png is not None:
        md["intervals_plot"] = png_markdown("EM with 95% CI", png)
        md["png"] = dg.MetadataValue.path(str(path))
    else:
        md["intervals_plot"] = f"no predictions on {bench}: nothing plotted"
    return dg.Output(res.table, metadata=md)


@dg.asset_check(asset="eval_comparisons", blocking=True)
def eval_comparisons_same_questions(storage: StorageResource) -> dg.AssetCheckResult:
    """Every paired comparison was on the same question ids: both methods' eval_predictions hold exactly the same questions, as many as the row's n, and the discordant counts fit in n."""
    table = read_table(storage, "eval_comparisons")
    if table is None:
        return NOT_MATERIALISED
    rows = read_predictions(storage)[0].select(["method", "benchmark", "question_id"]).to_pylist()
    pairs, problems = validate.comparisons_on_same_questions(table.to_pylist(), rows)
    return check_result(pairs, problems, "whole table", rows=table.num_rows)


@dg.asset_check(asset="eval_comparisons", blocking=True)
def eval_comparisons_match_table1(storage: StorageResource) -> dg.AssetCheckResult:
    """Every eval_table cell has a row whose score equals it, and each interval holds its score."""
    table, t1 = read_table(storage, "eval_comparisons"), read_table(storage, "eval_table")
    if table is None or t1 is None:
        return NOT_MATERIALISED
    return check_result(*validate.comparisons_match_table1(table.to_pylist(), unflatten_table1(t1)), "whole table")


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
    if config.correct not in tables.CORRECT_BY:
        raise dg.Failure(f"action_analysis: config 'correct' must be 'em' or 'judge', got {config.correct!r}")
    md: dict = {}
    with timed(md):
        rows, _ = read_predictions(storage)
        if rows.num_rows == 0:
            raise dg.Failure("action_analysis: eval_predictions holds no predictions; materialise it first")
        df = rows.select(["method", "benchmark", "question_id", "n_actions", "em", "judge"]).to_pandas()
        analysis = tables.figure3(df, correct=config.correct, cap=config.cap)
        path = storage.artifact_dir("action_analysis") / "figure3.png"
        title = f"Figure 3 (ours): action analysis, correct = {tables.CORRECT_BY[config.correct]}"
        png = report.plot_action_analysis(analysis, path, title=title)
    table = tables.figure3_table(analysis, config.correct)
    context.log.info(
        f"action_analysis: {analysis['method'].nunique()} methods, figure written to {path} ({len(png)} bytes)"
    )
    md.update(
        table_metadata(table, preview_columns=["method", "label", "n", "n_correct", "share_of_correct", "success_rate"])
    )
    md.update(
        {
            "figure3": png_markdown("Figure 3", png),
            "png": dg.MetadataValue.path(str(path)),
            "png_bytes": len(png),
            "correct_by": config.correct,
            **{c: dg.MetadataValue.md(markdown_table(tables.figure3_panel(analysis, c))) for c in PANELS},
        }
    )
    return dg.Output(table, metadata=md)


@dg.asset_check(asset="action_analysis", blocking=True)
def action_analysis_shares_sum_to_one(storage: StorageResource) -> dg.AssetCheckResult:
    """Per method with a correct answer, the shares of correct answers sum to 1; every rate is in [0, 1]."""
    table = read_table(storage, "action_analysis")
    if table is None:
        return NOT_MATERIALISED
    return check_result(*validate.shares_sum_to_one(table.to_pandas()), "whole table")


@dg.asset_check(asset="action_analysis", blocking=True)
def action_analysis_counts_match_predictions(storage: StorageResource) -> dg.AssetCheckResult:
    """Per method, the answers and correct answers counted over the action buckets equal those of eval_predictions."""
    table = read_table(storage, "action_analysis")
    if table is None:
        return NOT_MATERIALISED
    rows = read_predictions(storage)[0].select(["method", "em", "judge"]).to_pylist()
    return check_result(*validate.action_counts_match(table.to_pandas(), rows), "whole table")


def build(existing: Collection[str]) -> tuple[list, list]:
    """The report assets and their checks (``existing``: unused, for the same signature as the other stages)."""
    checks = [
        eval_table_coverage,
        eval_table_complete,
        eval_table_metrics_in_range,
        eval_table_judged_or_explained,
        eval_table_recomputes,
        eval_comparisons_same_questions,
        eval_comparisons_match_table1,
        action_analysis_shares_sum_to_one,
        action_analysis_counts_match_predictions,
    ]
    return [eval_table, eval_comparisons, action_analysis], checks
