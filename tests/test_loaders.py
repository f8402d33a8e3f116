import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qadata.loaders import SourceSpec, count_records, load_source, load_sources, question_from_prompt
from qadata.schema import Rejected, SourceError, questions_table
from tests.conftest import write_jsonl


def _split(items):
    items = list(items)
    rows = [i for i in items if not isinstance(i, Rejected)]
    return rows, [i for i in items if isinstance(i, Rejected)]


# -- the real files beside the repo ----------------------------------------------------------------
def test_hf_layout_shared_sample(shared_data):
    path = shared_data / "hotpotqa" / "distractor_train_sample.jsonl"
    rows, rejected = _split(load_source(SourceSpec(str(path))))
    assert len(rows) + len(rejected) == count_records(SourceSpec(str(path))) == 300
    assert not rejected
    r = rows[0]
    assert r["source"] == "hf" and r["split"] == "train"
    assert len(r["context"]) == 10 and r["supporting_facts"]
    titles = {p["title"] for p in r["context"]}
    assert all(f["title"] in titles for f in r["supporting_facts"])
    questions_table(rows)  # conforms to the normalised schema


def test_verl_layout_shared_train(shared_data):
    path = shared_data / "autocoa" / "hotpotqa_train.parquet"
    rows, rejected = _split(load_source(SourceSpec(str(path))))
    assert len(rows) == 6144 and not rejected
    first = rows[0]
    assert first["question"].startswith("Who is an English author") and first["question"].endswith("?")
    assert first["answers"] == [first["answer"]] and first["level"] in ("easy", "medium", "hard")
    assert first["source"] == "verl" and first["split"] == "train"


def test_verl_test_parquet_keeps_every_gold_answer(shared_data):
    path = shared_data / "autocoa" / "test.parquet"
    rows, rejected = _split(load_source(SourceSpec(str(path))))
    assert len(rows) + len(rejected) == 2936
    assert all(r["question"] and "\n" not in r["question"] for r in rows)
    assert any(len(r["answers"]) > 1 for r in rows)


def test_question_is_last_paragraph_of_prompt():
    content = "You are helpful.\n\n1. Rules\n   - x\n\nNow, please answer the user's question below: \nWho won?\n\n"
    assert question_from_prompt(content) == "Who won?"
    # U+0085 (NEL) inside a question is text, not a line break (TriviaQA dev_6017 has one)
    nel = "Rules.\n\nNow, please answer the user's question below: \nWhich firm made W.D. & H.O\x85 cigarettes?"
    assert question_from_prompt(nel) == "Which firm made W.D. & H.O\x85 cigarettes?"


# -- official JSON and hand-made malformed inputs -----------------------------------------------
def test_official_json_layout(tmp_path, hotpot_row):
    official = {
        "_id": "o1",
        "question": "Q?",
        "answer": "A",
        "type": "comparison",
        "level": "hard",
        "supporting_facts": [["T1", 0], ["T2", 1]],
        "context": [["T1", ["A is here."]], ["T2", ["x.", " A again."]]],
    }
    path = tmp_path / "hotpot_dev_distractor_v1.json"
    path.write_text(json.dumps([official]))
    rows, rejected = _split(load_source(SourceSpec(str(path))))
    assert not rejected and rows[0]["id"] == "o1" and rows[0]["split"] == "dev"
    assert rows[0]["supporting_facts"] == [{"title": "T1", "sent_id": 0}, {"title": "T2", "sent_id": 1}]
    assert rows[0]["context"][1] == {"title": "T2", "sentences": ["x.", " A again."]}


def test_malformed_rows_are_quarantined_with_reasons(tmp_path, hotpot_row):
    no_answer = {k: v for k, v in hotpot_row.items() if k != "answer"} | {"id": "q2"}
    empty_answer = hotpot_row | {"id": "q3", "answer": "  "}
    bad_fact = hotpot_row | {"id": "q4", "supporting_facts": {"title": ["Nowhere"], "sent_id": [0]}}
    path = write_jsonl(
        tmp_path / "mixed_train.jsonl",
        [
            hotpot_row,
            no_answer,
            empty_answer,
            bad_fact,
            b"\xff\xfe not utf-8\n",
            b"{not json\n",
            hotpot_row,
        ],
    )
    rows, rejected = load_sources([SourceSpec(str(path))])
    assert [r["id"] for r in rows] == ["q1"]
    reasons = [r.reason for r in rejected]
    assert "missing field 'answer'" in reasons
    assert "empty answer" in reasons
    assert any("Nowhere" in r for r in reasons)
    assert any("not valid UTF-8" in r and r.startswith("line 5") for r in reasons)
    assert any("malformed JSON" in r and r.startswith("line 6") for r in reasons)
    assert any(r.startswith("duplicate id 'q1'") for r in reasons)
    assert all(r.source_file == str(path) for r in rejected)
    assert len(rows) + len(rejected) == count_records(SourceSpec(str(path))) == 7


def test_unreadable_file_fails_naming_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"_id": "a",\n  "question": ')
    with pytest.raises(SourceError, match=r"broken\.json: invalid JSON at line 3"):
        list(load_source(SourceSpec(str(path))))
    with pytest.raises(SourceError, match="file not found"):
        list(load_source(SourceSpec(str(tmp_path / "missing.jsonl"))))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="unknown file type"):
        list(load_source(SourceSpec(str(tmp_path / "x.csv"))))


def test_verl_rows_missing_fields(tmp_path):
    good = {
        "_id": "v1",
        "level": "easy",
        "prompt": [{"role": "user", "content": "Rules.\n\nWho?"}],
        "reward_model": {"ground_truth": "Ann", "style": "rule"},
        "extra_info": {"index": 0, "split": "train"},
    }
    no_truth = good | {"_id": "v2", "reward_model": {"ground_truth": None, "style": "rule"}}
    no_prompt = good | {"_id": "v3", "prompt": []}
    path = tmp_path / "rl.parquet"
    pq.write_table(pa.Table.from_pylist([good, no_truth, no_prompt]), path)
    rows, rejected = _split(load_source(SourceSpec(str(path))))
    assert [r["id"] for r in rows] == ["v1"] and rows[0]["question"] == "Who?"
    assert sorted(r.reason for r in rejected) == [
        "missing field 'prompt[0].content'",
        "missing field 'reward_model.ground_truth'",
    ]


def test_source_spec_parsing():
    assert SourceSpec.parse("a/b.json::dev") == SourceSpec("a/b.json", split="dev")
    assert SourceSpec.parse("x.parquet::train::verl") == SourceSpec("x.parquet", layout="verl", split="train")
    with pytest.raises(ValueError):
        SourceSpec.parse("")
