"""Synthesis stage: CoT and CoA trajectories written by the teacher, one partition per (round, shard)."""

import collections
import dataclasses
import glob
import os
import time

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from agent import validate
from agent.engine_api import EngineSpec
from agent.engines import load_engine
from agent.prompts import TEMPLATES, template_for
from agent.rollout import search_tool
from agent.synthesis import RunInfo, round_seed, shard_of, synthesize
from assets.metadata import bar_plot, latest_metadata, markdown_table, table_metadata, timed
from assets.resources import SearchEngineResource
from assets.settings import rollout_settings
from assets.storage import StorageResource
from qadata.paths import partition_dirname, tables_dir

GROUP = "synthesis"
POOLS = ("cot", "coa")
DEFAULT_ROUND = "r000"


def shard_count() -> int:
    """Shards per round: fixed per deployment (``$AUTOCOA_SHARDS``, default 4)."""
    value = os.environ.get("AUTOCOA_SHARDS", "4")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"AUTOCOA_SHARDS must be a positive integer, got {value!r}")
    return int(value)


ROUNDS = dg.DynamicPartitionsDefinition(name="synthesis_rounds")


def shard_keys(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


def trajectory_partitions(shards: int) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({"round": ROUNDS, "shard": dg.StaticPartitionsDefinition(shard_keys(shards))})


class EngineConfig(dg.Config):
    kind: str = Field(
        "auto",
        description=(
            "'vllm', 'transformers', 'openai' (HTTP), 'expert' (the scripted demonstrator of the generated world, "
            "agent/expert.py) or 'auto' (vLLM when installed)."
        ),
    )
    model: str = Field(
        "embedded", description="'embedded' (SmolLM2-135M-Instruct), a checkpoint directory or a hub id."
    )
    dtype: str | None = Field(
        None, description="Weights dtype; default bfloat16 for vLLM/GPU, float32 for transformers on CPU."
    )
    max_model_len: int = Field(4096, description="Longest sequence the engine accepts (prompt + trajectory).")
    tensor_parallel_size: int = Field(1, description="GPUs per vLLM engine (paper teacher: 4+).")
    gpu_memory_utilization: float = Field(0.85, description="vLLM's share of GPU memory.")
    max_batch: int = Field(64, description="Largest batch the transformers engine runs at once.")
    base_urls: list[str] = Field(
        default_factory=list, description="OpenAI-compatible servers (kind 'openai'); several form a fleet."
    )
    served_model: str | None = Field(None, description="Model name the HTTP server serves (default: model).")

    def spec(self, min_model_len: int = 0) -> EngineSpec:
        return EngineSpec(
            kind=self.kind,
            model=self.model,
            dtype=self.dtype,
            max_model_len=max(self.max_model_len, min_model_len),
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_batch=self.max_batch,
            base_urls=tuple(self.base_urls),
            served_model=self.served_model,
        )


class TeacherEngineConfig(EngineConfig):
    kind: str = Field(
        "expert",
        description=(
            "The teacher. Embedded default: 'expert', the scripted demonstrator of the generated world (a program "
            "stronger than the 135M student, agent/expert.py); 'auto' with model 'embedded' selects the SmolLM2 "
            "few-shot teacher; paper: 'vllm' with DeepSeek-R1-Distill-Qwen-32B."
        ),
    )


TrajectoryRollout = rollout_settings(
    "TrajectoryRollout",
    "Rollout settings of the teacher's trajectories (the CoT pool uses cot_max_tokens as its turn budget, no tools).",
    temperature=0.6,
    max_actions=5,
    max_turn_tokens=256,
    force_answer=True,
    search_k=2,  # embedded: 2 passages keep trajectories short for CPU training; paper profile: 3
)


class TrajectoryConfig(dg.Config):
    profile: str = Field("embedded", description="Profile name recorded with every row.")
    engine: TeacherEngineConfig = Field(
        default_factory=TeacherEngineConfig, description="The teacher that writes the trajectories."
    )
    template_id: str | None = Field(
        None, description=f"Prompt template ({', '.join(TEMPLATES)}); default: by model family."
    )
    samples_per_question: int = Field(1, description="Trajectories per question.")
    seed: int | None = Field(
        None, description="Sampling seed; default: derived from the round's name, so each round differs."
    )
    rollout: TrajectoryRollout = Field(
        default_factory=TrajectoryRollout,
        description="Rollout settings (T, N, turn budget, sampling, passages per search): agent.rollout.RolloutConfig.",
    )
    cot_max_tokens: int = Field(512, description="Tokens a CoT trajectory may write.")
    max_questions: int | None = Field(None, description="Cap on questions per shard (quick runs).")
    answer_rate_floor: float = Field(0.5, description="The non-empty-answer check warns below this share.")


def _partition(context) -> tuple[str, str]:
    keys = context.partition_key.keys_by_dimension
    return keys["round"], keys["shard"]


def progress_bar(context, total: int, label: str):
    """tqdm on stderr (the compute log) plus a line in the run log every ~10%."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, unit="traj", mininterval=2.0)
    state = {"done": 0, "next": max(1, total // 10), "t0": time.perf_counter()}

    def on_done(_traj) -> None:
        state["done"] += 1
        bar.update(1)
        if state["done"] >= state["next"] or state["done"] == total:
            state["next"] += max(1, total // 10)
            context.log.info(
                "%s: %d/%d trajectories (%.0fs)", label, state["done"], total, time.perf_counter() - state["t0"]
            )

    return bar, on_done


def _histogram(values: list[int]) -> tuple[list[str], list[float]]:
    counts = collections.Counter(values)
    top = max(counts) if counts else 0
    return [str(i) for i in range(top + 1)], [float(counts.get(i, 0)) for i in range(top + 1)]


def _metadata(table: pa.Table, stats: dict, info: RunInfo, config: TrajectoryConfig, questions: int) -> dict:
    rows = table.select(["em", "f1", "n_actions", "finish_reason", "predicted_answer", "generated_tokens"]).to_pylist()
    n = len(rows)
    actions = [r["n_actions"] for r in rows]
    labels, counts = _histogram(actions)
    by_actions = collections.defaultdict(list)
    for r in rows:
        by_actions[r["n_actions"]].append(r["em"])
    _, answered = validate.answer_rate(rows) if rows else (0, 0.0)
    md = table_metadata(
        table, preview_columns=["question_id", "sample", "n_actions", "predicted_answer", "em", "finish_reason", "text"]
    )
    md.update(
        {
            "questions": questions,
            "trajectories": n,
            "round": info.round,
            "shard": info.shard,
            "seed": info.seed,
            "engine": info.engine,
            "model": info.model,
            "template_id": info.template.id,
            "profile": info.profile,
            "accuracy_em": round(sum(r["em"] for r in rows) / n, 4) if n else 0.0,
            "mean_f1": round(sum(r["f1"] for r in rows) / n, 4) if n else 0.0,
            "mean_actions": round(sum(actions) / n, 3) if n else 0.0,
            "answer_rate": round(answered, 4),
            "answer_rate_floor": config.answer_rate_floor,
            "max_actions": config.rollout.max_actions,
            "generated_tokens": stats["generated_tokens"],
            "tokens_per_second": round(stats["generated_tokens_per_second"], 2),
            "search_calls": stats["search_calls"],
            "search_batches": stats["search_batches"],
            "errors": stats.get("errors", 0),
            "truncated_observations": stats.get("truncated_observations", 0),
            "finish_reasons": dg.MetadataValue.json(dict(collections.Counter(r["finish_reason"] for r in rows))),
            "accuracy_by_actions": dg.MetadataValue.md(
                markdown_table(
                    [
                        {"actions": k, "trajectories": len(v), "em": round(sum(v) / len(v), 3)}
                        for k, v in sorted(by_actions.items())
                    ]
                )
            ),
        }
    )
    if n:
        md["action_histogram"] = bar_plot(
            labels, {"trajectories": counts}, f"{info.pool}: actions per trajectory", "trajectories"
        )
    return md


def build_trajectory_asset(pool: str, partitions: dg.MultiPartitionsDefinition):
    doc = {
        "cot": "Chain-of-thought trajectories (no tool) written by the teacher for the CoT pool, graded against the gold answers.",
        "coa": "Chain-of-action trajectories (reasoning interleaved with real searches) written by the teacher for the CoA pool, graded.",
    }[pool]

    @dg.asset(
        name=f"{pool}_trajectories",
        group_name=GROUP,
        partitions_def=partitions,
        kinds={"python", "parquet"},
        deps=["search_index"] if pool == "coa" else [],
        description=doc,
        tags={"autocoa/stage": "synthesis"},
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: TrajectoryConfig,
        question_sample: pa.Table,
        storage: StorageResource,
        search_engine: SearchEngineResource,
    ) -> dg.Output[pa.Table]:
        round_key, shard = _partition(context)
        n_shards = len(partitions.get_partitions_def_for_dimension("shard").get_partition_keys())
        shard_index = int(shard[1:])
        questions = [
            q for q in question_sample.to_pylist() if q["pool"] == pool and shard_of(q["id"], n_shards) == shard_index
        ]
        questions.sort(key=lambda q: q["id"])
        in_shard = len(questions)
        if config.max_questions is not None:
            questions = questions[: config.max_questions]
        md: dict = {}
        with timed(md):
            engine = load_engine(config.engine.spec(config.rollout.max_context), storage.artifact_dir("models"))
            template = TEMPLATES[config.template_id] if config.template_id else template_for(pool, engine.model_name)
            if template.mode != pool:
                raise dg.Failure(f"{pool}_trajectories: template {template.id!r} is a {template.mode} template")
            seed = config.seed if config.seed is not None else round_seed(round_key)
            rcfg = config.rollout.build(tools=pool == "coa", seed=seed)
            if pool == "cot":
                rcfg = dataclasses.replace(rcfg, max_turn_tokens=config.cot_max_tokens)
            search = search_tool(search_engine.get_engine(), config.rollout.search_k) if pool == "coa" else None
            info = RunInfo(
                pool=pool,
                round=round_key,
                shard=shard,
                profile=config.profile,
                engine=engine.name,
                model=engine.model_name,
                template=template,
                seed=seed,
                samples=config.samples_per_question,
            )
            total = len(questions) * config.samples_per_question
            context.log.info(
                "%s %s/%s: %d questions (%d in shard), %d trajectories, engine %s, model %s, template %s, seed %d",
                pool,
                round_key,
                shard,
                len(questions),
                in_shard,
                total,
                engine.name,
                engine.model_name,
                template.id,
                seed,
            )
            bar, on_done = progress_bar(context, total, f"{pool} {round_key}/{shard}")
            try:
                table, stats = synthesize(
                    questions, engine=engine, search=search, info=info, config=rcfg, on_done=on_done
                )
            finally:
                bar.close()
        md.update(_metadata(table, stats, info, config, len(questions)))
        md["questions_in_shard"] = in_shard
        md["questions_skipped_by_cap"] = in_shard - len(questions)
        context.log.info(
            "%s %s/%s: EM %.3f, %.2f actions/trajectory, %.1f generated tokens/s",
            pool,
            round_key,
            shard,
            md["accuracy_em"],
            md["mean_actions"],
            md["tokens_per_second"],
        )
        return dg.Output(table, metadata=md)

    return _asset


# -- checks ------------------------------------------------------------------------------------
CHECK_COLUMNS = [
    "trajectory_id",
    "round",
    "question_id",
    "sample",
    "tags_balanced",
    "parse_issues",
    "n_actions",
    "max_actions",
    "spans",
    "token_ids",
    "policy_mask",
    "prompt_tokens",
    "generated_tokens",
    "predicted_answer",
]


def _rows(context, storage: StorageResource, asset: str, whole_round: bool = False) -> tuple[list[dict], str]:
    """The rows this check looks at: the run's partition (or its whole round), else every partition."""
    base = tables_dir(storage.home) / asset
    partition = context.run.tags.get("dagster/partition")
    if partition:
        if whole_round:
            round_key = partition.split("|")[0]
            files = sorted(glob.glob(str(base / f"{partition_dirname(round_key + '|')}*" / "data.parquet")))
            scope = f"round {round_key}"
        else:
            files = [str(base / partition_dirname(partition) / "data.parquet")]
            scope = f"partition {partition}"
    else:
        files, scope = sorted(glob.glob(str(base / "partition=*" / "data.parquet"))), "all partitions"
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        return [], f"{scope} (nothing materialised)"
    cols = [c for c in CHECK_COLUMNS if c in pq.read_schema(files[0]).names]
    rows = pa.concat_tables([pq.read_table(f, columns=cols) for f in files]).to_pylist()
    return rows, f"{scope} ({len(files)} files)"


def check_result(
    checked: int, problems: list[str], scope: str, severity=dg.AssetCheckSeverity.ERROR
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=not problems,
        severity=severity,
        metadata={"scope": scope, "checked": checked, "problems": len(problems), "examples": "\n".join(problems[:8])},
    )


def build_trajectory_checks(asset_name: str) -> list:
    @dg.asset_check(
        asset=asset_name,
        name="tags_balanced",
        description=(
            "Think, action and result tags open and close in order in every trajectory (the small model's stray tags are reported here)."
        ),
    )
    def tags_balanced(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        rows, scope = _rows(context, storage, asset_name)
        checked, bad = validate.tags_unbalanced(rows)
        # policy-written text: reported as WARN, the rollout-made structure is checked below as ERROR
        return check_result(checked, bad, scope, dg.AssetCheckSeverity.WARN)

    @dg.asset_check(
        asset=asset_name,
        name="actions_within_budget",
        blocking=True,
        description="No trajectory executed more than T actions.",
    )
    def actions_within_budget(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        rows, scope = _rows(context, storage, asset_name)
        return check_result(*validate.actions_over_budget(rows), scope)

    @dg.asset_check(
        asset=asset_name,
        name="actions_observed",
        blocking=True,
        description="Every action is immediately followed by an observation.",
    )
    def actions_observed(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        rows, scope = _rows(context, storage, asset_name)
        return check_result(*validate.actions_without_observation(rows), scope)

    @dg.asset_check(
        asset=asset_name,
        name="mask_aligned",
        blocking=True,
        description=(
            "policy_mask has one entry per token, is 0 on the prompt and real observations, 1 on actions, and counts the generated tokens."
        ),
    )
    def mask_aligned(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        rows, scope = _rows(context, storage, asset_name)
        return check_result(*validate.mask_misaligned(rows), scope)

    @dg.asset_check(
        asset=asset_name,
        name="no_duplicate_samples",
        blocking=True,
        description="At most one row per (round, question, sample) across the round's shards.",
    )
    def no_duplicate_samples(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        rows, scope = _rows(context, storage, asset_name, whole_round=True)
        return check_result(*validate.duplicate_samples(rows), scope)

    @dg.asset_check(
        asset=asset_name,
        name="answer_rate",
        description=(
            "Share of trajectories with a non-empty boxed answer is above the configured floor (answer_rate_floor)."
        ),
    )
    def answer_rate(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        rows, scope = _rows(context, storage, asset_name)
        floor = float(latest_metadata(context.instance, asset_name).get("answer_rate_floor", 0.5))
        n, rate = validate.answer_rate(rows)
        return dg.AssetCheckResult(
            passed=rate >= floor,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"scope": scope, "trajectories": n, "answer_rate": round(rate, 4), "floor": floor},
        )

    return [tags_balanced, actions_within_budget, actions_observed, mask_aligned, no_duplicate_samples, answer_rate]


def build(shards: int | None = None) -> tuple[list, list, dg.MultiPartitionsDefinition]:
    partitions = trajectory_partitions(shards or shard_count())
    assets = [build_trajectory_asset(pool, partitions) for pool in POOLS]
    checks = [c for pool in POOLS for c in build_trajectory_checks(f"{pool}_trajectories")]
    return assets, checks, partitions


# -- scheduled re-synthesis ----------------------------------------------------------------------
def weekly_round_key(when) -> str:
    """The round a weekly tick adds: ISO year and week, e.g. ``w2026-47``."""
    year, week, _ = when.isocalendar()
    return f"w{year}-{week:02d}"


def build_resynthesis_schedule(job, *, running: bool, cron: str = "0 4 * * 1"):
    """Weekly: add a new round (a new seed, derived from its name) and request one run per shard.

    Old rounds are never touched; compare rounds with SQL over the ``round`` column. Off unless the
    profile's ``definitions: {weekly_resynthesis: running}`` turns it on (the paper profile does); "Test
    schedule" in the UI, or adding a round key in the launchpad, runs it by hand.
    """

    @dg.schedule(
        name="weekly_resynthesis",
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED,
        description="Adds a new synthesis round each week (new seed or teacher) and synthesises every shard of it.",
    )
    def weekly_resynthesis(context: dg.ScheduleEvaluationContext):
        round_key = weekly_round_key(context.scheduled_execution_time)
        if not context.instance.has_dynamic_partition(ROUNDS.name, round_key):
            context.instance.add_dynamic_partitions(ROUNDS.name, [round_key])
        shards = job.partitions_def.get_partitions_def_for_dimension("shard").get_partition_keys()
        return [
            dg.RunRequest(
                run_key=f"{round_key}|{s}",
                partition_key=dg.MultiPartitionKey({"round": round_key, "shard": s}),
                tags={"autocoa/round": round_key},
            )
            for s in shards
        ]

    return weekly_resynthesis
