"""The methods of Table 1 and how each is evaluated: which model it runs (:func:`policy_model`), with which
prompt template and rollout settings (:func:`policy`), and one graded prediction per question (:func:`predict`:
one batched rollout with real search, grading, one batched LLM-judge call), the rows ``eval_predictions`` stores.

Plain Python: the Dagster asset (``assets/evaluation.py``) and the evaluation throughput benchmark
(``benchmarks/evaluation.py``) call the same functions with the same defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa

from agent.engine_api import EngineSpec
from agent.prompts import PromptTemplate, agent_template, template_for
from agent.rollout import RolloutConfig
from agent.synthesis import RunInfo, synthesize
from evals.datasets import EvalQuestion
from evals.judge import DEFAULT_JUDGE_PROMPT, JudgeItem, judge
from evals.react import react_rollout_config, react_template_for

# base_cot: the reasoning model, no tool; react_base / react_reasoning: ReAct prompting (not trained) on a
# non-reasoning instruct model (the "base" model) and on the reasoning model the agents start from
BASELINES = ("base_cot", "react_base", "react_reasoning")
REACT_METHODS = ("react_base", "react_reasoning")
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
METHODS = BASELINES + CHECKPOINT_METHODS  # the rows of our Table 1, in order
# the evaluation's rollout settings (greedy), over agent.rollout.RolloutConfig's defaults: the eval_predictions
# asset's defaults (EvalRollout) and the throughput benchmark's settings
EVAL_ROLLOUT = {
    "temperature": 0.0,
    "top_p": 1.0,
    "max_actions": 5,  # 4-hop questions need 4; paper: up to 10
    "max_turn_tokens": 96,
    "force_answer": True,
    "search_k": 2,  # embedded 2, as the training data; paper 3
}
COT_MAX_TOKENS = 160  # tokens a base_cot answer may write
JUDGE_MAX_TOKENS = 8  # tokens the judge may write when not constrained
EMBEDDED_JUDGE_NOTE = (
    "the embedded model judges (a stand-in: a 135M model's verdicts are not meaningful; "
    "paper profile: Qwen/Qwen2.5-14B-Instruct)"
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


def eval_rollout(seed: int | None = 0) -> RolloutConfig:
    """The evaluation's default rollout settings (:data:`EVAL_ROLLOUT`) as a ``RolloutConfig``."""
    return RolloutConfig(**EVAL_ROLLOUT, seed=seed)


def policy_model(method: str) -> str:
    """Which model a method evaluates: ``"base"`` (react_base), ``"reasoning"`` or ``"checkpoint"``."""
    if method == "react_base":
        return "base"
    if method in BASELINES:
        return "reasoning"
    if method in CHECKPOINT_METHODS:
        return "checkpoint"
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def policy_spec(method: str, reasoning: EngineSpec, base: EngineSpec, checkpoint: str | None) -> EngineSpec:
    """The engine a method's policy runs on: react_base the ``base`` model, a checkpoint method its checkpoint
    (with the ``reasoning`` engine's settings), base_cot and react_reasoning the ``reasoning`` model."""
    kind = policy_model(method)
    if kind == "base":
        return base
    if kind == "checkpoint":
        if checkpoint is None:
            raise ValueError(f"{method} evaluates a checkpoint: none given")
        return dataclasses.replace(reasoning, model=str(checkpoint))
    return reasoning


def checkpoint_template(checkpoint: str | Path) -> PromptTemplate:
    """The prompt a trained checkpoint is evaluated with: the plain agent instruction of its root model's family,
    no worked examples (:func:`agent.prompts.agent_template`): acting must be internal to the model. RL from the
    untrained model may have been guided by examples during training (``meta.json``'s ``template``), not here."""
    meta_path = Path(checkpoint) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: a checkpoint directory must hold meta.json with root_model")
    meta = json.loads(meta_path.read_text())
    return agent_template(Path(meta.get("root_model") or checkpoint).name)


def policy(
    method: str,
    model_name: str,
    checkpoint: str | Path | None,
    rollout: RolloutConfig,
    *,
    cot_max_tokens: int = COT_MAX_TOKENS,
) -> tuple[PromptTemplate, RolloutConfig]:
    """The prompt template and rollout settings ``method`` is evaluated with, from the configured ``rollout``."""
    kind = policy_model(method)
    if method == "base_cot":  # no tool: an action the model opens ends its reasoning and the answer is forced
        return template_for("cot", model_name), dataclasses.replace(
            rollout, tools=False, cut_actions=True, max_turn_tokens=cot_max_tokens
        )
    if method in REACT_METHODS:
        return react_template_for(model_name), react_rollout_config(rollout)
    if kind == "checkpoint" and checkpoint is None:
        raise ValueError(f"{method} evaluates a checkpoint: none given")
    return checkpoint_template(checkpoint), rollout


def policy_fingerprint(
    spec: EngineSpec,
    template_id: str,
    rollout: RolloutConfig,
    question_keys: Sequence[str],
    judge: EngineSpec,
    judge_settings: dict,
) -> str:
    """A digest of everything that decides a prediction partition's rows except the method's name: the policy's
    engine, prompt template and rollout settings, the questions, and the judge. Under greedy decoding two methods
    with the same fingerprint write the same rows (embedded: react_base and react_reasoning are one model)."""
    payload = {
        "engine": dataclasses.asdict(spec),
        "template": template_id,
        "rollout": dataclasses.asdict(rollout),
        "questions": list(question_keys),
        "judge": dataclasses.asdict(judge),
        "judge_settings": judge_settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def relabel(table: pa.Table, method: str) -> pa.Table:
    """A predictions table with every row's ``method`` set to ``method`` (a partition reused for another method)."""
    return table.set_column(table.schema.get_field_index("method"), "method", pa.array([method] * table.num_rows))


def predict(
    questions: Sequence[EvalQuestion],
    *,
    method: str,
    benchmark: str,
    engine,
    search,
    template: PromptTemplate,
    config: RolloutConfig,
    load_judge: Callable[[], object],
    checkpoint: str | None = None,
    profile: str = "embedded",
    judge_prompt_id: str = DEFAULT_JUDGE_PROMPT,
    judge_max_tokens: int = JUDGE_MAX_TOKENS,
    judge_constrained: bool = True,
    embedded_judge: bool = False,
    on_done: Callable | None = None,
) -> tuple[pa.Table, dict]:
    """One graded prediction per question (every question in one batched rollout, then one judge call), as a
    :data:`PREDICTION_SCHEMA` table, and the run's summary (:func:`prediction_summary`).

    ``load_judge`` gives the judge engine after the rollout (the policy has the accelerator first);
    ``embedded_judge``: the judge is the embedded stand-in, which its model name in the summary says.
    """
    if not questions:
        raise ValueError(f"{method}/{benchmark}: no questions to evaluate")
    seed = config.seed or 0
    info = RunInfo(
        pool=template.mode,
        round="eval",
        shard=benchmark,
        profile=profile,
        engine=engine.name,
        model=engine.model_name,
        template=template,
        seed=seed,
        samples=1,
    )
    trajs, stats = synthesize(
        [q.as_task() for q in questions], engine=engine, search=search, info=info, config=config, on_done=on_done
    )
    trajs = trajs.to_pylist()
    judge_engine = load_judge()
    verdicts = judge(
        judge_engine,
        [JudgeItem(q.question, t["predicted_answer"], q.golden_answers) for q, t in zip(questions, trajs)],
        prompt_id=judge_prompt_id,
        max_new_tokens=judge_max_tokens,
        seed=seed,
        constrained=judge_constrained,
    )
    rows = []
    for q, t, v in zip(questions, trajs, verdicts):
        if t["question_id"] != q.key:
            raise RuntimeError(f"rollout returned {t['question_id']} where {q.key} was expected")
        rows.append(
            {
                "method": method,
                "benchmark": benchmark,
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
                "profile": profile,
            }
        )
    table = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    judge_model = str(getattr(judge_engine, "model_name", None) or getattr(judge_engine, "name", "unknown"))
    judge_model += f" ({EMBEDDED_JUDGE_NOTE})" if embedded_judge else ""
    return table, {
        **prediction_summary(table),
        "judge_model": judge_model,
        "method": method,
        "benchmark": benchmark,
        "engine": engine.name,
        "model": engine.model_name,
        "template_id": template.id,
        "checkpoint": checkpoint or "",
        "judge_prompt_id": judge_prompt_id,
        "judge_decoding": "constrained to one yes/no token" if judge_constrained else "free text",
        "max_actions": config.max_actions if config.tools else 0,
        "search_calls": stats["search_calls"],
        "rollout_seconds": round(stats["wall_seconds"], 2),
    }


def prediction_summary(table: pa.Table) -> dict:
    """The scores of a non-empty predictions table: EM, F1, judged accuracy, unparsable verdicts, actions, tokens."""
    rows = table.select(["em", "f1", "judge", "n_actions", "generated_tokens"]).to_pylist()
    n = len(rows)
    return {
        "accuracy_em": round(sum(r["em"] for r in rows) / n, 4),
        "mean_f1": round(sum(r["f1"] for r in rows) / n, 4),
        "accuracy_judge": round(sum(1 for r in rows if r["judge"] is True) / n, 4),
        "judge_unparsable": sum(1 for r in rows if r["judge"] is None),
        "mean_actions": round(sum(r["n_actions"] for r in rows) / n, 3),
        "generated_tokens": sum(r["generated_tokens"] for r in rows),
    }
