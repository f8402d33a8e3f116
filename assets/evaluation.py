"""Evaluation stage: evaluation questions per benchmark and one graded prediction per (method, benchmark,
question), the rows behind the paper's Table 1 and Figure 3 (``assets/eval_reports.py``). Which questions and
how each method is evaluated is the library's (``evals/questions.py``, ``evals/predict.py``)."""

from collections.abc import Collection

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from agent.engines import load_engine, release_engines
from agent.rollout import search_tool
from assets.eval_common import GROUP, check_result, checkpoint_of, partition_files, question_ids, scoped_partitions
from assets.metadata import table_metadata, timed
from assets.resources import SearchEngineResource
from assets.settings import rollout_settings
from assets.storage import NOT_MATERIALISED, StorageResource, read_table
from assets.trajectories import EngineConfig, progress_bar
from evals import datasets as bm
from evals import validate
from evals.datasets import questions_from_table
from evals.judge import DEFAULT_JUDGE_PROMPT, JUDGE_PROMPTS
from evals.predict import (
    BASELINES,
    CHECKPOINT_METHODS,
    COT_MAX_TOKENS,
    EVAL_ROLLOUT,
    JUDGE_MAX_TOKENS,
    METHODS,
    PREDICTION_SCHEMA,
    REACT_METHODS,
    policy,
    policy_fingerprint,
    policy_model,
    policy_spec,
    predict,
    relabel,
)
from evals.questions import BENCHMARKS, EMBEDDED, benchmark_questions
from qadata.paths import SHARED_DATA

# pipelines/cli.py reads the methods and benchmarks from here
__all__ = ["BASELINES", "BENCHMARKS", "GROUP", "METHODS", "build", "prediction_partitions_by_method"]

BENCHMARK_PARTITIONS = dg.StaticPartitionsDefinition(list(BENCHMARKS))
PREDICTION_PARTITIONS = dg.MultiPartitionsDefinition(
    {"method": dg.StaticPartitionsDefinition(list(METHODS)), "benchmark": BENCHMARK_PARTITIONS}
)


def prediction_partitions_by_method(methods=METHODS, benchmarks=BENCHMARKS) -> list[dg.MultiPartitionKey]:
    """Run order for eval_predictions: every benchmark of a method before the next method, so one process
    running them in turn loads each policy once (each partition releases the engines it no longer needs)."""
    return [dg.MultiPartitionKey({"method": m, "benchmark": b}) for m in methods for b in benchmarks]


def _partition_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return {}
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


PREVIEW = ["question_id", "question", "golden_answers", "prediction", "em", "judge", "n_actions"]
# what a reused partition copies from the metadata of the partition it reuses (its scores and how they were made)
SUMMARY_KEYS = (
    "accuracy_em", "mean_f1", "accuracy_judge", "judge_unparsable", "mean_actions", "generated_tokens",
    "judge_model", "benchmark", "engine", "model", "template_id", "checkpoint", "judge_prompt_id",
    "judge_decoding", "max_actions", "rollout_seconds",
)  # fmt: skip


def _reusable(
    instance: dg.DagsterInstance, storage: StorageResource, method: str, bench: str, fingerprint: str
) -> tuple[str, pa.Table, dict] | None:
    """Another method's partition of ``bench`` whose last materialisation had this fingerprint (same model,
    prompt, settings, questions and judge): its name, its rows relabelled as ``method`` and its metadata; None
    when there is none on disk."""
    for other in METHODS:
        if other == method:
            continue
        key = str(dg.MultiPartitionKey({"method": other, "benchmark": bench}))
        meta = _partition_metadata(instance, "eval_predictions", key)
        if meta.get("policy_fingerprint") != fingerprint or meta.get("reused_from"):
            continue  # reuse only partitions that were computed
        files = partition_files(storage, "eval_predictions", key)
        if key in files:
            return other, relabel(pq.read_table(files[key]), method), meta
    return None


# -- eval_questions -----------------------------------------------------------------------------
class EvalQuestionsConfig(dg.Config):
    autocoa_test_file: str = Field(
        str(SHARED_DATA / "autocoa" / "test.parquet"),
        description=(
            "AutoCoA's evaluation parquet (the six shared benchmarks); when absent those partitions are empty."
        ),
    )
    n: int | None = Field(
        2,
        description=(
            "Questions sampled per shared benchmark (embedded: small smoke samples; a 135M model cannot be meaningful on "
            "real benchmarks); None = all (paper)."
        ),
    )
    embedded_n: int | None = Field(
        100,
        description=(
            "Held-out questions of the generated world (the embedded benchmark Table 1's comparisons are made on: the same "
            "questions for every method, enough for intervals and paired tests); None = all of the split."
        ),
    )
    seed: int = Field(0, description="Sampling seed (samples are nested: the first 6 of n=10 are the sample of 6).")
    embedded_splits: list[str] = Field(
        default_factory=lambda: ["dev"],
        description=(
            "Splits of embedded_world whose questions, minus every question_sample question, are the embedded pool "
            "(default: the held-out dev split only; RL draws its own pool from train, so it never meets these)."
        ),
    )


@dg.multi_asset(
    group_name=GROUP,
    partitions_def=BENCHMARK_PARTITIONS,
    outs={
        "eval_questions": dg.AssetOut(
            description=(
                "Evaluation questions per benchmark: held-out questions of the generated world and a seeded sample of "
                "AutoCoA's six evaluation sets."
            ),
            kinds={"parquet"},
        ),
        "eval_questions_rejected": dg.AssetOut(
            description=(
                "Evaluation rows that could not be used (unreadable, duplicate, or also in the training sample), with the reason."
            ),
            kinds={"parquet"},
        ),
    },
)
def eval_questions(
    context: dg.AssetExecutionContext, config: EvalQuestionsConfig, embedded_world: pa.Table, question_sample: pa.Table
):
    bench = context.partition_key
    md: dict = {}
    n = config.embedded_n if bench == EMBEDDED else config.n
    with timed(md):
        sel = benchmark_questions(
            bench,
            embedded_world,
            question_sample,
            splits=config.embedded_splits,
            autocoa_file=config.autocoa_test_file,
            n=n,
            seed=config.seed,
        )
    if sel.missing:
        md["source_missing"] = sel.missing
        context.log.warning(f"eval_questions {bench}: {sel.missing}")
    table, rej = bm.questions_table(sel.sampled), bm.rejected_table(sel.rejected)
    if n is not None and 0 < sel.usable < n:
        context.log.warning(f"eval_questions {bench}: only {sel.usable} questions for n={n}")
    if bench == EMBEDDED and not sel.usable:
        raise dg.Failure(
            f"eval_questions embedded: no embedded_world question outside question_sample in splits "
            f"{config.embedded_splits}; enlarge EmbeddedWorldConfig.questions or lower QuestionSampleConfig.total"
        )
    context.log.info(
        f"eval_questions {bench}: {len(sel.sampled)} sampled of {sel.usable} usable, {len(sel.rejected)} rejected "
        f"({sel.leaked} leaked), from {sel.source}"
    )
    yield dg.Output(
        table,
        output_name="eval_questions",
        metadata={
            **md,
            **table_metadata(table, preview_columns=["benchmark", "question_id", "question", "golden_answers"]),
            **sel.counts,
            "source": sel.source,
            "n": n if n is not None else -1,
            "seed": config.seed,
        },
    )
    yield dg.Output(
        rej,
        output_name="eval_questions_rejected",
        metadata={**table_metadata(rej, preview_columns=["source_row", "reason"]), **sel.counts},
    )


@dg.asset_check(asset="eval_questions", blocking=True)
def eval_questions_ids_unique(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    """(benchmark, question_id) is unique within every partition."""
    parts, scope = scoped_partitions(context, storage, "eval_questions")
    return check_result(*validate.question_ids_unique(parts), scope)


@dg.asset_check(asset="eval_questions", blocking=True)
def eval_questions_no_training_leakage(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Leakage: no evaluation question is a question of the training sample (question_sample)."""
    sample = read_table(storage, "question_sample")
    if sample is None:
        return NOT_MATERIALISED
    parts, scope = scoped_partitions(context, storage, "eval_questions")
    texts, ids = sample.column("question").to_pylist(), sample.column("id").to_pylist()
    return check_result(*validate.no_training_leakage(parts, texts, ids), scope, training_questions=sample.num_rows)


@dg.asset_check(asset="eval_questions", blocking=True)
def eval_questions_counts_reconcile(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Counts reconcile per partition: source rows = sampled + not sampled + rejected + excluded (training sample, other split)."""
    parts, scope = scoped_partitions(context, storage, "eval_questions")
    problems = []
    for key, t in parts.items():
        meta = _partition_metadata(context.instance, "eval_questions", key)
        rej = partition_files(storage, "eval_questions_rejected", key)
        n_rej = pq.ParquetFile(rej[key]).metadata.num_rows if rej else 0
        problems += validate.counts_reconcile(key, t.num_rows, meta, n_rej)
    return check_result(len(parts), problems, scope)


# -- eval_predictions ---------------------------------------------------------------------------
EvalRollout = rollout_settings(
    "EvalRollout",
    "Rollout settings of every evaluated method (greedy; base_cot uses cot_max_tokens and no tool).",
    **EVAL_ROLLOUT,
)


class EvalPredictionsConfig(dg.Config):
    profile: str = Field("embedded", description="Profile name recorded with every row.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description=(
            "Engine settings; its model is the reasoning model of base_cot and react_reasoning (paper: "
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B); checkpoint methods load their checkpoint with the same settings."
        ),
    )
    base_engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description=(
            "The non-reasoning instruct model react_base prompts (embedded: the embedded model, so react_base and "
            "react_reasoning differ only if configured; paper: Qwen/Qwen2.5-7B-Instruct)."
        ),
    )
    judge: EngineConfig = Field(
        default_factory=EngineConfig,
        description=("The LLM judge (default: the embedded model, a stand-in; paper: Qwen/Qwen2.5-14B-Instruct)."),
    )
    judge_prompt_id: str = Field(DEFAULT_JUDGE_PROMPT, description=f"Judge prompt ({', '.join(JUDGE_PROMPTS)}).")
    judge_max_tokens: int = Field(JUDGE_MAX_TOKENS, description="Tokens the judge may write when not constrained.")
    judge_constrained: bool = Field(
        True,
        description=(
            "The judge writes one token among the spellings of yes/no (constrained decoding), so every asked row "
            "gets a verdict; false: free text, anything but yes/no is stored as unparsable."
        ),
    )
    seed: int = Field(0, description="Sampling seed.")
    rollout: EvalRollout = Field(
        default_factory=EvalRollout, description="Rollout settings of the policy: agent.rollout.RolloutConfig."
    )
    cot_max_tokens: int = Field(COT_MAX_TOKENS, description="Tokens a base_cot answer may write.")


def _empty(context, method: str, bench: str, status: str) -> dg.Output:
    context.log.warning("eval_predictions %s/%s: %s; partition left empty", method, bench, status)
    table = PREDICTION_SCHEMA.empty_table()
    return dg.Output(
        table,
        metadata={**table_metadata(table), "evaluated": False, "status": status, "method": method, "benchmark": bench},
    )


def build_eval_predictions(existing: Collection[str]):
    """eval_predictions, with lineage to the checkpoint assets among ``existing`` (asset keys defined)."""
    deps = [a for a in ("search_index", *(f"{m}_checkpoint" for m in CHECKPOINT_METHODS)) if a in existing]

    @dg.asset(
        name="eval_predictions",
        group_name=GROUP,
        partitions_def=PREDICTION_PARTITIONS,
        ins={"eval_questions": dg.AssetIn(partition_mapping=dg.MultiToSingleDimensionPartitionMapping("benchmark"))},
        deps=deps,
        kinds={"python", "parquet"},
        tags={"autocoa/stage": "evaluation"},
    )
    def eval_predictions(
        context: dg.AssetExecutionContext,
        config: EvalPredictionsConfig,
        eval_questions: pa.Table,
        storage: StorageResource,
        search_engine: SearchEngineResource,
    ) -> dg.Output[pa.Table]:
        """One graded prediction per evaluation question for a method (base model with CoT, ReAct, or an agent checkpoint with real search), with EM, F1 and the LLM judge's verdict."""
        keys = context.partition_key.keys_by_dimension
        method, bench = keys["method"], keys["benchmark"]
        checkpoint = None
        if policy_model(method) == "checkpoint":
            checkpoint = checkpoint_of(storage, method)
            if checkpoint is None:
                undefined = "" if f"{method}_checkpoint" in existing else " (no such asset in this code location yet)"
                return _empty(context, method, bench, f"{method}_checkpoint is not materialised{undefined}")
        questions = questions_from_table(eval_questions)
        if not questions:
            return _empty(context, method, bench, f"eval_questions partition {bench} has no questions")
        md: dict = {}
        models = storage.artifact_dir("models")
        with timed(md):
            n_ctx = config.rollout.max_context
            reasoning, base = config.engine.spec(n_ctx), config.base_engine.spec(n_ctx)
            spec = policy_spec(method, reasoning, base, checkpoint)
            judge_spec = config.judge.spec()
            released = release_engines(keep={spec, judge_spec})  # the previous method's checkpoint
            engine = load_engine(spec, models)
            try:
                template, rcfg = policy(
                    method,
                    engine.model_name,
                    checkpoint,
                    config.rollout.build(seed=config.seed),
                    cot_max_tokens=config.cot_max_tokens,
                )
            except (FileNotFoundError, ValueError) as exc:
                raise dg.Failure(f"eval_predictions {method}/{bench}: {exc}") from exc
            judge_settings = {
                "prompt": config.judge_prompt_id,
                "max_tokens": config.judge_max_tokens,
                "constrained": config.judge_constrained,
            }
            fingerprint = policy_fingerprint(
                spec, template.id, rcfg, [q.key for q in questions], judge_spec, judge_settings
            )
            reused = _reusable(context.instance, storage, method, bench, fingerprint) if rcfg.temperature == 0 else None
        if reused is not None:
            other, table, other_md = reused
            context.log.info(
                f"eval_predictions {method}/{bench}: same model, prompt, settings, questions and judge as "
                f"{other}/{bench} (greedy): its rows are reused, not recomputed"
            )
            summary = {k: v for k, v in other_md.items() if k in SUMMARY_KEYS}
            reused_from = str(dg.MultiPartitionKey({"method": other, "benchmark": bench}))
            summary.update({"method": method, "reused_from": reused_from, "search_calls": 0})
            status = f"reused from {other}"
        else:
            with timed(md):
                search = search_tool(search_engine.get_engine(), rcfg.search_k) if rcfg.tools else None
                context.log.info(
                    f"eval_predictions {method}/{bench}: {len(questions)} questions, engine {engine.name}, "
                    f"model {engine.model_name}, template {template.id} ({released} engines released)"
                )
                bar, on_done = progress_bar(context, len(questions), f"{method}/{bench}")
                try:  # every question of the partition in one batched rollout, then one judge call
                    table, summary = predict(
                        questions,
                        method=method,
                        benchmark=bench,
                        engine=engine,
                        search=search,
                        template=template,
                        config=rcfg,
                        load_judge=lambda: load_engine(judge_spec, models),
                        checkpoint=checkpoint,
                        profile=config.profile,
                        judge_prompt_id=config.judge_prompt_id,
                        judge_max_tokens=config.judge_max_tokens,
                        judge_constrained=config.judge_constrained,
                        embedded_judge=judge_spec.model == "embedded",
                        on_done=on_done,
                    )
                finally:
                    bar.close()
            status = "evaluated"
        md.update(
            {
                **table_metadata(table, preview_columns=PREVIEW),
                **summary,
                "evaluated": True,
                "status": status,
                "policy_fingerprint": fingerprint,
            }
        )
        if method in REACT_METHODS and base == reasoning:
            md["note"] = (
                "react_base and react_reasoning run the same model here: this profile configures one model "
                "(set base_engine to a pretrained base model, as the paper profile does, to separate them)"
            )
        context.log.info(
            f"eval_predictions {method}/{bench}: EM {md['accuracy_em']:.3f}, judge {md['accuracy_judge']:.3f} "
            f"({md['judge_unparsable']} unparsable), {md['mean_actions']:.2f} actions"
        )
        return dg.Output(table, metadata=md)

    return eval_predictions


@dg.asset_check(asset="eval_predictions", blocking=True)
def eval_predictions_match_questions(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Each evaluated partition holds every question of its eval_questions partition exactly once, and no other."""
    parts, scope = scoped_partitions(context, storage, "eval_predictions")
    return check_result(*validate.predictions_match_questions(parts, question_ids(storage)), scope)


@dg.asset_check(asset="eval_predictions")
def eval_predictions_judge_parsable(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """The judge gave a yes/no verdict for at least half of the answered questions (WARN: a weak judge, e.g. the embedded stand-in)."""
    parts, scope = scoped_partitions(context, storage, "eval_predictions")
    judged, rate = validate.judge_parsable_rate(
        r for t in parts.values() for r in t.select(["judge", "judge_raw"]).to_pylist()
    )
    return dg.AssetCheckResult(
        passed=rate >= 0.5,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"scope": scope, "judged": judged, "parsable_rate": round(rate, 4)},
    )


def build(existing: Collection[str]) -> tuple[list, list]:
    """The evaluation questions and predictions with their checks; ``existing``: the asset keys the Definitions
    hold (checkpoint lineage). The reports (assets/eval_reports.py) and the fidelity run (assets/fidelity.py)
    have their own ``build``; pipelines/definitions.py wires all three."""
    assets = [eval_questions, build_eval_predictions(existing)]
    checks = [
        eval_questions_ids_unique,
        eval_questions_no_training_leakage,
        eval_questions_counts_reconcile,
        eval_predictions_match_questions,
        eval_predictions_judge_parsable,
    ]
    return assets, checks
