"""Trajectory synthesis: questions in, graded CoT or CoA trajectories (one row each) out.

The Dagster assets ``cot_trajectories`` / ``coa_trajectories`` call :func:`synthesize` once per
shard of questions; everything here is plain Python so RL and evaluation reuse it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import pyarrow as pa

from agent.prompts import PromptTemplate
from agent.protocol import parse
from agent.rollout import Rollout, RolloutConfig, Trajectory
from qadata.answers import score

log = logging.getLogger(__name__)

SPAN = pa.struct(
    [
        ("kind", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("simulated", pa.bool_()),
        ("refused", pa.bool_()),
        ("text", pa.string()),
        ("passage_ids", pa.list_(pa.string())),
        ("truncated", pa.bool_()),
        ("closed_by", pa.string()),
    ]
)

TRAJECTORY_SCHEMA = pa.schema(
    [
        ("trajectory_id", pa.string()),
        ("question_id", pa.string()),
        ("sample", pa.int32()),
        ("pool", pa.string()),
        ("round", pa.string()),
        ("shard", pa.string()),
        ("profile", pa.string()),
        ("engine", pa.string()),
        ("model", pa.string()),
        ("template_id", pa.string()),
        ("seed", pa.int64()),
        ("temperature", pa.float32()),
        ("question", pa.string()),
        ("gold_answers", pa.list_(pa.string())),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("policy_mask", pa.list_(pa.int8())),
        ("prompt_tokens", pa.int32()),
        ("spans", pa.list_(SPAN)),
        ("queries", pa.list_(pa.string())),
        ("retrieved_passage_ids", pa.list_(pa.string())),
        ("predicted_answer", pa.string()),
        ("em", pa.float32()),
        ("f1", pa.float32()),
        ("cover_em", pa.float32()),
        ("n_actions", pa.int32()),
        ("max_actions", pa.int32()),
        ("refused_actions", pa.int32()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),  # finish_reason "error": what failed (the row is kept and counted, never dropped)
        ("generated_tokens", pa.int32()),
        ("observation_tokens", pa.int32()),
        ("total_tokens", pa.int32()),
        ("search_calls", pa.int32()),
        ("wall_seconds", pa.float32()),
        ("simulated", pa.bool_()),
        ("parse_issues", pa.list_(pa.string())),
        ("tags_balanced", pa.bool_()),
    ]
)


def shard_of(question_id: str, shards: int) -> int:
    """Stable shard of a question (independent of sample order and of Python's hash seed)."""
    digest = hashlib.blake2b(question_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


def round_seed(round_key: str) -> int:
    """The seed a synthesis round uses when none is configured: stable in the round's name."""
    return int.from_bytes(hashlib.blake2b(round_key.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class RunInfo:
    """What every row records about how it was produced."""

    pool: str
    round: str
    shard: str
    profile: str
    engine: str
    model: str
    template: PromptTemplate
    seed: int
    samples: int


def trajectory_row(
    traj: Trajectory, q: dict, sample: int, info: RunInfo, rollout: Rollout, config: RolloutConfig
) -> dict:
    completion = traj.completion
    parsed = parse(completion, think_open=info.template.prefill.strip() == "<think>")
    scores = score(traj.answer, q.get("answers") or [q["answer"]])
    obs_tokens = sum(s.end - s.start for s in traj.spans if s.kind == "observation")
    passages = [pid for s in traj.spans if s.kind == "observation" for pid in s.passage_ids]
    return {
        "trajectory_id": f"{info.round}/{info.pool}/{q['id']}/{sample}",
        "question_id": q["id"],
        "sample": sample,
        "pool": info.pool,
        "round": info.round,
        "shard": info.shard,
        "profile": info.profile,
        "engine": info.engine,
        "model": info.model,
        "template_id": info.template.id,
        "seed": info.seed,
        "temperature": config.temperature,
        "question": q["question"],
        "gold_answers": list(q.get("answers") or [q["answer"]]),
        "prompt": rollout.decode(traj.token_ids[: traj.prompt_len]),
        "text": completion,
        "token_ids": traj.token_ids,
        "policy_mask": traj.policy_mask,
        "prompt_tokens": traj.prompt_len,
        "spans": [{k: v for k, v in asdict(s).items()} for s in traj.spans],
        "queries": traj.queries,
        "retrieved_passage_ids": passages,
        "predicted_answer": traj.answer,
        "em": scores.em,
        "f1": scores.f1,
        "cover_em": scores.cover_em,
        "n_actions": traj.n_actions,
        "max_actions": config.max_actions if config.tools else 0,
        "refused_actions": sum(1 for s in traj.spans if s.kind == "action" and s.refused),
        "finish_reason": traj.finish_reason,
        "error": traj.error or None,
        "generated_tokens": traj.generated_tokens,
        "observation_tokens": obs_tokens,
        "total_tokens": len(traj.token_ids),
        "search_calls": traj.search_calls,
        "wall_seconds": traj.wall_seconds,
        "simulated": config.simulated,
        "parse_issues": parsed.issues,
        "tags_balanced": parsed.balanced,
    }


def synthesize(
    questions: Sequence[dict],
    *,
    engine,
    search,
    info: RunInfo,
    config: RolloutConfig,
    on_done: Callable[[Trajectory], None] | None = None,
) -> tuple[pa.Table, dict]:
    """Roll out ``info.samples`` trajectories per question; returns the rows and run statistics."""
    if info.template.mode == "cot" and config.tools:
        raise ValueError(f"template {info.template.id} is a CoT template; CoT rollouts run with tools=False")
    rollout = Rollout(engine, search if config.tools else None, config, on_done=on_done)
    by_task: dict[str, tuple[dict, int]] = {}
    tasks = []
    for q in questions:
        ids = info.template.prompt_ids(rollout.tokenizer, q["question"])
        for sample in range(info.samples):
            task_id = f"{info.pool}/{q['id']}/{sample}"
            by_task[task_id] = (q, sample)
            tasks.append((task_id, ids))
    start = time.perf_counter()
    trajectories = rollout.run(tasks) if tasks else []
    wall = time.perf_counter() - start
    rows = [trajectory_row(t, *by_task[t.task_id], info, rollout, config) for t in trajectories]
    generated = sum(r["generated_tokens"] for r in rows)
    stats = {
        "wall_seconds": wall,
        "generated_tokens": generated,
        "generated_tokens_per_second": generated / wall if wall > 0 else 0.0,
        "search_batches": len(rollout.search.batches) if rollout.search else 0,
        "search_calls": sum(r["search_calls"] for r in rows),
        "errors": sum(1 for r in rows if r["finish_reason"] == "error"),
        "truncated_observations": sum(1 for r in rows for s in r["spans"] if s.get("truncated")),
    }
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA), stats
