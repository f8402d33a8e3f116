"""Evaluation library: benchmark loaders and their quarantine, the LLM judge over a scripted engine,
Table 1 / Figure 3 builders, world-model fidelity metrics on hand-checked cases, the ReAct prompt."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.engine_api import GenResult, cut_at_stop
from agent.protocol import parse
from agent.rollout import Rollout, RolloutConfig, Span, Trajectory, render_observation
from evals import datasets as bm
from evals.fidelity import (
    aggregate_fidelity,
    compare_observation,
    contains_answer,
    lcs_length,
    probe_simulated_results,
    probe_suffix,
    rouge_l,
    simulated_observations,
    token_f1,
)
from evals.judge import JUDGE_PROMPTS, JudgeItem, judge, parse_verdict
from evals.react import REACT_TEMPLATES, react_rollout_config, react_template_for
from evals.report import (
    AVG,
    TABLE1_METHODS,
    action_analysis,
    average_mismatches,
    evaluation_report,
    ours_vs_paper_markdown,
    paper_table1,
    plot_action_analysis,
    plot_intervals,
    power_markdown,
    recompute_averages,
    table1,
    table1_markdown,
    table1_power,
)
from evals.stats import wilson_interval
from qadata.schema import SourceError
from tests.conftest import write_jsonl

SHARED_DATA = Path(__file__).parents[1].parent / "shared/data"
AUTOCOA_TEST = SHARED_DATA / "autocoa" / "test.parquet"


class CharTokenizer:
    """One token per character (id = code point, 0 = EOS) and a trivial chat template."""

    chat_template = "fake"
    eos_token_id = 0
    all_special_ids = [0]

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i != 0)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


# -- fidelity metrics, hand-checked -------------------------------------------------------------------
def test_token_f1_hand_checked():
    # 'the cat sat on the mat' -> cat sat on mat (4); 'a cat sat' -> cat sat (2): P=2/4, R=1, F=2/3
    assert token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert token_f1("Paris", "paris!") == 1.0
    assert token_f1("yes it is", "no it is") == pytest.approx(2 / 3)  # no yes/no zeroing for passages
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("a b", "c d") == 0.0


def test_lcs_and_rouge_l_hand_checked():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook case
    # Lin (2004): reference 'police killed the gunman' (articles dropped -> 3 tokens)
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(1 / 3)
    assert rouge_l("the gunman police killed", "police killed the gunman") == pytest.approx(2 / 3)
    # P = 3/4 (candidate longer), R = 3/3 -> F = 6/7
    assert rouge_l("police really killed gunman", "police killed gunman") == pytest.approx(6 / 7)
    assert rouge_l("same words here", "Same words, here.") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


@pytest.mark.parametrize(
    "text,answers,want",
    [
        ("He was born in Paris, France.", ["paris"], True),
        ("He lives in the north.", ["no"], False),  # yes/no are never 'contained'
        ("Built in the 1990s.", ["1990"], False),  # whole tokens only
        ("Built in 1990.", ["1990"], True),
        ("The Beatles formed in Liverpool", ["Beatles"], True),
        ("anything", [None, ""], False),
    ],
)
def test_contains_answer(text, answers, want):
    assert contains_answer(text, answers) is want


def test_hallucination_definition():
    real = 'result 1: "Mirela Osk"\nMirela Osk was a painter born in Tarnow.'
    # the world model states the gold answer that the real result does not give: hallucination
    f = compare_observation("Mirela Osk was born in Vellby.", real, ["Vellby"], prediction="Vellby")
    assert f.sim_has_gold and not f.real_has_gold and f.unsupported_gold and f.hallucination
    # it states the policy's (wrong) final answer, absent from the real result: hallucination
    f = compare_observation("Born in Ostrava.", real, ["Vellby"], prediction="Ostrava")
    assert not f.sim_has_gold and f.unsupported_prediction and f.hallucination
    # both state the answer: supported, not a hallucination
    f = compare_observation("Mirela Osk was born in Tarnow.", real, ["Tarnow"], prediction="Tarnow")
    assert f.sim_has_gold and f.real_has_gold and not f.hallucination
    # neither states an answer; no prediction: not a hallucination
    f = compare_observation("Mirela Osk was a painter.", real, ["Vellby"], prediction=None)
    assert not f.hallucination and f.token_f1 > 0 and 0 < f.rouge_l < 1
    assert set(f.as_row()) >= {"token_f1", "rouge_l", "hallucination"}


def test_aggregate_fidelity_per_checkpoint():
    rows = [
        {"checkpoint": "rl1", **compare_observation("born in Vellby", "born in Tarnow", ["Vellby"]).as_row()},
        {"checkpoint": "rl1", **compare_observation("born in Tarnow", "born in Tarnow", ["Tarnow"]).as_row()},
        {"checkpoint": "sft", **compare_observation("x", "y", ["z"]).as_row()},
    ]
    agg = aggregate_fidelity(rows).set_index("checkpoint")
    assert agg.loc["rl1", "n_queries"] == 2 and agg.loc["rl1", "hallucination"] == 0.5
    assert agg.loc["rl1", "token_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert agg.loc["sft", "token_f1"] == 0.0
    assert list(aggregate_fidelity([]).columns)[:2] == ["checkpoint", "n_queries"]


def test_simulated_observations_pairs_actions_with_their_results():
    t = Trajectory(
        "t",
        0,
        [],
        [],
        spans=[
            Span("action", 0, 1, text="q1"),
            Span("observation", 1, 2, True, "sim 1"),
            Span("action", 2, 3, text="q2", refused=True),
            Span("observation", 3, 4, text="limit"),
        ],
    )
    assert simulated_observations(t) == [("q1", "sim 1")]


class RecordingPolicy:
    """Answers each request from a script (by call order) and records what it was asked."""

    name = "recording"

    def __init__(self, replies):
        self.tokenizer, self.replies, self.requests = CharTokenizer(), list(replies), []

    def generate(self, requests):
        self.requests += list(requests)
        out = []
        for r in requests:
            text = self.replies.pop(0)
            hit = next((s for s in r.stop if s in text), None)
            out.append(GenResult(self.tokenizer.encode(text), text, "stop" if hit else "length", hit))
        return out


def test_probe_continues_exactly_where_a_simulated_rollout_would():
    prompt = CharTokenizer().encode("<|user|>Who founded Alpha?<|end|><|assistant|><think>")
    query = "Alpha founder"
    # on-policy: the policy opens the search itself; the rollout then asks it for the result block
    policy = RecordingPolicy(
        [
            f" <begin_search> {query} </end_search>",
            "Alpha was founded by Mara.</search_result>",
            "</think> \\boxed{Mara}",
        ]
    )
    Rollout(policy, None, RolloutConfig(max_actions=1, max_context=4000, temperature=0.0, simulated=True, seed=0)).run(
        [("t", list(prompt))]
    )
    on_policy_context = policy.requests[1].prompt_ids
    # the probe writes the same action into the context and asks for the same block
    probe = RecordingPolicy(["Alpha was founded by Mara.</search_result>", "cut off"])
    sims = probe_simulated_results(probe, [prompt, prompt], [query, "other"], max_tokens=7)
    assert probe.requests[0].prompt_ids == on_policy_context
    assert CharTokenizer().decode(probe.requests[1].prompt_ids).endswith(probe_suffix("other"))
    assert all(r.stop == ("</search_result>",) and r.max_new_tokens == 7 for r in probe.requests)
    assert sims == ["Alpha was founded by Mara.", "cut off"]
    with pytest.raises(ValueError, match="2 prompts for 1 queries"):
        probe_simulated_results(probe, [prompt, prompt], ["q"])


# -- loaders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,want",
    [
        ("NQ_dev.json", "nq"),
        ("TriviaQA_dev.json", "triviaqa"),
        ("HotpotQA_dev.json", "hotpotqa"),
        ("2WIKI_dev.json", "2wikimultihopqa"),
        ("MuSiQue_dev.json", "musique"),
        ("Bamboogle_dev.json", "bamboogle"),
        ("Fanout_dev.json", "fanout"),
        ("data/2wikimultihopqa/dev.jsonl", None),
        ("2wikimultihopqa", "2wikimultihopqa"),
        ("mystery_dev.json", None),
    ],
)
def test_benchmark_name(name, want):
    assert bm.benchmark_name(name) == want


@pytest.mark.skipif(not AUTOCOA_TEST.is_file(), reason=f"{AUTOCOA_TEST} not present (fresh clone)")
def test_autocoa_parquet_real_file():
    res = bm.load_autocoa_parquet(AUTOCOA_TEST)
    assert res.rows_in == pq.ParquetFile(AUTOCOA_TEST).metadata.num_rows == 2936 and res.reconciles
    assert res.counts() == {
        "nq": 500,
        "triviaqa": 500,
        "hotpotqa": 500,
        "2wikimultihopqa": 500,
        "musique": 500,
        "bamboogle": 125,
        "fanout": 310,
    }
    # the file's last row repeats TriviaQA dev_2063: quarantined with a reason, not dropped
    [dup] = res.rejected
    assert dup.benchmark == "triviaqa" and dup.source_row == 2935 and "duplicate id 'dev_2063'" in dup.reason
    by_key = {q.key: q for q in res.questions}
    assert (
        by_key["2wikimultihopqa/dev_3872"].question
        == "Are Rovin' Tumbleweeds and Forbidden Love (1938 Film) from the same country?"
    )
    assert by_key["2wikimultihopqa/dev_3872"].golden_answers == ("no",)
    # a question holding U+0085 (which str.splitlines treats as a line break) is read whole
    assert by_key["triviaqa/dev_6017"].question.startswith("Complete the name of the cigarette company")
    assert all(q.question and q.golden_answers and "question below" not in q.question for q in res.questions)
    assert bm.questions_table(res.questions).num_rows == 2935
    assert bm.rejected_table(res.rejected).num_rows == 1


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present (fresh clone)")
def test_hotpotqa_shared_sample_and_no_train_test_leakage():
    dev = bm.load_hotpotqa(SHARED_DATA / "hotpotqa" / "distractor_dev_sample.jsonl")
    assert len(dev.questions) == 300 and not dev.rejected and dev.reconciles
    assert {q.benchmark for q in dev.questions} == {"hotpotqa"}
    train = bm.load_hotpotqa(SHARED_DATA / "autocoa" / "hotpotqa_train.parquet")
    test = bm.load_autocoa_parquet(AUTOCOA_TEST)
    assert bm.find_leakage(test.questions, [q.question for q in train.questions]) == {}


def test_flashrag_jsonl_malformed_rows(tmp_path):
    folder = tmp_path / "bamboogle"
    folder.mkdir()
    path = write_jsonl(
        folder / "test.jsonl",
        [
            {"id": "a", "question": "Who wrote  Hamlet?", "golden_answers": ["Shakespeare", "William Shakespeare"]},
            {"id": "b", "golden_answers": ["x"]},  # missing question
            {"id": "c", "question": "Q?", "golden_answers": []},  # empty golden answers
            b"{not json\n",  # bad json line
            b"\n",  # blank: not a row
            {"id": "d", "question": "Q2?", "golden_answers": "single"},  # a string is one answer
            ["a", "list"],  # not an object
            {"id": "a", "question": "Again?", "golden_answers": ["y"]},  # duplicate id
            {"id": "e", "question": "   ", "golden_answers": ["y"]},  # empty question
            {"question": "No id?", "golden_answers": ["y"]},  # missing id
        ],
    )
    res = bm.load_flashrag_jsonl(path)
    assert res.rows_in == 9 and res.reconciles
    assert [(q.question_id, q.question, q.golden_answers) for q in res.questions] == [
        ("a", "Who wrote Hamlet?", ("Shakespeare", "William Shakespeare")),
        ("d", "Q2?", ("single",)),
    ]
    assert all(q.benchmark == "bamboogle" for q in res.questions)  # from FlashRAG's folder name
    reasons = [r.reason for r in res.rejected]
    assert reasons == [
        "line 2: missing field 'question'",
        "line 3: empty golden_answers",
        "line 4: malformed JSON (Expecting property name enclosed in double quotes)",
        "line 7: row is list, expected an object",
        f"duplicate id 'a' (first loaded from {path} row 1)",
        "line 9: empty question",
        "line 10: missing field 'id'",
    ]
    assert all(r.benchmark == "bamboogle" and r.raw for r in res.rejected)
    with pytest.raises(SourceError, match="file not found"):
        bm.load_flashrag_jsonl(tmp_path / "nope.jsonl")


def _autocoa_row(qid, source_file, question="Who?", truth=("A",), prompt=True):
    content = f"Instructions...\n\nNow, please answer the user's question below: \n{question}\n\n"
    return {
        "id": qid,
        "source_file": source_file,
        "data_source": "HotpotQA",
        "prompt": [{"content": content, "role": "user"}] if prompt else [],
        "ability": "QA",
        "reward_model": {"ground_truth": list(truth), "style": "rule"},
        "extra_info": {"index": 0, "split": "test"},
    }


def test_autocoa_parquet_malformed_rows(tmp_path):
    rows = [
        _autocoa_row("1", "NQ_dev.json", "who sang it"),
        _autocoa_row("2", "Mystery_dev.json"),
        _autocoa_row("3", "MuSiQue_dev.json", prompt=False),
        _autocoa_row("4", "Bamboogle_dev.json", truth=()),
        _autocoa_row("5", "Bamboogle_dev.json", truth=(" ", "B ")),
        _autocoa_row("1", "HotpotQA_dev.json"),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    res = bm.load_autocoa_parquet(tmp_path / "test.parquet")
    assert res.rows_in == 6 and res.reconciles
    assert [(q.key, q.golden_answers) for q in res.questions] == [
        ("nq/1", ("A",)),
        ("bamboogle/5", ("B",)),
        ("hotpotqa/1", ("A",)),
    ]  # same id, other benchmark: kept
    assert [(r.benchmark, r.reason.split(" (")[0]) for r in res.rejected] == [
        ("unknown", "row 1: unknown benchmark source_file 'Mystery_dev.json'"),
        ("musique", "row 2: missing field 'prompt[0].content'"),
        ("bamboogle", "row 3: empty reward_model.ground_truth"),
    ]
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "other.parquet")
    with pytest.raises(SourceError, match="missing columns"):
        bm.load_autocoa_parquet(tmp_path / "other.parquet")


def test_hotpotqa_loader_quarantines_bad_rows(tmp_path, hotpot_row):
    bad = dict(hotpot_row, id="q2", answer="")
    path = write_jsonl(tmp_path / "dev.jsonl", [hotpot_row, bad, b"oops\n"])
    res = bm.load_hotpotqa(path)
    assert res.rows_in == 3 and res.reconciles and [q.key for q in res.questions] == ["hotpotqa/q1"]
    assert [r.reason for r in res.rejected] == ["row 2: empty answer", "line 3: malformed JSON (Expecting value)"]


def test_records_loader_for_the_embedded_world():
    world = [
        {"id": "emb-1", "question": "Where was Alpha born?", "answer": "Beta", "split": "dev"},
        {"id": "emb-2", "question": "Q?", "answers": ["C", "c2"]},
        {"id": "emb-3", "question": "No answer?"},
    ]
    res = bm.load_records(world, benchmark="embedded", source="world")
    assert [(q.question_id, q.golden_answers) for q in res.questions] == [("emb-1", ("Beta",)), ("emb-2", ("C", "c2"))]
    assert res.rejected[0].reason == "row 2: missing field 'golden_answers'" and res.reconciles
    assert res.questions[0].as_task() == {
        "id": "embedded/emb-1",
        "question": "Where was Alpha born?",
        "answer": "Beta",
        "answers": ["Beta"],
    }


def test_load_results_merge_and_quarantine_cross_file_duplicates():
    a = bm.load_records([{"id": "1", "question": "Q?", "answer": "A"}], benchmark="nq", source="a")
    b = bm.load_records(
        [{"id": "1", "question": "Q again?", "answer": "A"}, {"id": "2", "question": "R?", "answer": "B"}],
        benchmark="nq",
        source="b",
    )
    merged = a.extend(b)
    assert [q.question_id for q in merged.questions] == ["1", "2"] and merged.rows_in == 3 and merged.reconciles
    assert merged.rejected[0].reason == "duplicate id '1' (first loaded from records:a row 0)"


def _questions(bench, n):
    return [bm.EvalQuestion(bench, f"{bench}-{i:03d}", f"question {i}", ("a",), "mem") for i in range(n)]


def test_sample_per_benchmark_is_seeded_nested_and_order_free():
    qs = _questions("nq", 50) + _questions("bamboogle", 8)
    s1 = bm.sample_per_benchmark(qs, 10, seed=3)
    assert s1 == bm.sample_per_benchmark(list(reversed(qs)), 10, seed=3)
    assert [q.benchmark for q in s1].count("nq") == 10 and [q.benchmark for q in s1].count("bamboogle") == 8
    assert bm.sample_per_benchmark(qs, 10, seed=4) != s1
    small = [q for q in bm.sample_per_benchmark(qs, 5, seed=3) if q.benchmark == "nq"]
    assert small == [q for q in s1 if q.benchmark == "nq"][:5]  # nested
    only = bm.sample_per_benchmark(qs, {"bamboogle": 2}, seed=3)
    assert [q.benchmark for q in only] == ["bamboogle", "bamboogle"]
    assert len(bm.sample_per_benchmark(qs, None)) == 58
    # adding a benchmark does not change another benchmark's sample
    more = bm.sample_per_benchmark(qs + _questions("musique", 20), 10, seed=3)
    assert [q for q in more if q.benchmark == "nq"] == [q for q in s1 if q.benchmark == "nq"]


def test_find_leakage():
    qs = [
        bm.EvalQuestion("nq", "1", "Who wrote Hamlet?", ("x",), "m"),
        bm.EvalQuestion("nq", "2", "Where is Rome?", ("x",), "m"),
        bm.EvalQuestion("hotpotqa", "5a8", "Unrelated?", ("x",), "m"),
    ]
    leaks = bm.find_leakage(qs, ["who  wrote HAMLET", "something else"], training_ids=["5a8"])
    assert leaks == {("nq", "1"): "question text appears in training", ("hotpotqa", "5a8"): "id appears in training"}
    assert bm.find_leakage(qs, []) == {}


# -- Table 1 and Figure 3 ------------------------------------------------------------------------------
def _pred(method, benchmark, qid, em, judge, n_actions, f1=None):
    return {
        "method": method,
        "benchmark": benchmark,
        "question_id": qid,
        "em": em,
        "f1": em if f1 is None else f1,
        "cover_em": em,
        "judge": judge,
        "n_actions": n_actions,
    }


def _predictions():
    return [
        # react: nq 1/2 EM, judge 1/2; bamboogle 0/1 EM, judge None (unparsable -> counts 0)
        _pred("react", "nq", "1", 1.0, True, 1),
        _pred("react", "nq", "2", 0.0, False, 0, f1=0.5),
        _pred("react", "bamboogle", "1", 0.0, None, 7),
        # autocoa: nq 2/2, bamboogle 1/1 EM; judge all True
        _pred("autocoa", "nq", "1", 1.0, True, 2),
        _pred("autocoa", "nq", "2", 1.0, True, 2),
        _pred("autocoa", "bamboogle", "1", 1.0, True, 2),
    ]


def test_table1_values_and_averages_recompute():
    rows = _predictions()
    t = table1(rows)
    assert list(t.index) == ["react", "autocoa"]
    assert [b for b, _ in t.columns][::2] == ["nq", "bamboogle", AVG]  # table order, avg last
    assert t.loc["react", ("nq", "em")] == 50.0 and t.loc["react", ("bamboogle", "judge")] == 0.0
    assert t.loc["react", (AVG, "em")] == 25.0 and t.loc["react", (AVG, "judge")] == 25.0  # macro average
    assert t.loc["autocoa", (AVG, "em")] == 100.0
    assert recompute_averages(rows) == {
        ("react", "em"): 25.0,
        ("react", "judge"): 25.0,
        ("autocoa", "em"): 100.0,
        ("autocoa", "judge"): 100.0,
    }
    assert average_mismatches(t, rows) == []
    t.loc["react", (AVG, "em")] = 30.0
    assert average_mismatches(t, rows) == ["react avg em: table 30.0000 != recomputed 25.0000"]
    # a method missing a benchmark has no average (averages compare like with like)
    partial = table1([r for r in rows if not (r["method"] == "react" and r["benchmark"] == "bamboogle")])
    assert math.isnan(partial.loc["react", (AVG, "em")])
    assert (
        average_mismatches(partial, [r for r in rows if not (r["method"] == "react" and r["benchmark"] == "bamboogle")])
        == []
    )


def test_table1_markdown_and_paper_comparison():
    t = table1(_predictions(), metrics=("em", "judge", "f1"))
    md = table1_markdown(t, caption="Table 1 (ours)")
    assert md.startswith("Table 1 (ours)\n\n| Method | NQ EM | NQ LLM | NQ F1 | Bamboogle EM |")
    assert "| react | 50.0 | 50.0 | 75.0 | 0.0 | 0.0 | 0.0 | 25.0 | 25.0 | 37.5 |" in md
    empty = paper_table1(("em", "judge", "f1"), methods=None).iloc[0:0]  # no paper rows: ours alone, and says so
    empty.attrs.update(path="paper.csv")
    cmp = ours_vs_paper_markdown(t, empty)
    assert "| ours: react |" in cmp and "not filled in yet" in cmp and "paper:" not in cmp
    fake = empty.copy()
    fake.loc["ReAct (fake, test only)", ("nq", "em")] = 40.0
    cmp = ours_vs_paper_markdown(t, fake, method_map={"react": "ReAct (fake, test only)"})
    assert "| paper: ReAct (fake, test only) | 40.0 | — |" in cmp and "| Δ (ours − paper) | 10.0 | — |" in cmp


def test_table1_markdown_shows_intervals():
    rows = _predictions()
    md = table1_markdown(table1(rows), intervals=table1_power(rows, methods=["react", "autocoa"], paired=False))
    lo, hi = (100 * v for v in wilson_interval(1, 2))
    assert f"| react | 50.0 [{lo:.1f}, {hi:.1f}] | 50.0 [{lo:.1f}, {hi:.1f}] | 0.0 [0.0, 79.3] |" in md
    assert md.rstrip().endswith("| 100.0 | 100.0 |")  # no interval on a macro average


SHARED_PAPER_TABLE1 = SHARED_DATA.parent / "paper" / "table1.csv"
PAPER_ROWS_TO_OURS = {
    "R1-Distill-Qwen-7B": "base_cot",
    "Deepseek-R1*": None,
    "Qwen-7B-Base (ReAct)": "react_base",
    "R1-Distill-Qwen-7B (ReAct)": "react_reasoning",
    "SFT-stage1": "sft_stage1",
    "SFT-stage2": "sft_stage2_only",
    "SFT-stage1&2": "sft_stage2",
    "SFT-stage1&2&3": "sft_stage3",
    "RL-stage2": "rl_stage2_only",
    "SFT-stage1&2&3+RL-stage1": "sft123_rl1",
    "SFT-stage1&2&3+RL-stage1&2": "sft123_rl12",
    "SFT-stage1&2+RL-stage2": "sft12_rl2",
}


def test_shipped_paper_table1_maps_every_paper_row():
    paper = paper_table1()  # configs/paper_table1.csv, validated line by line
    assert list(paper.index) == list(PAPER_ROWS_TO_OURS) and "2503.06580" in paper.attrs["source"]
    assert paper.attrs["method_map"] == {ours: row for row, ours in PAPER_ROWS_TO_OURS.items() if ours}
    assert set(paper.attrs["method_map"]) == set(TABLE1_METHODS)  # every method of ours has the paper's row
    assert paper.loc["SFT-stage1&2+RL-stage2", ("hotpotqa", "em")] == 35.6
    assert paper.loc["R1-Distill-Qwen-7B (ReAct)", (AVG, "judge")] == 18.5
    assert paper[[c for c in paper.columns if c[0] != "fanout"]].notna().all().all()  # 12 rows x 7 columns x 2
    # printed Averages that are not the mean of the six are kept as printed, and flagged
    assert paper.loc["SFT-stage1", (AVG, "judge")] == 29.1
    flags = paper.attrs["average_flags"]
    assert "SFT-stage1 LLM: printed Average 29.1, mean of the six benchmarks 28.15" in flags
    assert "Deepseek-R1* EM: printed Average 49.5, mean of the six benchmarks 48.73" in flags
    assert len(flags) == 10 and not any(f.startswith(("RL-", "R1-", "Qwen")) for f in flags)


@pytest.mark.skipif(not SHARED_PAPER_TABLE1.is_file(), reason=f"{SHARED_PAPER_TABLE1} not present (fresh clone)")
def test_shipped_paper_table1_is_the_transcription_cell_by_cell():
    import csv

    with SHARED_PAPER_TABLE1.open() as fh:
        source = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    paper = paper_table1()
    assert len(source) == paper.notna().sum().sum() == 12 * 7 * 2
    for r in source:
        assert paper.loc[r["paper_row"], (r["benchmark"], r["metric"])] == float(r["value"]), r


def test_ours_vs_paper_compares_averages_only_over_the_papers_six_benchmarks():
    paper = paper_table1()
    six = ("nq", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
    rows = [_pred("react_reasoning", b, "1", 1.0, True, 1) for b in ("embedded", *six)]
    cmp = ours_vs_paper_markdown(table1(rows), paper)
    assert (
        cmp.startswith("| Method | NQ EM | NQ LLM | TriviaQA EM |") and "| Embedded EM | Embedded LLM | Avg EM |" in cmp
    )
    react = cmp.split("| Δ (ours − paper) | ")[1].split("\n")[0].split(" | ")
    assert react[:2] == ["84.9", "79.1"] and react[-4:] == ["—", "—", "—", "— |"]  # avg over 7 benchmarks: no Δ
    assert "Our Avg is over NQ, TriviaQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle, Embedded" in cmp
    assert "no Δ on the averages" in cmp
    assert "| paper: Deepseek-R1*" not in cmp and "printed Average 29.1" in cmp
    same = ours_vs_paper_markdown(table1([r for r in rows if r["benchmark"] != "embedded"]), paper)
    assert same.split("| Δ (ours − paper) | ")[1].split("\n")[0].endswith("| 84.8 | 81.5 |")  # 100 − 15.2, 100 − 18.5


def test_paper_table1_file_is_read_and_validated(tmp_path):
    good = tmp_path / "paper.csv"
    good.write_text(
        "# test numbers, not the paper's\n"
        "paper_row,method,benchmark,metric,value\n"
        "ReAct (test),react_reasoning,nq,em,40\n"
        "ReAct (test),react_reasoning,nq,judge,45.5\n"
        "ReAct (test),react_reasoning,avg,em,12\n"
        "Other row (test),,bamboogle,em,3\n"
    )
    paper = paper_table1(path=good)
    assert list(paper.index) == ["ReAct (test)", "Other row (test)"]
    assert paper.loc["ReAct (test)", ("nq", "judge")] == 45.5 and paper.loc["ReAct (test)", (AVG, "em")] == 12.0
    assert math.isnan(paper.loc["ReAct (test)", ("bamboogle", "em")])  # not given: not invented, not recomputed
    assert paper.attrs["method_map"] == {"react_reasoning": "ReAct (test)"} and paper.attrs["path"] == str(good)
    ours = table1(
        [{**r, "method": "react_reasoning" if r["method"] == "react" else r["method"]} for r in _predictions()]
    )
    cmp = ours_vs_paper_markdown(ours, paper)  # the CSV's method column maps the rows
    assert "| paper: ReAct (test) | 40.0 | 45.5 |" in cmp and "| Δ (ours − paper) | 10.0 | 4.5 |" in cmp
    assert str(good) in cmp and "paper: Other" not in cmp
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "paper_row,method,benchmark,metric,value\n"
        "ReAct,react_reasoning,nq,em,140\n"  # line 2: not a percentage
        "ReAct,react_reasoning,popqa,em,10\n"  # line 3: benchmark not in Table 1
        "ReAct,react_reasoning,nq,f1,10\n"  # line 4: metric not asked for
        "ReAct,react_reasoning,nq,em,41\n"  # line 5: repeats line 2
        "ReAct,sft_stage1,hotpotqa,em,x\n"  # line 6: not a number
        "ReAct,sft_stage1,hotpotqa,judge,9\n"  # line 7: another method for the same paper row
        "CoT,autocoa,nq,em,9\n"  # line 8: not one of our methods
        "ReAct again,react_reasoning,nq,em,9\n"  # line 9: our method mapped from a second paper row
        "Deepseek-R1*,,nq,em,39.0\n"
    )  # line 10: fine: a paper row with no counterpart
    with pytest.raises(ValueError) as err:
        paper_table1(path=bad)
    msg = str(err.value)
    for want in (
        f"{bad}:2: value 140.0",
        f"{bad}:3: unknown benchmark 'popqa'",
        f"{bad}:4: unknown metric 'f1'",
        f"{bad}:5: ('ReAct', 'nq', 'em') repeats line 2",
        f"{bad}:6: value 'x' is not a number",
        f"{bad}:7: paper_row 'ReAct' maps to method 'sft_stage1'",
        f"{bad}:8: unknown method 'autocoa'",
        f"{bad}:9: method 'react_reasoning' is mapped from paper_row 'ReAct again' here but from 'ReAct'",
    ):
        assert want in msg, (want, msg)
    assert f"{bad}:10" not in msg and msg.startswith("8 problem(s)")
    (tmp_path / "header.csv").write_text("row,benchmark,value\n")
    with pytest.raises(ValueError, match="header"):
        paper_table1(path=tmp_path / "header.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        paper_table1(path=tmp_path / "missing.csv")


def test_power_markdown_and_interval_plot(tmp_path):
    rows = [
        _pred(m, "embedded", str(i), float(i < k), i < k, 1)
        for m, k in (("base_cot", 2), ("react_reasoning", 5), ("sft_stage1", 9))
        for i in range(20)
    ]
    power = table1_power(rows, resamples=2000)
    md = power_markdown(power)
    assert md.startswith("| Method | Benchmark | n | EM [95% CI] | LLM [95% CI] | ΔEM vs ReAct (reasoning)")
    assert "| react_reasoning | Embedded | 20 | 25.0 [11.2, 46.9] | 25.0 [11.2, 46.9] | — | — |" in md
    # sft_stage1 got 4 questions more than ReAct and 7 more than CoT, and none fewer: McNemar 2/2^4, 2/2^7
    assert "vs react_reasoning, p=0.125 (4:0)" in md and "vs base_cot, p=0.016 (7:0)" in md
    assert "Wilson score, 95%" in md and "2000 resamples" in md
    path = tmp_path / "intervals.png"
    png = plot_intervals(power, "embedded", path)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and path.read_bytes() == png and len(png) > 5000
    with pytest.raises(ValueError, match="no em cells for benchmark 'nq'"):
        plot_intervals(power, "nq")
    report = evaluation_report(table1(rows), paper_table1(), power=power)
    assert "## Table 1 with intervals and paired tests" in report and "| base_cot | 10.0 [2.8, 30.1] |" in report
    assert report.index("## Table 1 (ours)") < report.index("with intervals") < report.index("## Ours beside the paper")


def test_action_analysis_and_plot(tmp_path):
    a = action_analysis(_predictions(), correct="em", cap=5).set_index(["method", "n_actions"])
    assert list(a.loc["react"]["label"]) == ["0", "1", "2", "3", "4", "5+"]
    assert a.loc[("react", 1), "share_of_correct"] == 1.0 and a.loc[("react", 0), "success_rate"] == 0.0
    assert a.loc[("react", 5), "n"] == 1  # 7 actions land in the 5+ bucket
    assert math.isnan(a.loc[("react", 3), "success_rate"])
    assert a.loc[("autocoa", 2), "success_rate"] == 1.0 and a.loc[("autocoa", 2), "n"] == 3
    assert a.groupby(level="method")["share_of_correct"].sum().to_dict() == {"autocoa": 1.0, "react": 1.0}
    path = tmp_path / "figs" / "figure3.png"
    data = plot_action_analysis(action_analysis(_predictions()), path)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and path.read_bytes() == data and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["figure3.png"]  # no temp file left behind


# -- the judge over a scripted engine ------------------------------------------------------------------
class ScriptedJudge:
    name = "scripted-judge"

    def __init__(self, replies):
        self.tokenizer, self.replies, self.calls = CharTokenizer(), list(replies), []

    def generate(self, requests):
        self.calls.append(list(requests))
        return [GenResult([1], self.replies.pop(0), "eos") for _ in requests]


@pytest.mark.parametrize(
    "text,want",
    [
        ("Yes", True),
        ("yes.", True),
        (" NO\n", False),
        ("no, it differs", False),
        ("<think>hmm</think>\nYes", True),
        ("maybe", None),
        ("", None),
        ("The answer is correct", None),
        ("<think>still thinking", None),
        ("nope", None),
    ],
)
def test_parse_verdict(text, want):
    verdict, reason = parse_verdict(text)
    assert verdict is want and reason.startswith("parsed" if want is not None else "unparsable")


def test_judge_batches_parses_and_skips_missing_predictions():
    engine = ScriptedJudge(["Yes", "no.", "I am not sure"])
    items = [
        JudgeItem("Who wrote Hamlet?", "Shakespeare", ("William Shakespeare",)),
        JudgeItem("Capital of France?", None, ("Paris",)),
        JudgeItem("Capital of Italy?", "Milan", ("Rome",)),
        JudgeItem("Tallest?", "K2", ("Everest",)),
    ]
    verdicts = judge(engine, items, constrained=False)
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 3  # one batch; the None prediction is not sent
    assert [v.verdict for v in verdicts] == [True, False, False, None]
    assert verdicts[1].raw is None and verdicts[1].reason.startswith("skipped: no prediction")
    assert verdicts[3].raw == "I am not sure" and verdicts[3].reason.startswith("unparsable")
    assert not verdicts[3].correct and verdicts[0].correct
    assert {v.prompt_id for v in verdicts} == {"judge-match-v1"} and verdicts[0].judge_model == "scripted-judge"
    req = engine.calls[0][0]
    assert req.temperature == 0.0 and req.allowed_token_ids is None and req.max_new_tokens == 8
    prompt = engine.tokenizer.decode(req.prompt_ids)
    assert (
        prompt.startswith("<|user|>")
        and "- William Shakespeare" in prompt
        and "Predicted answer: Shakespeare" in prompt
    )
    assert set(verdicts[0].as_row()) == {"judge", "judge_raw", "judge_reason", "judge_prompt_id", "judge_model"}


def test_judge_errors():
    with pytest.raises(ValueError, match="unknown judge prompt"):
        judge(ScriptedJudge([]), [], prompt_id="judge-v0")

    class Short(ScriptedJudge):
        def generate(self, requests):
            return []

    with pytest.raises(RuntimeError, match="returned 0 results for 1 requests"):
        judge(Short([]), [JudgeItem("q", "a", ("a",))], constrained=False)
    assert judge(ScriptedJudge([]), [JudgeItem("q", "a", ())], constrained=False)[0].reason.startswith(
        "skipped: no gold"
    )
    # a character tokenizer has no one-token yes/no: the constrained judge refuses instead of guessing
    with pytest.raises(ValueError, match="no single-token yes or no"):
        judge(ScriptedJudge([]), [JudgeItem("q", "a", ("a",))])
    assert all("{prediction}" in p.template for p in JUDGE_PROMPTS.values())


def test_constrained_judge_always_answers_yes_or_no(tiny_model):
    """A random one-layer model answers anything when free; constrained, every verdict is one yes/no token."""
    from agent.transformers_engine import TransformersEngine
    from evals.judge import verdict_token_ids

    engine = TransformersEngine(tiny_model)
    allowed = verdict_token_ids(engine.tokenizer)
    spelled = {engine.tokenizer.decode([i]).strip().lower() for i in allowed}
    assert spelled == {"yes", "no"} and len(allowed) >= 2
    items = [JudgeItem(f"Question {i}?", f"answer {i}", (f"gold {i}", "other")) for i in range(6)]
    free = judge(engine, items, constrained=False, max_new_tokens=4)
    assert sum(v.verdict is None for v in free) >= 4  # random weights: free text is rarely yes/no
    verdicts = judge(engine, items)
    assert all(v.verdict is not None for v in verdicts)
    assert all(
        v.raw.strip().lower() in {"yes", "no"} and v.reason.endswith("(decoding constrained to yes/no)")
        for v in verdicts
    )


# -- ReAct through the rollout library -----------------------------------------------------------------
def test_react_templates_follow_the_protocol():
    r1 = react_template_for("DeepSeek-R1-Distill-Qwen-7B")
    assert r1.id == "react-r1-v1" and r1.prefill == "<think>\n"
    [msg] = r1.messages("Who founded Alpha?")
    assert msg["role"] == "user" and msg["content"].endswith("Question: Who founded Alpha?")
    assert "Action 1: <begin_search>" in msg["content"]  # the examples are kept for R1, inline
    small = react_template_for("SmolLM2-135M-Instruct")
    assert small.id == "react-smollm2-fewshot-v1" and len(small.messages("q")) == 2 + 2 * len(small.shots)
    for _, shot in REACT_TEMPLATES["react-r1-v1"].shots:
        p = parse(shot)
        assert p.balanced and p.queries and p.answer and not p.issues
        for obs in [s for s in p.steps if s.kind == "observation"]:
            assert render_observation(obs.text) in shot  # observations look exactly like the environment's
    cfg = react_rollout_config(RolloutConfig(simulated=True, tools=False))
    assert cfg.tools and not cfg.simulated


class ReActPolicy:
    """Scripted base model: one Thought/Action, then finishes; counts only what it generated."""

    name = "react-scripted"

    def __init__(self, question):
        self.tokenizer, self.question = CharTokenizer(), question

    def generate(self, requests):
        out = []
        for r in requests:
            generated = self.tokenizer.decode(r.prompt_ids).rsplit(self.question, 1)[1]
            if generated.count("</end_search>") == 0:
                text = "Thought 1: I need the founder.\nAction 1: <begin_search> Alpha founder </end_search> junk"
            else:
                text = "Thought 2: It is Beta.\nAction 2: finish</think>\n\nThe answer is \\boxed{Beta}."
            ids = self.tokenizer.encode(text) + [0]
            out.append(cut_at_stop(ids, self.tokenizer.decode, r.stop, {0}, r.max_new_tokens))
        return out


def test_react_runs_through_the_rollout_and_search():
    question = "Who founded Alpha?"
    template = REACT_TEMPLATES["react-r1-v1"]
    engine = ReActPolicy(question)
    searched = []

    def search(queries):
        searched.extend(queries)
        return [(f'result 1: "Alpha"\nAlpha was founded by Beta ({q}).', ["p1"]) for q in queries]

    rollout = Rollout(engine, search, react_rollout_config(RolloutConfig(max_context=100_000)))
    [traj] = rollout.run([("t0", template.prompt_ids(engine.tokenizer, question))])
    assert searched == ["Alpha founder"] and traj.n_actions == 1 and traj.answer == "Beta"
    assert "Observation" not in traj.completion and "<search_result>" in traj.completion
    assert parse(traj.completion, think_open=True).balanced
