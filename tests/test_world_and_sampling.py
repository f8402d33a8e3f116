import collections
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest

from qadata.checks import answer_in_gold
from qadata.corpus import corpus_from_questions
from qadata.loaders import normalise_hotpot
from qadata.sampling import largest_remainder, sample_questions
from qadata.world import WorldSpec, build_world, generate_questions, hop_counts

SMALL = WorldSpec(seed=5, countries=8, places=60, people=200, orgs=40, works=200, questions=120)


def _rows(spec=SMALL):
    return [
        normalise_hotpot(r, source="embedded", split=r["split"], source_file="w", source_row=i)
        for i, r in enumerate(generate_questions(build_world(spec)))
    ]


def test_world_is_deterministic_and_seed_dependent():
    a, b = generate_questions(build_world(SMALL)), generate_questions(build_world(SMALL))
    assert a == b
    c = generate_questions(build_world(WorldSpec(**{**SMALL.__dict__, "seed": 6})))
    assert [r["question"] for r in a] != [r["question"] for r in c]


def test_world_questions_are_hotpotqa_shaped_and_answerable():
    rows = _rows()
    raw = generate_questions(build_world(SMALL))
    assert len(rows) == 120
    # hop_mix (0.1, 0.5, 0.25, 0.15) of 120 questions; 2-hop half bridge, half comparison; the rest bridges
    hops = collections.Counter(r["hops"] for r in raw)
    assert hops == {1: 12, 2: 60, 3: 30, 4: 18} == hop_counts(SMALL)
    types = collections.Counter((r["hops"], r["type"]) for r in raw)
    assert types[2, "bridge"] == types[2, "comparison"] == 30
    assert types[1, "bridge"] + types[3, "bridge"] + types[4, "bridge"] == 60
    assert {r["level"] for r in rows} <= {"easy", "medium", "hard"}
    # each hop count holds out its own dev tail, so every hop count is evaluated
    assert collections.Counter(r["split"] for r in rows) == {"train": 96, "dev": 24}
    assert {r["hops"] for r in raw if r["split"] == "dev"} == {1, 2, 3, 4}
    for r, q in zip(rows, raw):
        paras = {p["title"]: p["sentences"] for p in r["context"]}
        assert len(r["context"]) == 10
        # supporting facts cover every hop: one gold paragraph per hop, each in the context
        assert len({f["title"] for f in r["supporting_facts"]}) == q["hops"]
        for f in r["supporting_facts"]:
            assert f["title"] in paras and 0 <= f["sent_id"] < len(paras[f["title"]])
        assert answer_in_gold(r, sentences_only=True), r["id"]


def test_two_hop_questions_keep_their_ids():
    """With hop_mix (0, 1, 0, 0) the world is the 2-hop world of earlier versions, id for id; in the mixed
    world the 2-hop questions are the first ones of that world, under the same ids."""
    only2 = generate_questions(build_world(dataclasses.replace(SMALL, hop_mix=(0, 1, 0, 0))))
    key = [[r["id"], r["question"], r["answer"], r["split"]] for r in only2]
    assert hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16] == "6180419b3ce5795b"
    mixed = [r for r in generate_questions(build_world(SMALL)) if r["hops"] == 2]
    assert [(r["id"], r["question"], r["answer"]) for r in mixed] == [
        (r["id"], r["question"], r["answer"]) for r in only2[: len(mixed)]
    ]
    assert len({r["id"] for r in generate_questions(build_world(SMALL))}) == SMALL.questions


def test_world_does_not_depend_on_the_hash_seed():
    """Distractors were drawn from a set of kind names, whose order follows PYTHONHASHSEED."""
    code = (
        "import hashlib, json; from qadata.world import WorldSpec, build_world, generate_questions, hop_counts; "
        "print(hashlib.sha256(json.dumps(generate_questions(build_world(WorldSpec(seed=5, countries=8, "
        "places=60, people=200, orgs=40, works=200, questions=60)))).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in (1, 3)
    }
    assert len(digests) == 1


@pytest.mark.parametrize("mix", [(0, 0, 0, 0), (1, 1, 1), (1, -1, 0, 0)])
def test_hop_mix_is_validated(mix):
    with pytest.raises(ValueError, match="hop_mix"):
        generate_questions(build_world(dataclasses.replace(SMALL, hop_mix=mix)))


def test_corpus_deduplicates_paragraphs_with_stable_ids():
    rows = _rows()
    passages, seen = corpus_from_questions(rows)
    assert seen == sum(len(r["context"]) for r in rows) > len(passages)
    assert len({p["contents"] for p in passages}) == len(passages)
    assert passages == corpus_from_questions(rows)[0]
    assert all(p["contents"] == f"{p['title']}\n{p['text']}" for p in passages)


def test_largest_remainder_allocates_exactly():
    assert largest_remainder([5, 3, 2], 5) == [3, 1, 1]
    assert largest_remainder([10, 1], 11, caps=[10, 1]) == [10, 1]
    assert largest_remainder([1, 1], 5, caps=[1, 1]) == [1, 1]


def test_sample_is_stratified_disjoint_and_leak_free():
    rows = _rows()
    dev_questions = [r["question"] for r in rows if r["split"] == "dev"]
    leaked = next(r for r in rows if r["split"] == "train")
    res = sample_questions(rows, total=40, seed=1, eval_questions=dev_questions + [leaked["question"].upper()])
    assert len(res.rows) == 40 and res.excluded_leakage == 1 and res.excluded_split == 24
    pools = collections.Counter(r["pool"] for r in res.rows)
    assert pools == {"cot": 20, "coa": 20}
    assert leaked["id"] not in {r["id"] for r in res.rows}
    cot = {r["id"] for r in res.rows if r["pool"] == "cot"}
    assert not cot & {r["id"] for r in res.rows if r["pool"] == "coa"}
    # stratum shares in the sample follow the eligible population (within one question)
    eligible = collections.Counter(f"{r['level']}/{r['type']}" for r in rows if r["split"] == "train")
    eligible[f"{leaked['level']}/{leaked['type']}"] -= 1
    got = collections.Counter(r["stratum"] for r in res.rows)
    for name, n in eligible.items():
        assert abs(got[name] - 40 * n / sum(eligible.values())) <= 1
    assert (
        sample_questions(rows, total=40, seed=1, eval_questions=dev_questions).rows
        == sample_questions(list(reversed(rows)), total=40, seed=1, eval_questions=dev_questions).rows
    )


def test_sample_takes_everything_when_asked_for_more():
    rows = _rows()
    res = sample_questions(rows, total=10_000, seed=0)
    assert len(res.rows) == res.eligible == 96


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_sample_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        sample_questions([], total=1, cot_fraction=fraction)


def test_answer_in_gold_predicate(hotpot_row):
    from qadata.loaders import normalise_hotpot

    rec = normalise_hotpot(hotpot_row, source="hf", split="train", source_file="x", source_row=0)
    assert answer_in_gold(rec, sentences_only=True) is True  # "Beta" is in "Alpha was born in Beta."
    assert answer_in_gold(rec | {"answer": "Gamma"}) is False
    assert answer_in_gold(rec | {"answer": "beta"}) is True  # paragraphs: case-insensitive
    assert answer_in_gold(rec | {"answer": "beta"}, sentences_only=True) is False
    assert answer_in_gold(rec | {"answer": "No"}) is True
    assert answer_in_gold(rec | {"context": []}) is None
