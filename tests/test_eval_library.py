"""The evaluation library behind the evaluation assets (no Dagster): which model, template and rollout settings
each Table 1 method is evaluated with, one graded prediction per question over scripted engines, the evaluation
questions of a benchmark, the fidelity run's bookkeeping, the report tables and the invariants the checks use."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pyarrow as pa
import pytest

from agent.engine_api import EngineSpec
from agent.rollout import RolloutConfig
from evals import report, tables, validate
from evals.datasets import EvalQuestion, questions_from_table, questions_table
from evals.fidelity import FIDELITY_METHODS, FIDELITY_SCHEMA, fidelity_run, probe_rows
from evals.predict import (
    BASELINES,
    CHECKPOINT_METHODS,
    EVAL_ROLLOUT,
    METHODS,
    PREDICTION_SCHEMA,
    checkpoint_template,
    eval_rollout,
    policy,
    policy_model,
    policy_spec,
    predict,
)
from evals.questions import EMBEDDED, benchmark_questions
from tests.test_evals import ReActPolicy, ScriptedJudge


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"root_model": "/models/SmolLM2-135M-Instruct"}))
    return str(tmp_path)


# -- which policy each method evaluates ---------------------------------------------------------------------
def test_policy_table_for_every_method(checkpoint):
    rollout = eval_rollout(seed=3)
    want = {
        "base_cot": ("reasoning", "cot-smollm2-fewshot-v1"),
        "react_base": ("base", "react-smollm2-fewshot-v1"),
        "react_reasoning": ("reasoning", "react-smollm2-fewshot-v1"),
        **{m: ("checkpoint", "coa-smollm2-v1") for m in CHECKPOINT_METHODS},
    }
    assert list(want) == list(METHODS) and set(FIDELITY_METHODS) <= set(CHECKPOINT_METHODS)
    for method, (model, template_id) in want.items():
        template, cfg = policy(method, "SmolLM2-135M-Instruct", checkpoint, rollout, cot_max_tokens=40)
        assert (policy_model(method), template.id) == (model, template_id), method
        if method == "base_cot":  # no tool: an opened action ends the reasoning, the answer is forced
            assert cfg == dataclasses.replace(rollout, tools=False, cut_actions=True, max_turn_tokens=40)
        elif method in BASELINES:  # ReAct always searches the real environment
            assert cfg == dataclasses.replace(rollout, tools=True, simulated=False)
        else:  # a checkpoint runs the configured settings unchanged
            assert cfg == rollout
    # an R1-distilled reasoning model and a pretrained base model get their own forms
    assert policy("react_reasoning", "DeepSeek-R1-Distill-Qwen-7B", None, rollout)[0].id == "react-r1-v1"
    assert policy("react_base", "Qwen2.5-7B", None, rollout)[0].id == "react-base-v1"
    assert policy("base_cot", "DeepSeek-R1-Distill-Qwen-7B", None, rollout)[0].id == "cot-r1-v1"


def test_policy_spec_and_errors(checkpoint):
    reasoning, base = EngineSpec(model="r1", max_model_len=4096), EngineSpec(model="instruct")
    assert policy_spec("react_base", reasoning, base, None) == base
    assert policy_spec("base_cot", reasoning, base, None) == policy_spec("react_reasoning", reasoning, base, None)
    assert policy_spec("sft_stage3", reasoning, base, checkpoint) == dataclasses.replace(reasoning, model=checkpoint)
    with pytest.raises(ValueError, match="unknown method 'sft_stage9'"):
        policy_model("sft_stage9")
    with pytest.raises(ValueError, match="sft_stage1 evaluates a checkpoint: none given"):
        policy("sft_stage1", "SmolLM2-135M-Instruct", None, eval_rollout())
    with pytest.raises(ValueError, match="none given"):
        policy_spec("sft_stage1", reasoning, base, None)


def test_checkpoint_template_is_the_zero_shot_agent_prompt(tmp_path):
    """Trained checkpoints are evaluated with the plain agent instruction, no worked examples (issue: the method
    demonstrated on CPU); what RL recorded (it may have been guided by examples) does not change that."""
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"root_model": "/models/SmolLM2-135M-Instruct", "template": "coa-smollm2-fewshot-v1"}))
    t = checkpoint_template(str(tmp_path))
    assert t.id == "coa-smollm2-v1" and not t.shots
    meta.write_text(json.dumps({"root_model": "/models/SmolLM2-135M-Instruct"}))
    assert checkpoint_template(str(tmp_path)).id == "coa-smollm2-v1"
    meta.write_text(
        json.dumps({"root_model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "template": "coa-r1-fewshot-v1"})
    )
    assert checkpoint_template(str(tmp_path)).id == "coa-r1-v1"
    meta.unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json not found: a checkpoint directory must hold meta\.json"):
        checkpoint_template(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        policy("sft_stage3", "SmolLM2-135M-Instruct", str(tmp_path), eval_rollout())


def test_the_asset_and_the_benchmark_share_the_evaluation_defaults():
    from assets.evaluation import EvalPredictionsConfig, EvalRollout

    assert EvalRollout().build(seed=0) == eval_rollout(seed=0) == RolloutConfig(**EVAL_ROLLOUT, seed=0)
    assert EvalPredictionsConfig().rollout.build(seed=0) == eval_rollout(seed=0)


# -- one graded prediction per question --------------------------------------------------------------------
def test_predict_rows_and_summary_over_scripted_engines():
    question = "Who founded Alpha?"
    engine = ReActPolicy(question)
    engine.model_name = "DeepSeek-R1-Distill-Qwen-7B"
    judge_engine = ScriptedJudge(["yes"])
    template, cfg = policy(
        "react_reasoning", engine.model_name, None, dataclasses.replace(eval_rollout(), max_context=100_000)
    )
    searched = []

    def search(queries):
        searched.extend(queries)
        return [(f'result 1: "Alpha"\nAlpha was founded by Beta ({q}).', ["p1"]) for q in queries]

    q = EvalQuestion(EMBEDDED, "q1", question, ("Beta",), "test")
    table, summary = predict(
        [q],
        method="react_reasoning",
        benchmark=EMBEDDED,
        engine=engine,
        search=search,
        template=template,
        config=cfg,
        load_judge=lambda: judge_engine,
        judge_constrained=False,
        embedded_judge=True,
    )
    assert table.schema == PREDICTION_SCHEMA and searched == ["Alpha founder"]
    [row] = table.to_pylist()
    assert (row["method"], row["benchmark"], row["question_id"], row["prediction"]) == (
        "react_reasoning",
        EMBEDDED,
        "q1",
        "Beta",
    )
    assert row["em"] == 1.0 and row["judge"] is True and row["n_actions"] == 1 and row["template_id"] == "react-r1-v1"
    assert row["judge_model"] == "scripted-judge" and row["checkpoint"] is None and row["profile"] == "embedded"
    assert summary["accuracy_em"] == 1.0 and summary["accuracy_judge"] == 1.0 and summary["search_calls"] == 1
    assert summary["judge_model"].startswith("scripted-judge (the embedded model judges")
    assert summary["judge_decoding"] == "free text" and summary["max_actions"] == cfg.max_actions
    assert len(judge_engine.calls) == 1  # the judge is loaded after the rollout and asked once
    with pytest.raises(ValueError, match="no questions"):
        predict(
            [],
            method="react_reasoning",
            benchmark=EMBEDDED,
            engine=engine,
            search=search,
            template=template,
            config=cfg,
            load_judge=lambda: judge_engine,
        )


# -- evaluation questions ----------------------------------------------------------------------------------
def test_benchmark_questions_hold_out_the_training_sample_and_reconcile(tmp_path):
    world = pa.table(
        {
            "id": [f"w{i}" for i in range(8)],
            "question": [f"Question number {i}?" for i in range(8)],
            "answer": ["a"] * 8,
            "split": ["train", "train", "dev", "dev", "dev", "dev", "dev", "test"],
        }
    )
    # w0 by id, w2 by text (another id): both training questions; w1 and w7 are in other splits
    sample = pa.table({"id": ["w0", "x9"], "question": ["Question number 0?", "question number 2?"]})
    sel = benchmark_questions(EMBEDDED, world, sample, splits=["dev"], autocoa_file=tmp_path / "absent", n=2)
    c = sel.counts
    assert c["rows_in"] == 8 and c["excluded_training"] == 2 and c["excluded_split"] == 2
    assert c["sampled"] == 2 and c["not_sampled"] == 2 and c["rows_rejected"] == 0 and sel.source == "embedded_world"
    assert c["rows_in"] == c["sampled"] + c["not_sampled"] + c["rows_rejected"] + 2 + 2
    assert {q.question_id for q in sel.sampled} <= {"w3", "w4", "w5", "w6"} and sel.missing is None
    assert questions_from_table(questions_table(sel.sampled)) == sel.sampled
    absent = benchmark_questions("nq", world, sample, splits=["dev"], autocoa_file=tmp_path / "absent", n=2)
    assert absent.sampled == [] and absent.counts["rows_in"] == 0 and "absent not found" in absent.missing


# -- world-model fidelity ----------------------------------------------------------------------------------
def test_fidelity_run_bookkeeping_without_checkpoints():
    q = EvalQuestion(EMBEDDED, "q1", "Who founded Alpha?", ("Beta",), "test")
    run = fidelity_run(
        dict.fromkeys(FIDELITY_METHODS),
        [q],
        load_policy=lambda path: pytest.fail("no checkpoint to load"),
        search=lambda queries: pytest.fail("nothing to search"),
        config=RolloutConfig(simulated=True),
    )
    assert run.rows == [] and run.runs == [] and run.missing == [f"{m}_checkpoint" for m in FIDELITY_METHODS]
    with pytest.raises(ValueError, match="simulated"):
        fidelity_run({}, [q], load_policy=None, search=None, config=RolloutConfig())
    rows = probe_rows("sft_stage3", "/ckpt", [q], ["Alpha was founded by Beta."], lambda qs: [("Beta founded it.", [])])
    assert pa.Table.from_pylist(rows, schema=FIDELITY_SCHEMA).num_rows == 1
    assert rows[0]["query"] == q.question and rows[0]["prediction"] is None and not rows[0]["hallucination"]
    assert validate.fidelity_consistent(rows) == (1, [])


# -- report tables and invariants --------------------------------------------------------------------------
def _predictions() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"method": m, "benchmark": EMBEDDED, "question_id": q, "em": float(i % 2), "judge": bool(i % 2)}
            | {"judge_model": "SmolLM2-135M-Instruct", "n_actions": i}
            for m in ("sft_stage1", "react_reasoning", "base_cot")
            for i, q in enumerate("abc")
        ]
    )


def test_report_tables_order_methods_and_say_who_judged():
    df = _predictions()
    assert tables.method_order(["zzz", "sft_stage1", "base_cot"]) == ["base_cot", "sft_stage1", "zzz"]
    t1 = tables.table1(df)
    assert t1.methods == ["base_cot", "react_reasoning", "sft_stage1"] and t1.complete == t1.methods
    assert t1.n_benchmarks == 1 and t1.averages()["EM"] == pytest.approx([100 / 3] * 3)
    md = t1.markdown(report.paper_table1(report.TABLE1_METRICS))
    assert "judged by SmolLM2-135M-Instruct (the embedded model judges (a stand-in" in md["table1"]
    assert (
        "| paper: R1-Distill-Qwen-7B (ReAct) |" in md["ours_vs_paper"] and "The paper's Table 1" in md["paper_table1"]
    )
    comparisons = tables.comparisons(df, resamples=100, seed=0, confidence=0.95)
    assert comparisons.summary()["em_comparisons"] == comparisons.compared
    analysis = tables.figure3(df, correct="em", cap=5)
    assert list(dict.fromkeys(analysis["method"])) == ["base_cot", "react_reasoning", "sft_stage1"]
    assert tables.figure3_table(analysis, "em").column("correct_by").to_pylist() == ["em"] * len(analysis)
    assert tables.figure3_panel(analysis, "success_rate")[0]["5+"] == "—"
    with pytest.raises(ValueError, match="'correct' must be"):
        tables.figure3(df, correct="f1", cap=5)
    rows = df.to_dict("records")
    assert validate.table1_recomputes(t1.t1, rows) == (6, [])
    assert validate.comparisons_match_table1(comparisons.power.to_dict("records"), t1.t1)[1] == []
    assert validate.action_counts_match(analysis.assign(correct_by="em"), rows) == (9, [])
    assert validate.shares_sum_to_one(analysis)[1] == []


def test_validate_finds_stale_and_unreconciled_partitions():
    preds = {"embedded|sft_stage1": pa.table({"question_id": ["a", "a"]}), "embedded|base_cot": pa.table({"x": []})}
    checked, problems = validate.predictions_match_questions(preds, {EMBEDDED: ["a", "b"]})
    assert checked == 2 and problems == [
        "embedded|sft_stage1: 2 rows (1 distinct) for 2 questions; missing ['b'], extra []"
    ]
    meta = {"rows_in": 10, "not_sampled": 5, "excluded_training": 2, "excluded_split": 0, "sampled": 2}
    assert validate.counts_reconcile(EMBEDDED, 2, meta, 1) == []
    assert validate.counts_reconcile(EMBEDDED, 2, {**meta, "rows_in": 11}, 1)[0].startswith("embedded: rows_in 11")
    assert validate.counts_reconcile(EMBEDDED, 0, {}, 0) != []  # no metadata: cannot reconcile
    parts = {EMBEDDED: pa.table({"question_id": ["a", "a"], "benchmark": [EMBEDDED, "nq"]})}
    assert validate.question_ids_unique(parts) == (2, ["embedded: a appears 2 times", "embedded: row of benchmark nq"])
    assert validate.judge_parsable_rate([{"judge": None, "judge_raw": "hmm"}, {"judge": True, "judge_raw": "yes"}]) == (
        2,
        0.5,
    )


def test_policy_fingerprint_names_everything_that_decides_the_rows():
    import dataclasses

    from agent.engine_api import EngineSpec
    from evals.predict import eval_rollout, policy_fingerprint, relabel

    spec, judge = EngineSpec(kind="transformers"), EngineSpec()
    base = policy_fingerprint(spec, "react-v1", eval_rollout(), ["q1", "q2"], judge, {"prompt": "p"})
    assert base == policy_fingerprint(spec, "react-v1", eval_rollout(), ["q1", "q2"], judge, {"prompt": "p"})
    changed = [
        policy_fingerprint(
            dataclasses.replace(spec, model="ckpt"), "react-v1", eval_rollout(), ["q1", "q2"], judge, {"prompt": "p"}
        ),
        policy_fingerprint(spec, "cot-v1", eval_rollout(), ["q1", "q2"], judge, {"prompt": "p"}),
        policy_fingerprint(
            spec, "react-v1", dataclasses.replace(eval_rollout(), max_actions=1), ["q1", "q2"], judge, {"prompt": "p"}
        ),
        policy_fingerprint(spec, "react-v1", eval_rollout(), ["q1"], judge, {"prompt": "p"}),
        policy_fingerprint(
            spec, "react-v1", eval_rollout(), ["q1", "q2"], dataclasses.replace(judge, model="x"), {"prompt": "p"}
        ),
        policy_fingerprint(spec, "react-v1", eval_rollout(), ["q1", "q2"], judge, {"prompt": "other"}),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    import pyarrow as pa

    t = relabel(pa.table({"method": ["a", "a"], "em": [1.0, 0.0]}), "b")
    assert t.column("method").to_pylist() == ["b", "b"] and t.column("em").to_pylist() == [1.0, 0.0]
