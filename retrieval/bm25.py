"""BM25 over a FlashRAG corpus with bm25s, saved as bm25s' explicit files (no pickle).

The index directory is what FlashRAG's ``BM25Retriever`` (bm25s backend) loads:
``bm25s.BM25.load(index_dir)`` plus queries tokenised with ``bm25s.tokenize(q, stemmer=
Stemmer.Stemmer("english"))`` (English stop words, the bm25s default). The corpus is stored beside
the index in FlashRAG's jsonl format (``{"id", "contents": "Title\\ntext"}``) so the directory is
self-contained and memory-maps on load.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from qadata.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "autocoa_index.json"
STOPWORDS = "english"
STEMMER_LANGUAGE = "english"


@dataclass(frozen=True, slots=True)
class Passage:
    id: str
    title: str
    text: str
    score: float
    rank: int

    def to_dict(self) -> dict:
        # spelled out: dataclasses.asdict's recursive deep copy cost ~10 us per passage on the
        # HTTP server's hot path
        return {"id": self.id, "title": self.title, "text": self.text, "score": self.score, "rank": self.rank}


def split_contents(contents: str) -> tuple[str, str]:
    """FlashRAG's convention: the first line is the title (quotes stripped), the rest the text."""
    title, _, text = contents.partition("\n")
    return title.strip().strip('"'), text.strip()


class BM25Index:
    """A bm25s index plus the FlashRAG corpus it was built from."""

    def __init__(self, retriever: bm25s.BM25, corpus: Sequence[dict], params: dict):
        self._retriever = retriever
        self._corpus = corpus
        self.params = params
        self._vocab = retriever.vocab_dict
        self._stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
        # PyStemmer objects are not thread-safe; scoring on the shared sparse matrix is read-only.
        self._tokenize_lock = threading.Lock()

    @property
    def num_docs(self) -> int:
        return int(self._retriever.scores["num_docs"])

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        corpus: Sequence[dict],
        *,
        k1: float = 0.9,
        b: float = 0.4,
        method: str = "lucene",
        show_progress: bool = True,
    ) -> BM25Index:
        """Index FlashRAG corpus rows (``{"id", "contents"}``).

        Defaults ``k1=0.9, b=0.4`` are Pyserini's BM25 defaults, which FlashRAG's wiki-18 runs use.
        """
        if not corpus:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        start = time.perf_counter()
        stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
        texts = [row["contents"] for row in corpus]
        tokens = bm25s.tokenize(texts, stopwords=STOPWORDS, stemmer=stemmer, show_progress=show_progress)
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        retriever.index(tokens, show_progress=show_progress)
        params = {
            "k1": k1,
            "b": b,
            "method": method,
            "stopwords": STOPWORDS,
            "stemmer": STEMMER_LANGUAGE,
            "num_docs": len(corpus),
            "vocab_size": len(retriever.vocab_dict),
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        log.info("indexed %d passages (%d terms) in %.1fs", len(corpus), params["vocab_size"], params["build_seconds"])
        return cls(retriever, list(corpus), params)

    def save(self, index_dir: str | Path) -> Path:
        """Write the index directory atomically (old content replaced only once the new is complete)."""
        index_dir = Path(index_dir)
        with atomic_directory(index_dir) as tmp:
            self._retriever.save(str(tmp), corpus=self._corpus, show_progress=False)
            atomic_write_json(tmp / MANIFEST, self.params)
        return index_dir

    @classmethod
    def load(cls, index_dir: str | Path, *, mmap: bool = True) -> BM25Index:
        index_dir = Path(index_dir)
        if not (index_dir / "params.index.json").is_file():
            raise FileNotFoundError(f"{index_dir}: not a bm25s index directory (params.index.json missing)")
        retriever = bm25s.BM25.load(str(index_dir), mmap=mmap, load_corpus=True)
        # Plain ndarray views of the np.memmap matrices: same pages, no copy, still memory-mapped, but
        # slicing them per query term no longer runs np.memmap's Python-level __array_finalize__,
        # which made every query ~50 us (11 terms) slower than on an in-memory index.
        for key in ("data", "indices", "indptr"):
            retriever.scores[key] = np.asarray(retriever.scores[key])
        manifest = index_dir / MANIFEST
        params = json.loads(manifest.read_text()) if manifest.is_file() else {}
        corpus, retriever.corpus = retriever.corpus, None  # we map rows to passages ourselves
        if corpus is None:
            raise FileNotFoundError(f"{index_dir}: corpus.jsonl missing beside the index")
        return cls(retriever, corpus, params)

    # -- searching ------------------------------------------------------------------------
    def tokenize(self, queries: Sequence[str]) -> list[list[str]]:
        """Tokenise as the index was built and keep only indexed terms (unknown terms score 0)."""
        with self._tokenize_lock:
            toks = bm25s.tokenize(
                list(queries), stopwords=STOPWORDS, stemmer=self._stemmer, return_ids=False, show_progress=False
            )
        return [[t for t in q if t in self._vocab] for q in toks]

    def search_ids(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k document rows and scores, shape ``(len(queries), k')`` with ``k' = min(k, N)``.

        Ranked by score, ties broken by lower row first (deterministic). Documents that match no
        query term are not results: their slots hold row ``-1`` and score ``0``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, self.num_docs)
        tokens = self.tokenize(queries)
        docs = np.full((len(tokens), k), -1, dtype=np.int64)
        scores = np.zeros((len(tokens), k), dtype=np.float32)
        for i, toks in enumerate(tokens):
            if toks:
                d, s = self._top_k(self._retriever.get_scores(toks), k)
                docs[i, : len(d)] = d
                scores[i, : len(s)] = s
        return docs, scores

    @staticmethod
    def _top_k(all_scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Select among the matching documents only: bm25s' argpartition over all N scores slows
        # down badly when most of them are exactly zero (measured 19x at 1M passages, see
        # benchmarks/RESULTS.md); the scores are bm25s' own, only the selection differs.
        hit = np.flatnonzero(all_scores > 0)
        hit_scores = all_scores[hit]
        if len(hit) > k:
            keep = np.argpartition(-hit_scores, k - 1)[:k]
            # include every document tied with the k-th score so the tie-break below sees them all
            kth = hit_scores[keep].min()
            keep = np.flatnonzero(hit_scores >= kth)
            hit, hit_scores = hit[keep], hit_scores[keep]
        order = np.lexsort((hit, -hit_scores))[:k]
        return hit[order], hit_scores[order]

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        """Batched search: one ranked list of passages per query."""
        docs, scores = self.search_ids(queries, k)
        out: list[list[Passage]] = []
        for row_docs, row_scores in zip(docs, scores):
            hits = []
            for rank, (d, s) in enumerate(zip(row_docs, row_scores), start=1):
                if d < 0:
                    continue
                doc = self._corpus[int(d)]
                title, text = split_contents(doc["contents"])
                hits.append(Passage(id=str(doc["id"]), title=title, text=text, score=float(s), rank=rank))
            out.append(hits)
        return out
