"""Evaluation stage: evaluation questions per benchmark and one graded prediction per (method, benchmark,
question), the rows behind the paper's Table 1 and Figure 3 (built in ``assets/eval_reports.py``)."""

import dataclasses
import glob
import json
from collections.abc import Collection
from pathlib import Path
from urllib.parse import unquote

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from agent.engine_api import EngineSpec
from agent.engines import load_engine, release_engines
from agent.prompts import PromptTemplate, agent_template, template_for
from agent.rollout import RolloutConfig, search_tool
from agent.synthesis import RunInfo, synthesize
from assets.metadata import table_metadata, timed
from assets.pairs import NOT_MATERIALISED, _table
from assets.resources import SearchEngineResource
from assets.settings import rollout_settings
from assets.storage import StorageResource
from assets.trajectories import EngineConfig, _progress
from evals import datasets as bm
from evals.judge import DEFAULT_JUDGE_PROMPT, JUDGE_PROMPTS, JudgeItem, judge
from evals.react import react_rollout_config, react_template_for
from qadata.paths import SHARED_DATA, partition_dirname, tables_dir
from qadata.text import normalise_question

GROUP = "evaluation"
EMBEDDED = "embedded"
SHARED_BENCHMARKS = ("nq", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
BENCHMARKS = (EMBEDDED, *SHARED_BENCHMARKS)
# base_cot: the reasoning model, no tool; react_base / react_reasoning: ReAct prompting (not trained) on a
# non-reasoning instruct model (``base_engine``) and on the reasoning model the agents start from (``engine``)
BASELINES = ("base_cot", "react_base", "react_reasoning")
# each evaluates the checkpoint asset ``<method>_checkpoint`` (the RL ones may not be defined yet)
CHECKPOINT_METHODS = (
    "sft_stage1",
    "sft_stage2",
    "sft_stage3",
    "sft_stage2_only",
    "rl_stage2_only",
    "sft123_rl1",
    "sft123_rl12",
    "sft12_rl2",
)
METHODS = BASELINES + CHECKPOINT_METHODS
# checkpoints trained with search results in the loss (SFT-3) and the RL ones: they have a world model to probe
FIDELITY_METHODS = ("sft_stage3", "sft123_rl1", "sft123_rl12", "rl_stage2_only", "sft12_rl2")
EMBEDDED_JUDGE_NOTE = (
    "the embedded model judges (a stand-in: a 135M model's verdicts are not meaningful; "
    "paper profile: Qwen/Qwen2.5-14B-Instruct)"
)

BENCHMARK_PARTITIONS = dg.StaticPartitionsDefinition(list(BENCHMARKS))
PREDICTION_PARTITIONS = dg.MultiPartitionsDefinition(
    {"method": dg.StaticPartitionsDefinition(list(METHODS)), "benchmark": BENCHMARK_PARTITIONS}
)

PREDICTION_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("benchmark", pa.string()),
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("golden_answers", pa.list_(pa.string())),
        ("prediction", pa.string()),
        ("em", pa.float64()),
        ("f1", pa.float64()),
        ("cover_em", pa.float64()),
        ("judge", pa.bool_()),
        ("judge_raw", pa.string()),
        ("judge_reason", pa.string()),
        ("judge_prompt_id", pa.string()),
        ("judge_model", pa.string()),
        ("n_actions", pa.int32()),
        ("max_actions", pa.int32()),
        ("finish_reason", pa.string()),
        ("generated_tokens", pa.int32()),
        ("wall_seconds", pa.float64()),
        ("queries", pa.list_(pa.string())),
        ("trajectory", pa.string()),
        ("template_id", pa.string()),
        ("engine", pa.string()),
        ("model", pa.string()),
        ("checkpoint", pa.string()),
        ("profile", pa.string()),
    ]
)
FIDELITY_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("checkpoint", pa.string()),
        ("source", pa.string()),
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("golden_answers", pa.list_(pa.string())),
        ("prediction", pa.string()),
        ("em", pa.float64()),
        ("query", pa.string()),
        ("simulated", pa.string()),
        ("real", pa.string()),
        ("token_f1", pa.float64()),
        ("rouge_l", pa.float64()),
        ("sim_has_gold", pa.bool_()),
        ("real_has_gold", pa.bool_()),
        ("sim_has_prediction", pa.bool_()),
        ("real_has_prediction", pa.bool_()),
        ("unsupported_gold", pa.bool_()),
        ("unsupported_prediction", pa.bool_()),
        ("hallucination", pa.bool_()),
    ]
)


def prediction_partitions_by_method(methods=METHODS, benchmarks=BENCHMARKS) -> list[dg.MultiPartitionKey]:
    """Run order for eval_predictions: every benchmark of a method before the next method, so one process
    running them in turn loads each policy once (each partition releases the engines it no longer needs)."""
    return [dg.MultiPartitionKey({"method": m, "benchmark": b}) for m in methods for b in benchmarks]


# -- reading partitions -------------------------------------------------------------------------
def _partition_files(storage: StorageResource, asset: str, partition: str | None = None) -> dict[str, str]:
    """``{partition key: parquet path}`` of one partition (when on disk) or of every materialised one."""
    base = tables_dir(storage.home) / asset
    if partition is not None:
        path = base / partition_dirname(partition) / "data.parquet"
        return {partition: str(path)} if path.is_file() else {}
    return {
        unquote(Path(f).parent.name[len("partition=") :]): f
        for f in sorted(glob.glob(str(base / "partition=*" / "data.parquet")))
    }


def _scoped(context, storage: StorageResource, asset: str) -> tuple[dict[str, pa.Table], str]:
    """The partitions a check looks at: the run's partition, else every materialised one."""
    partition = context.run.tags.get("dagster/partition")
    files = _partition_files(storage, asset, partition)
    scope = f"partition {partition}" if partition else "all partitions"
    return {k: pq.read_table(f) for k, f in files.items()}, f"{scope} ({len(files)} files)"


def _partition_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return {}
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def _questions(table: pa.Table) -> list[bm.EvalQuestion]:
    return [
        bm.EvalQuestion(
            r["benchmark"], r["question_id"], r["question"], tuple(r["golden_answers"]), r["source"], r["source_row"]
        )
        for r in table.to_pylist()
    ]


def _read_predictions(storage: StorageResource) -> tuple[pa.Table, dict[str, int]]:
    """Every materialised eval_predictions partition in one table, and the row count per partition."""
    files = _partition_files(storage, "eval_predictions")
    tables = {k: pq.read_table(f) for k, f in files.items()}
    rows = pa.concat_tables(list(tables.values())) if tables else PREDICTION_SCHEMA.empty_table()
    return rows, {k: t.num_rows for k, t in tables.items()}


def _result(
    checked: int, problems: list[str], scope: str, severity=dg.AssetCheckSeverity.ERROR, **extra
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=not problems,
        severity=severity,
        metadata={
            "scope": scope,
            "checked": checked,
            "problems": len(problems),
            "examples": "\n".join(problems[:8]),
            **extra,
        },
    )


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


def _embedded_pool(world: pa.Table, sample: pa.Table, splits: list[str]) -> tuple[bm.LoadResult, dict]:
    """Held-out questions of the generated world: not in the training sample (by id or text), in ``splits``.

    A world generated with another seed would be held out too, but its entities are not in the search
    index (built from this world's paragraphs), so its questions could not be answered by searching.
    """
    ids = set(sample.column("id").to_pylist())
    texts = {normalise_question(q) for q in sample.column("question").to_pylist()}
    rows = world.select(["id", "question", "answer", "split"]).to_pylist()
    training = [r for r in rows if r["id"] in ids or normalise_question(r["question"]) in texts]
    seen = {r["id"] for r in training}
    other = [r for r in rows if r["id"] not in seen and r["split"] not in splits]
    seen |= {r["id"] for r in other}
    pool = [r for r in rows if r["id"] not in seen]
    return (
        bm.load_records(pool, benchmark=EMBEDDED, source="embedded_world"),
        {"rows_in": len(rows), "excluded_training": len(training), "excluded_split": len(other)},
    )


def _shared_pool(path: Path, benchmark: str) -> tuple[bm.LoadResult, dict]:
    res = bm.load_autocoa_parquet(path)
    # rows of this benchmark counted from the file's own column: the independent side of the reconcile check
    names = pq.read_table(path, columns=["source_file"]).column("source_file").to_pylist()
    rows_in = sum(1 for s in names if isinstance(s, str) and bm.benchmark_name(s) == benchmark)
    mine = bm.LoadResult(
        [q for q in res.questions if q.benchmark == benchmark],
        [r for r in res.rejected if r.benchmark == benchmark],
        rows_in,
    )
    return mine, {
        "rows_in": rows_in,
        "excluded_training": 0,
        "excluded_split": 0,
        "file_rows": res.rows_in,
        "file_rejected_unattributed": sum(r.benchmark == "unknown" for r in res.rejected),
    }


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
    with timed(md):
        path = Path(config.autocoa_test_file)
        if bench == EMBEDDED:
            result, counts = _embedded_pool(embedded_world, question_sample, config.embedded_splits)
            source = "embedded_world"
        elif path.is_file():
            result, counts = _shared_pool(path, bench)
            source = str(path)
        else:
            result, counts, source = (
                bm.LoadResult(),
                {"rows_in": 0, "excluded_training": 0, "excluded_split": 0},
                str(path),
            )
            md["source_missing"] = (
                f"{path} not found (a fresh clone has no ../shared/data): partition left empty; "
                "set autocoa_test_file to evaluate on the shared benchmarks"
            )
            context.log.warning("eval_questions %s: %s", bench, md["source_missing"])
        ids = question_sample.column("id").to_pylist() if bench == EMBEDDED else ()  # ids comparable only there
        leaks = bm.find_leakage(result.questions, question_sample.column("question").to_pylist(), ids)
        clean = [q for q in result.questions if (q.benchmark, q.question_id) not in leaks]
        rejected = result.rejected + [
            bm.RejectedQuestion(
                q.benchmark, q.source, q.source_row, f"leakage: {leaks[(q.benchmark, q.question_id)]}", q.question
            )
            for q in result.questions
            if (q.benchmark, q.question_id) in leaks
        ]
        n = config.embedded_n if bench == EMBEDDED else config.n
        sampled = bm.sample_per_benchmark(clean, n, config.seed)
    table, rej = bm.questions_table(sampled), bm.rejected_table(rejected)
    counts.update(
        {
            "rows_rejected": len(rejected),
            "sampled": len(sampled),
            "not_sampled": len(clean) - len(sampled),
            "leaked": len(leaks),
        }
    )
    if n is not None and 0 < len(clean) < n:
        context.log.warning("eval_questions %s: only %d questions for n=%d", bench, len(clean), n)
    if bench == EMBEDDED and not clean:
        raise dg.Failure(
            f"eval_questions embedded: no embedded_world question outside question_sample in splits "
            f"{config.embedded_splits}; enlarge EmbeddedWorldConfig.questions or lower QuestionSampleConfig.total"
        )
    context.log.info(
        "eval_questions %s: %d sampled of %d usable, %d rejected (%d leaked), from %s",
        bench,
        len(sampled),
        len(clean),
        len(rejected),
        len(leaks),
        source,
    )
    yield dg.Output(
        table,
        output_name="eval_questions",
        metadata={
            **md,
            **table_metadata(table, preview_columns=["benchmark", "question_id", "question", "golden_answers"]),
            **counts,
            "source": source,
            "n": n if n is not None else -1,
            "seed": config.seed,
        },
    )
    yield dg.Output(
        rej,
        output_name="eval_questions_rejected",
        metadata={**table_metadata(rej, preview_columns=["source_row", "reason"]), **counts},
    )


@dg.asset_check(
    asset="eval_questions", blocking=True, description="(benchmark, question_id) is unique within every partition."
)
def eval_questions_ids_unique(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    parts, scope = _scoped(context, storage, "eval_questions")
    problems, checked = [], 0
    for key, t in parts.items():
        ids = t.column("question_id").to_pylist()
        checked += len(ids)
        problems += [f"{key}: {q} appears {ids.count(q)} times" for q in sorted(set(ids)) if ids.count(q) > 1]
        problems += [f"{key}: row of benchmark {b}" for b in set(t.column("benchmark").to_pylist()) if b != key]
    return _result(checked, problems, scope)


@dg.asset_check(
    asset="eval_questions",
    blocking=True,
    description="Leakage: no evaluation question is a question of the training sample (question_sample).",
)
def eval_questions_no_training_leakage(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    sample = _table(storage, "question_sample")
    if sample is None:
        return NOT_MATERIALISED
    parts, scope = _scoped(context, storage, "eval_questions")
    problems, checked = [], 0
    for key, t in parts.items():
        qs = _questions(t)
        checked += len(qs)
        ids = sample.column("id").to_pylist() if key == EMBEDDED else ()
        leaks = bm.find_leakage(qs, sample.column("question").to_pylist(), ids)
        problems += [f"{b}/{q}: {why}" for (b, q), why in sorted(leaks.items())]
    return _result(checked, problems, scope, training_questions=sample.num_rows)


@dg.asset_check(
    asset="eval_questions",
    blocking=True,
    description=(
        "Counts reconcile per partition: source rows = sampled + not sampled + rejected + excluded (training sample, other split)."
    ),
)
def eval_questions_counts_reconcile(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    parts, scope = _scoped(context, storage, "eval_questions")
    problems = []
    for key, t in parts.items():
        meta = _partition_metadata(context.instance, "eval_questions", key)
        rej = _partition_files(storage, "eval_questions_rejected", key)
        n_rej = pq.ParquetFile(rej[key]).metadata.num_rows if rej else 0
        parts_sum = (
            t.num_rows
            + meta.get("not_sampled", 0)
            + n_rej
            + meta.get("excluded_training", 0)
            + meta.get("excluded_split", 0)
        )
        if not meta or meta.get("rows_in") != parts_sum or meta.get("sampled") != t.num_rows:
            problems.append(
                f"{key}: rows_in {meta.get('rows_in')} != {t.num_rows} sampled + {meta.get('not_sampled')} "
                f"not sampled + {n_rej} rejected + excluded {meta.get('excluded_training')}/{meta.get('excluded_split')}"
            )
    return _result(len(parts), problems, scope)


# -- eval_predictions ---------------------------------------------------------------------------
EvalRollout = rollout_settings(
    "EvalRollout",
    "Rollout settings of every evaluated method (greedy; base_cot uses cot_max_tokens and no tool).",
    temperature=0.0,
    top_p=1.0,
    max_actions=5,  # 4-hop questions need 4; paper: up to 10
    max_turn_tokens=96,
    force_answer=True,
    search_k=2,  # embedded 2, as the training data; paper 3
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
    judge_max_tokens: int = Field(8, description="Tokens the judge may write when not constrained.")
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
    cot_max_tokens: int = Field(160, description="Tokens a base_cot answer may write.")


def checkpoint_template(checkpoint: str) -> PromptTemplate:
    """The prompt a trained checkpoint is evaluated with: the plain agent instruction of its root model's family,
    no worked examples (:func:`agent.prompts.agent_template`): acting must be internal to the model. RL from the
    untrained model may have been guided by examples during training (``meta.json``'s ``template``), not here."""
    meta_path = Path(checkpoint) / "meta.json"
    if not meta_path.is_file():
        raise dg.Failure(f"{meta_path} not found: a checkpoint directory must hold meta.json with root_model")
    meta = json.loads(meta_path.read_text())
    return agent_template(Path(meta.get("root_model") or checkpoint).name)


def _checkpoint(storage: StorageResource, method: str) -> str | None:
    manifest = _table(storage, f"{method}_checkpoint")
    if manifest is None or manifest.num_rows == 0:
        return None
    path = manifest.column("path")[0].as_py()
    if not Path(path).is_dir():
        raise dg.Failure(f"{method}_checkpoint: its manifest points at {path}, which does not exist; re-materialise it")
    return path


def _policy(
    method: str, model_name: str, checkpoint: str | None, config: EvalPredictionsConfig
) -> tuple[PromptTemplate, RolloutConfig]:
    rcfg = config.rollout.build(seed=config.seed)
    if method == "base_cot":  # no tool: an action the model opens ends its reasoning and the answer is forced
        return template_for("cot", model_name), dataclasses.replace(
            rcfg, tools=False, cut_actions=True, max_turn_tokens=config.cot_max_tokens
        )
    if method in ("react_base", "react_reasoning"):
        return react_template_for(model_name), react_rollout_config(rcfg)
    return checkpoint_template(checkpoint), rcfg


def _empty(context, method: str, bench: str, status: str) -> dg.Output:
    context.log.warning("eval_predictions %s/%s: %s; partition left empty", method, bench, status)
    table = PREDICTION_SCHEMA.empty_table()
    return dg.Output(
        table,
        metadata={**table_metadata(table), "evaluated": False, "status": status, "method": method, "benchmark": bench},
    )


def _prediction_metadata(table: pa.Table, judge_spec: EngineSpec, judge_model: str) -> dict:
    rows = table.select(["em", "f1", "judge", "judge_reason", "n_actions", "generated_tokens"]).to_pylist()
    n = len(rows)
    unparsable = sum(1 for r in rows if r["judge"] is None)
    return {
        "accuracy_em": round(sum(r["em"] for r in rows) / n, 4),
        "mean_f1": round(sum(r["f1"] for r in rows) / n, 4),
        "accuracy_judge": round(sum(1 for r in rows if r["judge"] is True) / n, 4),
        "judge_unparsable": unparsable,
        "mean_actions": round(sum(r["n_actions"] for r in rows) / n, 3),
        "generated_tokens": sum(r["generated_tokens"] for r in rows),
        "judge_model": judge_model + (f" ({EMBEDDED_JUDGE_NOTE})" if judge_spec.model == "embedded" else ""),
    }


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
        description=(
            "One graded prediction per evaluation question for a method (base model with CoT, ReAct, or an "
            "agent checkpoint with real search), with EM, F1 and the LLM judge's verdict."
        ),
    )
    def eval_predictions(
        context: dg.AssetExecutionContext,
        config: EvalPredictionsConfig,
        eval_questions: pa.Table,
        storage: StorageResource,
        search_engine: SearchEngineResource,
    ) -> dg.Output[pa.Table]:
        keys = context.partition_key.keys_by_dimension
        method, bench = keys["method"], keys["benchmark"]
        checkpoint = None
        if method in CHECKPOINT_METHODS:
            checkpoint = _checkpoint(storage, method)
            if checkpoint is None:
                defined = f"{method}_checkpoint" in existing
                return _empty(
                    context,
                    method,
                    bench,
                    f"{method}_checkpoint is not materialised"
                    + ("" if defined else " (no such asset in this code location yet)"),
                )
        questions = _questions(eval_questions)
        if not questions:
            return _empty(context, method, bench, f"eval_questions partition {bench} has no questions")
        md: dict = {}
        models = storage.artifact_dir("models")
        with timed(md):
            base = (config.base_engine if method == "react_base" else config.engine).spec(config.rollout.max_context)
            policy_spec = dataclasses.replace(base, model=checkpoint) if checkpoint else base
            judge_spec = config.judge.spec()
            released = release_engines(keep={policy_spec, judge_spec})  # the previous method's checkpoint
            engine = load_engine(policy_spec, models)
            template, rcfg = _policy(method, engine.model_name, checkpoint, config)
            search = search_tool(search_engine.get_engine(), config.rollout.search_k) if rcfg.tools else None
            info = RunInfo(
                pool=template.mode,
                round="eval",
                shard=bench,
                profile=config.profile,
                engine=engine.name,
                model=engine.model_name,
                template=template,
                seed=config.seed,
                samples=1,
            )
            context.log.info(
                "eval_predictions %s/%s: %d questions, engine %s, model %s, template %s (%d engines released)",
                method,
                bench,
                len(questions),
                engine.name,
                engine.model_name,
                template.id,
                released,
            )
            bar, on_done = _progress(context, len(questions), f"{method}/{bench}")
            try:  # every question of the partition in one batched rollout
                trajs, stats = synthesize(
                    [q.as_task() for q in questions],
                    engine=engine,
                    search=search,
                    info=info,
                    config=rcfg,
                    on_done=on_done,
                )
            finally:
                bar.close()
            trajs = trajs.to_pylist()
            judge_engine = load_engine(judge_spec, models)
            verdicts = judge(
                judge_engine,
                [JudgeItem(q.question, t["predicted_answer"], q.golden_answers) for q, t in zip(questions, trajs)],
                prompt_id=config.judge_prompt_id,
                max_new_tokens=config.judge_max_tokens,
                seed=config.seed,
                constrained=config.judge_constrained,
            )
        rows = []
        for q, t, v in zip(questions, trajs, verdicts):
            if t["question_id"] != q.key:
                raise RuntimeError(f"rollout returned {t['question_id']} where {q.key} was expected")
            rows.append(
                {
                    "method": method,
                    "benchmark": bench,
                    "question_id": q.question_id,
                    "question": q.question,
                    "golden_answers": list(q.golden_answers),
                    "prediction": t["predicted_answer"],
                    "em": t["em"],
                    "f1": t["f1"],
                    "cover_em": t["cover_em"],
                    **v.as_row(),
                    "n_actions": t["n_actions"],
                    "max_actions": t["max_actions"],
                    "finish_reason": t["finish_reason"],
                    "generated_tokens": t["generated_tokens"],
                    "wall_seconds": t["wall_seconds"],
                    "queries": t["queries"],
                    "trajectory": t["text"],
                    "template_id": template.id,
                    "engine": engine.name,
                    "model": engine.model_name,
                    "checkpoint": checkpoint,
                    "profile": config.profile,
                }
            )
        table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
        md.update(
            table_metadata(
                table,
                preview_columns=["question_id", "question", "golden_answers", "prediction", "em", "judge", "n_actions"],
            )
        )
        md.update(_prediction_metadata(table, judge_spec, getattr(judge_engine, "model_name", judge_spec.model)))
        md.update(
            {
                "evaluated": True,
                "status": "evaluated",
                "method": method,
                "benchmark": bench,
                "engine": engine.name,
                "model": engine.model_name,
                "template_id": template.id,
                "checkpoint": checkpoint or "",
                "judge_prompt_id": config.judge_prompt_id,
                "judge_decoding": "constrained to one yes/no token" if config.judge_constrained else "free text",
                "max_actions": rcfg.max_actions if rcfg.tools else 0,
                "search_calls": stats["search_calls"],
                "rollout_seconds": round(stats["wall_seconds"], 2),
            }
        )
        if method in ("react_base", "react_reasoning") and config.base_engine.spec(
            config.rollout.max_context
        ) == config.engine.spec(config.rollout.max_context):
            md["note"] = (
                "react_base and react_reasoning run the same model here: this profile configures one model "
                "(set base_engine to a pretrained base model, as the paper profile does, to separate them)"
            )
        context.log.info(
            "eval_predictions %s/%s: EM %.3f, judge %.3f (%d unparsable), %.2f actions",
            method,
            bench,
            md["accuracy_em"],
            md["accuracy_judge"],
            md["judge_unparsable"],
            md["mean_actions"],
        )
        return dg.Output(table, metadata=md)

    return eval_predictions


@dg.asset_check(
    asset="eval_predictions",
    blocking=True,
    description=(
        "Each evaluated partition holds every question of its eval_questions partition exactly once, and no other."
    ),
)
def eval_predictions_match_questions(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    parts, scope = _scoped(context, storage, "eval_predictions")
    problems, checked = [], 0
    for key, t in parts.items():
        if t.num_rows == 0:
            continue  # not evaluated (checkpoint missing, no questions): the metadata says why
        checked += t.num_rows
        bench = key.split("|")[0]
        q = _partition_files(storage, "eval_questions", bench)
        want = pq.read_table(q[bench], columns=["question_id"]).column("question_id").to_pylist() if q else []
        got = t.column("question_id").to_pylist()
        if sorted(got) != sorted(want):
            problems.append(
                f"{key}: {len(got)} rows ({len(set(got))} distinct) for {len(want)} questions; "
                f"missing {sorted(set(want) - set(got))[:3]}, extra {sorted(set(got) - set(want))[:3]}"
            )
    return _result(checked, problems, scope)


@dg.asset_check(
    asset="eval_predictions",
    description=(
        "The judge gave a yes/no verdict for at least half of the answered questions (WARN: a weak judge, e.g. the embedded stand-in)."
    ),
)
def eval_predictions_judge_parsable(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    parts, scope = _scoped(context, storage, "eval_predictions")
    asked = [
        r for t in parts.values() for r in t.select(["judge", "judge_raw"]).to_pylist() if r["judge_raw"] is not None
    ]
    rate = sum(1 for r in asked if r["judge"] is not None) / len(asked) if asked else 1.0
    return dg.AssetCheckResult(
        passed=rate >= 0.5,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"scope": scope, "judged": len(asked), "parsable_rate": round(rate, 4)},
    )


def build(existing: Collection[str]) -> tuple[list, list]:
    """Every evaluation asset and check; ``existing``: the asset keys the Definitions hold (checkpoint lineage)."""
    from assets import eval_reports

    assets = [eval_questions, build_eval_predictions(existing), *eval_reports.build_assets(existing)]
    checks = [
        eval_questions_ids_unique,
        eval_questions_no_training_leakage,
        eval_questions_counts_reconcile,
        eval_predictions_match_questions,
        eval_predictions_judge_parsable,
        *eval_reports.CHECKS,
    ]
    return assets, checks
