"""Our BM25 against a brute-force implementation of the same (Lucene) formula on a small corpus."""

import math
from collections import Counter

import bm25s
import numpy as np
import pytest
import Stemmer

from retrieval.bm25 import BM25Index, split_contents
from retrieval.engine import LocalSearchEngine, search_rendered

DOCS = [
    "Velora Kastrin\nVelora Kastrin is a novelist born in Orvantis.",
    "Orvantis\nOrvantis is a city on the Sel river with a large harbour.",
    "The Glass Orchard\nThe Glass Orchard is a novel written by Velora Kastrin in 1994.",
    "Brennick Institute\nThe Brennick Institute is a research institute in Orvantis.",
    "Sel River\nThe Sel is a river. Rivers and rivers flow through many cities.",
    "Harbour\nA harbour is a sheltered body of water where ships dock.",
]
CORPUS = [{"id": f"d{i}", "contents": c} for i, c in enumerate(DOCS)]


def brute_force(query: str, k1=0.9, b=0.4) -> list[tuple[int, float]]:
    stem = Stemmer.Stemmer("english")
    tok = lambda texts: bm25s.tokenize(
        texts,
        stopwords="english",
        stemmer=stem,
        return_ids=False,  # noqa: E731
        show_progress=False,
    )
    docs = tok(DOCS)
    q = tok([query])[0]
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    df = Counter(t for d in docs for t in set(d))
    scores = []
    for i, d in enumerate(docs):
        tf = Counter(d)
        s = 0.0
        for t in q:
            if tf[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                # Lucene (>= 8) BM25: the (k1 + 1) numerator factor is dropped; ranking is unchanged
                s += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
        scores.append((i, s))
    return sorted([x for x in scores if x[1] > 0], key=lambda x: (-x[1], x[0]))


@pytest.fixture(scope="module")
def index():
    return BM25Index.build(CORPUS, show_progress=False)


@pytest.mark.parametrize(
    "query",
    ["Velora Kastrin novel", "Orvantis harbour", "rivers", "research institute city", "glass orchard 1994 novelist"],
)
def test_scores_equal_brute_force(index, query):
    want = brute_force(query)
    docs, scores = index.search_ids([query], k=len(DOCS))
    got = [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if d >= 0]
    assert want, "the query should match something"
    assert dict(got).keys() == dict(want).keys()
    assert np.allclose([dict(got)[d] for d, _ in want], [s for _, s in want], atol=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(got, got[1:]))  # ranked by score


def test_unknown_terms_give_no_results_and_k_is_clamped(index):
    hits = index.search(["zzzqqq xyzzy", "Orvantis"], k=100)
    assert hits[0] == []
    assert hits[1] and len(hits[1]) <= len(DOCS) and hits[1][0].rank == 1
    with pytest.raises(ValueError):
        index.search(["x"], k=0)


def test_save_load_roundtrip_and_flashrag_layout(index, tmp_path):
    path = index.save(tmp_path / "idx")
    for name in (
        "params.index.json",
        "vocab.index.json",
        "data.csc.index.npy",
        "indices.csc.index.npy",
        "indptr.csc.index.npy",
        "corpus.jsonl",
    ):
        assert (path / name).is_file(), name
    assert not list(path.glob("*.pkl"))
    loaded = BM25Index.load(path)
    queries = ["Velora Kastrin novel", "harbour ships"]
    assert [[p.id for p in h] for h in loaded.search(queries, 3)] == [
        [p.id for p in h] for h in index.search(queries, 3)
    ]
    # what FlashRAG's bm25s retriever does with the same directory
    raw = bm25s.BM25.load(str(path), mmap=True, load_corpus=False)
    ids, _ = raw.retrieve(
        bm25s.tokenize(queries, stemmer=Stemmer.Stemmer("english"), show_progress=False), k=1, show_progress=False
    )
    assert [CORPUS[i]["id"] for i in ids[:, 0]] == [h[0].id for h in index.search(queries, 1)]


def test_rendering_as_the_model_sees_it(index):
    engine = LocalSearchEngine(index=index)
    text = search_rendered(engine, ["Glass Orchard Kastrin"], k=2)[0]
    assert text.startswith('result 1: "The Glass Orchard"\nThe Glass Orchard is a novel')
    assert "\nresult 2: " in text
    assert search_rendered(engine, ["qqqq"], k=2) == ["No results found."]


def test_split_contents_follows_flashrag():
    assert split_contents('"Title"\nline one\nline two') == ("Title", "line one\nline two")
    assert split_contents("Only title") == ("Only title", "")


def test_empty_corpus_is_an_error():
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index.build([])


def test_ties_are_broken_by_row_and_match_raw_scores():
    tied = [{"id": str(i), "contents": f"Doc {i}\nshared words here"} for i in range(20)]
    tied.append({"id": "x", "contents": "Unique\nshared words here plus rare"})
    index = BM25Index.build(tied, show_progress=False)
    docs, scores = index.search_ids(["shared rare", "shared"], k=5)
    assert docs[0, 0] == 20 and list(docs[0, 1:]) == [0, 1, 2, 3]
    assert list(docs[1]) == [0, 1, 2, 3, 4]  # twenty-way tie on the short documents: lowest rows first
    raw_scores = index._retriever.get_scores(index.tokenize(["shared rare"])[0])  # noqa: SLF001
    assert np.allclose(scores[0], np.sort(raw_scores)[::-1][:5])
