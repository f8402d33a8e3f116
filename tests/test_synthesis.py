"""Synthesis on the real embedded model with the real search engine, and the invariant checks
(every check must be able to fail: each is fed a broken row)."""

import copy

import pytest

from agent import validate
from agent.prompts import TEMPLATES
from agent.rollout import RolloutConfig, search_tool
from agent.synthesis import TRAJECTORY_SCHEMA, RunInfo, round_seed, shard_of, synthesize
from agent.transformers_engine import TransformersEngine
from retrieval.bm25 import BM25Index
from retrieval.engine import LocalSearchEngine

QUESTIONS = [
    {"id": "q1", "question": "Who founded the Marlow Clockworks?", "answer": "Edda Thorne", "answers": ["Edda Thorne"]},
    {"id": "q2", "question": "In which country is Valdren?", "answer": "Norsland", "answers": ["Norsland"]},
]
PASSAGES = [
    {"id": "p1", "contents": "Marlow Clockworks\nThe Marlow Clockworks was founded in 1871 by Edda Thorne."},
    {"id": "p2", "contents": "Valdren\nValdren is a town in Norsland."},
    {"id": "p3", "contents": "Kessit Bridge\nThe Kessit Bridge was completed in 1902."},
]


@pytest.fixture(scope="module")
def engine(embedded_checkpoint):
    return TransformersEngine(embedded_checkpoint, max_batch=8)


def _info(pool, engine, samples=2):
    return RunInfo(
        pool=pool,
        round="r000",
        shard="s00",
        profile="test",
        engine=engine.name,
        model="SmolLM2",
        template=TEMPLATES[f"{pool}-smollm2-fewshot-v1"],
        seed=7,
        samples=samples,
    )


def test_coa_synthesis_rows_are_token_exact_and_pass_the_structural_checks(engine):
    search = search_tool(LocalSearchEngine(index=BM25Index.build(PASSAGES, show_progress=False)), k=2)
    cfg = RolloutConfig(max_actions=2, max_context=900, max_turn_tokens=48, answer_tokens=12, seed=7)
    table, stats = synthesize(QUESTIONS, engine=engine, search=search, info=_info("coa", engine), config=cfg)
    assert table.schema == TRAJECTORY_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == 4 and sorted(r["trajectory_id"] for r in rows) == [
        "r000/coa/q1/0",
        "r000/coa/q1/1",
        "r000/coa/q2/0",
        "r000/coa/q2/1",
    ]
    for check in (
        validate.actions_over_budget,
        validate.actions_without_observation,
        validate.mask_misaligned,
        validate.duplicate_samples,
    ):
        assert check(rows)[1] == [], check.__name__
    tok = engine.tokenizer
    for r in rows:
        assert tok.decode(r["token_ids"][: r["prompt_tokens"]]) == r["prompt"]
        assert tok.decode(r["token_ids"][r["prompt_tokens"] :]) == r["text"]
        for s in r["spans"]:
            if s["kind"] == "observation" and not s["refused"]:
                assert s["text"] in tok.decode(r["token_ids"][s["start"] : s["end"]])
        assert r["search_calls"] == sum(1 for s in r["spans"] if s["kind"] == "observation" and s["passage_ids"])
        assert set(r["retrieved_passage_ids"]) <= {"p1", "p2", "p3"}
        assert r["generated_tokens"] == sum(r["policy_mask"]) > 0
        assert r["em"] in (0.0, 1.0) and 0.0 <= r["f1"] <= 1.0
    assert stats["generated_tokens"] == sum(r["generated_tokens"] for r in rows)

    # SFT-2/3 labels from these real trajectories: observations out of the stage-2 loss, in the stage-3 one
    from training.sft_data import IGNORE, stage23_rows

    for r, sft in zip(rows, stage23_rows(rows, max_length=4096)):
        ids, l2, l3 = sft["input_ids"], sft["labels_stage2"], sft["labels_stage3"]
        assert ids == r["token_ids"] and not sft["truncated"]
        assert all(x == IGNORE for x in l2[: r["prompt_tokens"]] + l3[: r["prompt_tokens"]])
        for i, m in enumerate(r["policy_mask"]):
            if m:
                assert l2[i] == ids[i]  # every policy token is trained on in stage 2
        for s in r["spans"]:
            if s["kind"] == "observation":
                assert set(l2[s["start"] : s["end"]]) == {IGNORE}
                assert l3[s["start"] : s["end"]] == ids[s["start"] : s["end"]]
        # environment tokens (observations, forced-answer prompts) = in the stage-3 loss only
        assert sft["env_tokens"] == len(ids) - r["prompt_tokens"] - sum(r["policy_mask"])
    short = stage23_rows(rows[:1], max_length=rows[0]["prompt_tokens"] + 3)[0]
    assert short["truncated"] and len(short["input_ids"]) == rows[0]["prompt_tokens"] + 3


def test_cot_synthesis_takes_no_action(engine):
    cfg = RolloutConfig(tools=False, max_context=900, max_turn_tokens=48, answer_tokens=12, seed=1)
    table, _ = synthesize(QUESTIONS[:1], engine=engine, search=None, info=_info("cot", engine, samples=1), config=cfg)
    (row,) = table.to_pylist()
    assert row["n_actions"] == 0 and row["search_calls"] == 0 and row["max_actions"] == 0
    assert row["template_id"] == "cot-smollm2-fewshot-v1" and row["pool"] == "cot"
    with pytest.raises(ValueError, match="CoT template"):
        synthesize(QUESTIONS[:1], engine=engine, search=None, info=_info("cot", engine), config=RolloutConfig())


def test_shards_and_round_seeds_are_stable():
    assert [shard_of(f"q{i}", 4) for i in range(6)] == [shard_of(f"q{i}", 4) for i in range(6)]
    assert len({shard_of(f"q{i}", 4) for i in range(200)}) == 4
    assert round_seed("r000") == round_seed("r000") != round_seed("w2026-47")


def _good_row():
    return {
        "trajectory_id": "r/coa/q/0",
        "round": "r",
        "question_id": "q",
        "sample": 0,
        "tags_balanced": True,
        "parse_issues": [],
        "n_actions": 1,
        "max_actions": 2,
        "prompt_tokens": 2,
        "generated_tokens": 4,
        "token_ids": [1, 2, 3, 4, 5, 6, 7, 8],
        "policy_mask": [0, 0, 1, 1, 0, 0, 1, 1],
        "spans": [
            {"kind": "action", "start": 2, "end": 4, "simulated": False, "refused": False},
            {"kind": "observation", "start": 4, "end": 6, "simulated": False, "refused": False},
        ],
        "predicted_answer": "x",
    }


@pytest.mark.parametrize(
    "check, breakage",
    [
        (validate.tags_unbalanced, lambda r: r.update(tags_balanced=False, parse_issues=["stray </end_search> at 3"])),
        (validate.actions_over_budget, lambda r: r.update(n_actions=3)),
        (validate.actions_without_observation, lambda r: r["spans"].pop()),
        (validate.actions_without_observation, lambda r: r["spans"][1].update(start=5)),
        (validate.mask_misaligned, lambda r: r["policy_mask"].pop()),
        (validate.mask_misaligned, lambda r: r["policy_mask"].__setitem__(4, 1)),  # observation marked as policy
        (validate.mask_misaligned, lambda r: r["policy_mask"].__setitem__(0, 1)),  # prompt marked as policy
        (validate.mask_misaligned, lambda r: r.update(generated_tokens=5)),
    ],
)
def test_each_check_fails_on_a_broken_row(check, breakage):
    good = _good_row()
    assert check([good])[1] == []
    bad = copy.deepcopy(good)
    breakage(bad)
    assert check([bad])[1], check.__name__


def test_duplicates_and_answer_rate():
    a, b = _good_row(), _good_row()
    assert validate.duplicate_samples([a, b])[1] == ["r/q/0: 2 rows"]
    b["sample"] = 1
    assert validate.duplicate_samples([a, b])[1] == []
    b["predicted_answer"] = " "
    assert validate.answer_rate([a, b]) == (2, 0.5)
