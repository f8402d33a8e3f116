"""Retrieval benchmark: our BM25 search vs raw bm25s vs the HTTP server vs rank_bm25.

Run (a command, not a test)::

    python -m benchmarks.retrieval [--million 1000000] [--queries 1000] [--out benchmarks/RESULTS.md]

Everything is measured side by side in one run (same queries for every system; best of ``--repeats``
on HotpotQA and ``--million-repeats`` on the synthetic corpus, repeats interleaved across systems so
drift hits all of them alike):

1. the shared HotpotQA sample (train + dev distractor samples; corpus = their de-duplicated context
   paragraphs; queries = their 600 questions), k=5: raw ``bm25s`` (tokenise + ``retrieve``) on an index
   built exactly like ours, ``BM25Index.search`` (tokenise + retrieve + passage rendering), the real
   HTTP server (``retrieval.server`` in a subprocess, ``HttpSearchEngine`` clients, sequential and
   concurrent), and ``rank_bm25.BM25Okapi`` (``get_scores`` + argsort, per query) on the same tokens;
2. a deterministic synthetic corpus of ``--million`` passages (Zipf-distributed pseudo-words): build
   time and peak RSS of ``BM25Index.build`` (measured in a child process, high-water mark reset just
   before the build), save/load times, and the same QPS comparison minus rank_bm25;
3. BM25 recall@3/@5 of the gold supporting titles on the HotpotQA sample, by split and question type.

One extra, clearly labelled "what-if" row per corpus times bm25s' own scores with the top-k taken over
the non-zero scores only (:class:`NonzeroTopK`, not library code): bm25s' numpy top-k is
``np.argpartition`` over all N scores, which is pathologically slow when most scores are 0 (ties).

The printed markdown section also replaces the ``<!-- retrieval:begin -->`` … ``<!-- retrieval:end -->``
block of ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"
DEFAULT_HOTPOT = Path("/work/shared/data/hotpotqa")
HOTPOT_FILES = ("distractor_train_sample.jsonl", "distractor_dev_sample.jsonl")
BEGIN, END = "<!-- retrieval:begin -->", "<!-- retrieval:end -->"
RESULTS_HEADER = ("# Benchmarks\n\nMeasured numbers, written by the benchmark commands in this folder; "
                  "each command rewrites only its own marked section.\n\n")
K = 5
BM25_PARAMS = {"k1": 0.9, "b": 0.4, "method": "lucene"}  # BM25Index.build defaults

# synthetic corpus
VOCAB_SIZE = 200_000
ZIPF_S = 1.05
BODY_WORDS = (60, 100)  # inclusive
TITLE_WORDS = (1, 3)
QUERY_WORDS = (3, 6)
QUERY_MIN_RANK = 100  # queries skip the 100 most frequent (stop-word-like) pseudo-words


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- memory ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return round(kib / 1024, 1) if kib is not None else float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib(hwm_reset: bool) -> float:
    """VmHWM since the last reset, or the lifetime ``ru_maxrss`` where it cannot be reset."""
    kib = _status_kib("VmHWM") if hwm_reset else None
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024, 1)


# -- timing ------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def race(systems: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Best-of-``repeats`` seconds per system (repeats interleaved across systems) and each one's last output."""
    best = {name: float("inf") for name in systems}
    last: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in systems.items():
            gc.collect()
            seconds, last[name] = timed(fn)
            best[name] = min(best[name], seconds)
    return best, last


# -- the systems -------------------------------------------------------------------------------
class RawBM25:
    """bm25s used directly, the way its README does it."""

    def __init__(self, retriever: bm25s.BM25):
        self.retriever = retriever
        self.stemmer = Stemmer.Stemmer("english")

    @classmethod
    def build(cls, texts: Sequence[str]) -> "RawBM25":
        stemmer = Stemmer.Stemmer("english")
        tokens = bm25s.tokenize(list(texts), stopwords="english", stemmer=stemmer, show_progress=False)
        retriever = bm25s.BM25(**BM25_PARAMS)
        retriever.index(tokens, show_progress=False)
        return cls(retriever)

    def search(self, queries: Sequence[str], k: int):
        tokens = bm25s.tokenize(list(queries), stopwords="english", stemmer=self.stemmer, show_progress=False)
        return self.retriever.retrieve(tokens, k=k, show_progress=False)


class NonzeroTopK:
    """What-if probe, not library code: bm25s' scores for our tokens, top-k over the non-zero scores only.

    bm25s (numpy backend) selects the top-k with ``np.argpartition`` over all N scores; with most
    scores exactly 0 (a query matches few documents) numpy's introselect degrades badly on the ties.
    Selecting among the matching documents gives the same scores in the same order; only documents
    with exactly tied scores at the k-th place may be picked or ordered differently.
    """

    def __init__(self, index):
        self.index = index
        self.retriever = index._retriever  # noqa: SLF001 - a probe of the library's internals

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.index.tokenize(queries)
        docs = np.full((len(tokens), k), -1, dtype=np.int64)
        scores = np.zeros((len(tokens), k), dtype=np.float32)
        for i, q in enumerate(tokens):
            if not q:
                continue
            s = self.retriever.get_scores(q)
            hit = np.flatnonzero(s > 0)
            if len(hit) > k:
                hit = hit[np.argpartition(s[hit], -k)[-k:]]
            hit = hit[np.argsort(-s[hit], kind="stable")]
            docs[i, :len(hit)] = hit
            scores[i, :len(hit)] = s[hit]
        return docs, scores


def top_rows(docs: np.ndarray, scores: np.ndarray) -> list[list[int]]:
    """Result rows per query, without non-matching (score 0) documents."""
    return [[int(d) for d, s in zip(dr, sr) if s > 0 and d >= 0] for dr, sr in zip(docs, scores)]


def agreement(a: list[list], b: list[list]) -> str:
    same = sum(1 for x, y in zip(a, b) if x == y)
    return f"{same}/{len(a)}"


def score_rows(scores: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 4) for x in row if x > 0] for row in scores]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``retrieval.server.serve`` (uvicorn + create_app over a loaded index) in a child process."""

    def __init__(self, index_dir: Path, log_path: Path, timeout: float = 600.0):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = ("from retrieval.server import serve; "
                f"serve({str(index_dir)!r}, host='127.0.0.1', port={self.port}, log_level='warning')")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self._log = log_path.open("wb")
        start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"search server exited with {self.proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - start > timeout:
                self.stop()
                raise RuntimeError(f"search server not healthy after {timeout:.0f}s")
            time.sleep(0.1)
        self.startup_seconds = time.perf_counter() - start

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def http_runner(url: str, queries: list[str], k: int, batch: int, clients: int) -> Callable[..., list]:
    """A callable searching every query (or the given ones) over HTTP in ``batch``-sized requests
    from ``clients`` threads, each with its own ``HttpSearchEngine`` (own connection)."""
    from retrieval.engine import HttpSearchEngine

    engines = [HttpSearchEngine(url, max_batch=batch, timeout=600) for _ in range(clients)]
    pool = ThreadPoolExecutor(max_workers=clients) if clients > 1 else None

    def run(subset: list[str] | None = None) -> list:
        qs = queries if subset is None else subset
        chunks = [qs[i:i + batch] for i in range(0, len(qs), batch)]

        def worker(c: int) -> list[tuple[int, list]]:
            return [(i, engines[c].search(chunks[i], k)) for i in range(c, len(chunks), clients)]

        if pool is None:
            parts = worker(0)
        else:
            parts = [p for f in [pool.submit(worker, c) for c in range(clients)] for p in f.result()]
        out: list = []
        for _, hits in sorted(parts, key=lambda p: p[0]):
            out.extend(hits)
        return out

    run.engines = engines  # type: ignore[attr-defined]
    run.pool = pool  # type: ignore[attr-defined]
    return run


def close_runner(run) -> None:
    for e in run.engines:
        e.close()
    if run.pool is not None:
        run.pool.shutdown()


def passage_ids(hits: list[list]) -> list[list[str]]:
    return [[p.id for p in h] for h in hits]


# -- synthetic corpus ---------------------------------------------------------------------------
def synthetic_vocab(size: int = VOCAB_SIZE, seed: int = 0) -> list[str]:
    """``size`` distinct pronounceable pseudo-words (2-4 syllables), none an English stop word."""
    from bm25s.stopwords import STOPWORDS_EN

    rng = np.random.default_rng(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = np.array([c + v for c in consonants for v in vowels]
                         + [c + v + e for c in consonants for v in vowels for e in "nrst"], dtype=object)
    stop = set(STOPWORDS_EN)
    seen: set[str] = set()
    vocab: list[str] = []
    while len(vocab) < size:
        n = 2 * size
        lengths = rng.integers(2, 5, size=n)
        parts = syllables[rng.integers(0, len(syllables), size=(n, 4))]
        for row, length in zip(parts, lengths):
            word = "".join(row[:length])
            if word not in seen and word not in stop:
                seen.add(word)
                vocab.append(word)
                if len(vocab) == size:
                    break
    return vocab


def zipf_cdf(n: int, s: float = ZIPF_S, skip: int = 0) -> np.ndarray:
    p = np.arange(skip + 1, n + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def synthetic_corpus(n: int, vocab: list[str], seed: int = 0, chunk: int = 100_000) -> list[dict]:
    """``n`` FlashRAG rows ``{"id", "contents": "Title\\ntext"}``; word ranks follow Zipf(ZIPF_S).

    Vectorised: word ids for a whole chunk come from one ``searchsorted`` over the Zipf CDF, then
    the chunk is one ``str.join`` with separator tokens split back into passages.
    """
    rng = np.random.default_rng(seed + 1)
    cdf = zipf_cdf(len(vocab))
    nl, sep = len(vocab), len(vocab) + 1
    words = np.array(vocab + ["\n", "\x00"], dtype=object)
    rows: list[dict] = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        title_len = rng.integers(TITLE_WORDS[0], TITLE_WORDS[1] + 1, size=m)
        body_len = rng.integers(BODY_WORDS[0], BODY_WORDS[1] + 1, size=m)
        per = title_len + body_len + 2  # title, "\n", body, separator
        ends = np.cumsum(per)
        starts = ends - per
        ids = np.searchsorted(cdf, rng.random(int(ends[-1]))).astype(np.int64)
        ids[starts + title_len] = nl
        ids[ends - 1] = sep
        text = " ".join(words[ids].tolist())[:-2].replace(" \n ", "\n")
        docs = text.split(" \x00 ")
        assert len(docs) == m, (len(docs), m)
        rows.extend({"id": str(start + i), "contents": d} for i, d in enumerate(docs))
    return rows


def synthetic_queries(vocab: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` queries of 3-6 words, Zipf-drawn from the vocabulary minus its QUERY_MIN_RANK commonest words."""
    rng = np.random.default_rng(seed + 2)
    cdf = zipf_cdf(len(vocab), skip=QUERY_MIN_RANK)
    lengths = rng.integers(QUERY_WORDS[0], QUERY_WORDS[1] + 1, size=n)
    ids = np.searchsorted(cdf, rng.random(int(lengths.sum()))) + QUERY_MIN_RANK
    out, pos = [], 0
    for length in lengths:
        out.append(" ".join(vocab[i] for i in ids[pos:pos + length]))
        pos += length
    return out


def dir_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


# -- child process: build + save with a clean peak-RSS measurement ------------------------------
def child_build(n: int, seed: int, index_dir: str, mode: str) -> dict:
    from retrieval.bm25 import BM25Index

    out: dict = {"mode": mode, "passages": n}
    gen_s, vocab = timed(lambda: synthetic_vocab(VOCAB_SIZE, seed))
    corpus_s, rows = timed(lambda: synthetic_corpus(n, vocab, seed))
    out["generate_seconds"] = round(gen_s + corpus_s, 2)
    out["corpus_chars"] = sum(len(r["contents"]) for r in rows)
    del vocab
    gc.collect()
    out["rss_before_mib"] = rss_mib()
    out["hwm_reset"] = hwm = reset_peak_rss()
    if mode == "ours":
        out["build_seconds"], index = timed(lambda: BM25Index.build(rows, show_progress=False))
        out["vocab_size"] = index.vocab_size
    else:
        out["build_seconds"], index = timed(lambda: RawBM25.build([r["contents"] for r in rows]))
        out["vocab_size"] = len(index.retriever.vocab_dict)
    out["peak_build_mib"] = peak_rss_mib(hwm)
    out["rss_after_build_mib"] = rss_mib()
    if mode == "ours":
        hwm = reset_peak_rss()
        out["save_seconds"], _ = timed(lambda: index.save(index_dir))
        out["peak_save_mib"] = peak_rss_mib(hwm)
    return out


def run_child_build(n: int, seed: int, index_dir: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks.retrieval", "--child-build", mode, "--million", str(n),
           "--seed", str(seed), "--child-index-dir", str(index_dir)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build child ({mode}) failed with {proc.returncode}:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["child_wall_seconds"] = round(time.perf_counter() - start, 1)
    return out


# -- benchmark sections -------------------------------------------------------------------------
def qps(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def proc_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


def race_with_http(res: dict, systems: dict[str, Callable[[], object]], index_dir: Path, log_path: Path,
                   queries: list[str], args, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Race the in-process ``systems`` and the real server (child process, 1 and ``--http-clients``
    client threads) together, repeats interleaved, so machine noise hits every system alike."""
    server = ServerProcess(index_dir, log_path)
    runners: dict = {}
    try:
        res["server_startup_seconds"] = server.startup_seconds
        warm = queries[: min(len(queries), 2 * args.http_batch)]
        runners = {f"http_c{c}": http_runner(server.url, queries, K, args.http_batch, c)
                   for c in sorted({1, args.http_clients})}
        for run in runners.values():  # open the connections, warm the server
            run(warm)
        times, out = race({**systems, **runners}, repeats)
        res["batcher"] = server.health()["batcher"]
        res["server_rss_mib"] = proc_rss_mib(server.proc.pid)
    finally:
        for run in runners.values():
            close_runner(run)
        server.stop()
    return times, out


def bench_hotpot(args, work: Path) -> dict:
    from qadata.corpus import corpus_from_questions
    from qadata.loaders import SourceSpec, load_sources
    from retrieval.bm25 import BM25Index
    from retrieval.engine import LocalSearchEngine
    from retrieval.metrics import recall_at_k

    res: dict = {}
    rows, rejected = load_sources([SourceSpec(str(Path(args.hotpot_dir) / f)) for f in HOTPOT_FILES])
    corpus, paragraphs = corpus_from_questions(rows)
    queries = [r["question"] for r in rows]
    res.update(questions=len(rows), rejected=len(rejected), passages=len(corpus), paragraphs=paragraphs,
               queries=len(queries))
    log(f"hotpot: {len(rows)} questions, {len(corpus)} passages ({paragraphs} paragraphs)")

    texts = [r["contents"] for r in corpus]
    res["build_seconds"], built = race({"ours": lambda: BM25Index.build(corpus, show_progress=False),
                                        "raw": lambda: RawBM25.build(texts)}, args.repeats)
    ours, raw = built["ours"], built["raw"]
    index_dir = work / "hotpot_index"
    res["save_seconds"], _ = timed(lambda: ours.save(index_dir))
    res["load_seconds"], loaded = timed(lambda: BM25Index.load(index_dir))
    probe = NonzeroTopK(loaded)

    log(f"hotpot: QPS race (in-process + HTTP server), best of {args.repeats}")
    times, out = race_with_http(res, {"raw": lambda: raw.search(queries, K),
                                      "ours": lambda: ours.search(queries, K),
                                      "ours_loaded": lambda: loaded.search(queries, K),
                                      "ours_ids": lambda: ours.search_ids(queries, K),
                                      "nonzero_topk": lambda: probe.search(queries, K),
                                      "ours_tokenize": lambda: ours.tokenize(queries)},
                                index_dir, work / "hotpot_server.log", queries, args, args.repeats)
    # correctness: the systems must return the same documents
    raw_rows = top_rows(*out["raw"])
    res["agree_raw_ours"] = agreement(raw_rows, top_rows(*out["ours_ids"]))
    ours_ids = passage_ids(out["ours"])
    res["agree_loaded_ours"] = agreement(passage_ids(out["ours_loaded"]), ours_ids)
    res["agree_nonzero_raw"] = agreement(top_rows(*out["nonzero_topk"]), raw_rows)
    res["agree_nonzero_raw_scores"] = agreement(score_rows(out["nonzero_topk"][1]), score_rows(out["raw"][1]))
    res["agree_http_ours"] = {n: agreement(passage_ids(out[n]), ours_ids) for n in out if n.startswith("http_")}

    # rank_bm25 on the very same tokens, one query at a time (it has no batch API)
    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        BM25Okapi = None
        res["rank_bm25"] = "not installed (pip install rank_bm25)"
    if BM25Okapi is not None:
        log("hotpot: rank_bm25")
        stemmer = Stemmer.Stemmer("english")
        doc_tokens = bm25s.tokenize(texts, stopwords="english", stemmer=stemmer, return_ids=False,
                                    show_progress=False)
        res["rank_bm25_build_seconds"], okapi = timed(
            lambda: BM25Okapi(doc_tokens, k1=BM25_PARAMS["k1"], b=BM25_PARAMS["b"]))
        subset = queries[: args.rank_bm25_queries]

        def rank_search() -> list:
            q_tokens = bm25s.tokenize(subset, stopwords="english", stemmer=stemmer, return_ids=False,
                                      show_progress=False)
            return [np.argsort(okapi.get_scores(q))[::-1][:K] for q in q_tokens]

        rank_t, _ = race({"rank_bm25": rank_search}, max(1, min(args.repeats, 2)))
        res["rank_bm25_queries"] = len(subset)
        res["rank_bm25_qps"] = qps(len(subset), rank_t["rank_bm25"])

    res["qps"] = {name: qps(len(queries), sec) for name, sec in times.items()}

    # recall of the gold supporting titles, question text as query
    log("hotpot: recall")
    engine = LocalSearchEngine(index=ours)
    groups = [("all", rows)]
    for split in ("train", "dev"):
        groups.append((f"{split} sample", [r for r in rows if r["split"] == split]))
    for qtype in ("bridge", "comparison"):
        groups.append((f"type = {qtype}", [r for r in rows if r["type"] == qtype]))
    for split in ("train", "dev"):
        for qtype in ("bridge", "comparison"):
            groups.append((f"{split} / {qtype}", [r for r in rows if r["split"] == split and r["type"] == qtype]))
    res["recall"] = [(name, len(sub), recall_at_k(engine, sub, (3, 5))) for name, sub in groups if sub]
    return res


def bench_synthetic(args, work: Path) -> dict:
    from retrieval.bm25 import BM25Index

    n = args.million
    res: dict = {"passages": n}
    index_dir = work / "synthetic_index"
    log(f"synthetic: generating + building {n:,} passages in a child process (BM25Index.build)")
    res["ours_build"] = run_child_build(n, args.seed, index_dir, "ours")
    log(f"synthetic: ours build {res['ours_build']['build_seconds']:.1f}s, "
        f"peak {res['ours_build']['peak_build_mib']:.0f} MiB")
    if args.raw_build:
        log("synthetic: raw bm25s build in a child process")
        res["raw_build"] = run_child_build(n, args.seed, work / "unused", "raw")
    res["index_mib"] = dir_mib(index_dir)

    vocab = synthetic_vocab(VOCAB_SIZE, args.seed)
    queries = synthetic_queries(vocab, args.queries, args.seed)
    del vocab
    res["queries"] = len(queries)
    res["example_queries"] = queries[:3]

    gc.collect()
    rss0 = rss_mib()
    res["load_seconds"], ours = timed(lambda: BM25Index.load(index_dir))
    res["rss_after_load_delta_mib"] = round(rss_mib() - rss0, 1)
    # raw bm25s loads the very same saved matrices, into memory (its default, no mmap)
    res["raw_load_seconds"], raw = timed(lambda: RawBM25(bm25s.BM25.load(str(index_dir))))
    probe = NonzeroTopK(ours)

    warm = queries[: min(20, len(queries))]
    for system in (raw, ours, probe):
        system.search(warm, K)
    log(f"synthetic: QPS race over {len(queries)} queries (in-process + HTTP server), best of {args.million_repeats}")
    times, out = race_with_http(res, {"raw": lambda: raw.search(queries, K),
                                      "ours": lambda: ours.search(queries, K),
                                      "nonzero_topk": lambda: probe.search(queries, K)},
                                index_dir, work / "synthetic_server.log", queries, args, args.million_repeats)
    raw_rows = top_rows(*out["raw"])
    ours_ids = passage_ids(out["ours"])
    res["agree_raw_ours"] = agreement(raw_rows, [[int(i) for i in row] for row in ours_ids])
    res["agree_nonzero_raw"] = agreement(top_rows(*out["nonzero_topk"]), raw_rows)
    res["agree_nonzero_raw_scores"] = agreement(score_rows(out["nonzero_topk"][1]), score_rows(out["raw"][1]))
    res["match_fraction"] = round(float(np.mean([(ours._retriever.get_scores(q) > 0).mean()  # noqa: SLF001
                                                 for q in ours.tokenize(queries[:50]) if q])), 4)
    res["agree_http_ours"] = {n: agreement(passage_ids(out[n]), ours_ids) for n in out if n.startswith("http_")}
    res["rss_after_queries_delta_mib"] = round(rss_mib() - rss0, 1)
    res["qps"] = {name: qps(len(queries), sec) for name, sec in times.items()}
    return res


# -- report ------------------------------------------------------------------------------------
def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) / 2**20
    except (OSError, IndexError, ValueError):
        pass
    versions = {}
    for dist in ("bm25s", "numpy", "scipy", "PyStemmer", "rank_bm25", "fastapi", "uvicorn", "httpx", "orjson"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "absent" if dist == "orjson" else "not installed"
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "mem_gib": round(mem, 1) if mem else None, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "loadavg_start": load}


def fmt_qps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def check(value: float, target: float) -> str:
    return f"≥ {target:g}: **{'met' if value >= target else 'MISSED'}**"


def qps_table(q: dict, rows: list[tuple[str, str]]) -> list[str]:
    out = ["| system | QPS | vs raw bm25s |", "|---|---:|---:|"]
    for label, key in rows:
        if key in q:
            out.append(f"| {label} | {fmt_qps(q[key])} | {q[key] / q['raw']:.2f} |")
    return out


def observations(hotpot: dict | None, synth: dict | None, args) -> list[str]:
    us = lambda x: 1e6 / x  # noqa: E731 - QPS -> microseconds per query
    out = []
    if synth:
        q = synth["qps"]
        share = 1 - us(q["nonzero_topk"]) / us(q["raw"])
        out.append(f"At {synth['passages']:,} passages a query costs {us(q['raw']) / 1000:.1f} ms in raw bm25s "
                   f"({us(q['ours']) / 1000:.1f} ms in ours); about {share:.0%} of it is bm25s' numpy top-k "
                   f"(`np.argpartition` over all {synth['passages']:,} scores, most of them exactly 0 — numpy's "
                   f"selection degrades on such ties; share = 1 − what-if time / raw time). Taking the top-k over the non-zero scores only (what-if row) is "
                   f"{q['nonzero_topk'] / q['raw']:.0f}x faster, with identical top-{K} scores for "
                   f"{synth['agree_nonzero_raw_scores']} queries (only tied documents may differ).")
    if hotpot:
        q = hotpot["qps"]
        out.append(f"HotpotQA: passage rendering costs {us(q['ours']) - us(q['ours_ids']):.0f} µs/query on the built "
                   f"index and {us(q['ours_loaded']) - us(q['ours_ids']):.0f} µs/query on the loaded one (each hit's "
                   f"corpus.jsonl line is JSON-parsed), against {us(q['raw']):.0f} µs/query for raw bm25s' whole "
                   f"search; `search_ids` alone runs at {q['ours_ids'] / q['raw']:.2f}x raw. The what-if top-k is "
                   f"{q['nonzero_topk'] / q['raw']:.1f}x raw here too.")
        best_http = max(q["http_c1"], q[f"http_c{args.http_clients}"])
        out.append(f"HotpotQA over HTTP: {us(best_http) - us(q['ours_loaded']):.0f} µs/query on top of the loaded "
                   f"index's in-process search (request/response JSON, the client rebuilding `Passage`s, client and "
                   f"server competing for 2 cores); at {synth['passages']:,} passages the same overhead is small "
                   f"against the search itself." if synth else
                   f"HotpotQA over HTTP: {us(best_http) - us(q['ours_loaded']):.0f} µs/query on top of the loaded "
                   f"index's in-process search.")
    return out


def render(args, machine: dict, hotpot: dict | None, synth: dict | None, total_s: float) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    v = machine["versions"]
    c = args.http_clients
    load = machine["loadavg_start"]
    L = [BEGIN, "## Retrieval (BM25)", "",
         f"Measured {now} in one run of `python -m benchmarks.retrieval --million {args.million} "
         f"--queries {args.queries}` ({total_s / 60:.1f} min wall).",
         "",
         f"- Machine: {machine['usable_cores']} cores ({machine['cpu']}), {machine['mem_gib']} GiB RAM, "
         f"Python {machine['python']}, {machine['platform']}; "
         + ", ".join(f"{k} {x}" for k, x in v.items())
         + (f". Load average at start {load[0]:.2f} (the machine was shared with other work, so timings "
            "carry some noise)." if load else "."),
         f"- QPS = queries per second over the whole query set, k={K}, same queries for every system, "
         f"best of {args.repeats} repeats on HotpotQA and of {args.million_repeats} on the synthetic corpus, "
         f"every system (HTTP included) interleaved within each repeat. Raw bm25s = `bm25s.tokenize(..., stopwords=\"english\", "
         f"stemmer=Stemmer.Stemmer(\"english\"))` + `BM25.retrieve(k={K})` (numpy backend, 1 thread) on "
         f"an index built the same way (k1=0.9, b=0.4, lucene).",
         f"- HTTP = the real `retrieval.server` (`serve()`: uvicorn, 1 worker, micro-batcher) in a child "
         f"process on 127.0.0.1 over the saved index; `HttpSearchEngine` clients, {args.http_batch} queries "
         f"per request, 1 client or {c} concurrent client threads; client and server share the same cores.",
         ""]
    if hotpot:
        h = hotpot
        q = h["qps"]
        L += [f"### 1. HotpotQA sample: {h['passages']:,} passages, {h['queries']} questions as queries", ""]
        L += qps_table(q, [
            ("raw bm25s: `bm25s.tokenize` + `retrieve`", "raw"),
            ("ours: `BM25Index.search` (tokenise + retrieve + passages), built index", "ours"),
            ("ours: `BM25Index.search`, index loaded from disk (mmap, as served)", "ours_loaded"),
            ("ours: `BM25Index.search_ids` (no passages)", "ours_ids"),
            ("HTTP `/search`, 1 client", "http_c1"),
            (f"HTTP `/search`, {c} concurrent clients", f"http_c{c}"),
            ("what-if (not library code): bm25s scores, top-k over non-zero scores only", "nonzero_topk")])
        if "rank_bm25_qps" in h:
            L.append(f"| rank_bm25 `BM25Okapi.get_scores` + argsort, per query ({h['rank_bm25_queries']} queries) "
                     f"| {fmt_qps(h['rank_bm25_qps'])} | {h['rank_bm25_qps'] / q['raw']:.3f} |")
        best_http = max(q["http_c1"], q[f"http_c{c}"])
        L += ["", "| ratio | value | target |", "|---|---:|---|",
              f"| ours / raw bm25s | {q['ours'] / q['raw']:.2f} | {check(q['ours'] / q['raw'], 0.9)} |",
              f"| HTTP (better of 1 / {c} clients) / raw bm25s | {best_http / q['raw']:.2f} | "
              f"{check(best_http / q['raw'], 0.8)} |"]
        if "rank_bm25_qps" in h:
            r = q["ours"] / h["rank_bm25_qps"]
            L.append(f"| ours / rank_bm25 | {r:.1f} | {check(r, 50)} |")
        else:
            L.append(f"| ours / rank_bm25 | – | {h.get('rank_bm25')} |")
        b = h["build_seconds"]
        L += ["", f"Build (best of {args.repeats}): ours {b['ours']:.2f} s, raw bm25s {b['raw']:.2f} s"
              + (f", rank_bm25 {h['rank_bm25_build_seconds']:.2f} s" if "rank_bm25_build_seconds" in h else "")
              + f"; save {h['save_seconds']:.2f} s, load {h['load_seconds']:.2f} s, server start-up "
              f"(process start → healthy) {h['server_startup_seconds']:.1f} s, server RSS {h['server_rss_mib']:,.0f} MiB. "
              f"Tokenising the {h['queries']} queries alone: {fmt_qps(q['ours_tokenize'])} QPS. "
              f"Identical top-{K} documents: raw vs ours {h['agree_raw_ours']}, loaded vs built "
              f"{h['agree_loaded_ours']}, HTTP vs in-process "
              + ", ".join(f"{x}" for x in h["agree_http_ours"].values())
              + f"; what-if vs raw {h['agree_nonzero_raw']} (same scores {h['agree_nonzero_raw_scores']}). "
              f"Server micro-batcher: {h['batcher']['queries']:,} queries in {h['batcher']['calls']:,} index calls.",
              ""]
    if synth:
        s = synth
        ob = s["ours_build"]
        q = s["qps"]
        L += [f"### 2. Synthetic corpus: {s['passages']:,} passages, {s['queries']:,} generated queries", "",
              f"Deterministic (seed {args.seed}): {VOCAB_SIZE:,} pseudo-words, Zipf(s={ZIPF_S}) word ranks, "
              f"{TITLE_WORDS[0]}-{TITLE_WORDS[1]} title words + {BODY_WORDS[0]}-{BODY_WORDS[1]} body words per "
              f"passage (\"Title\\ntext\"), {ob['corpus_chars'] / 2**20:,.0f} MiB of text. Queries: "
              f"{QUERY_WORDS[0]}-{QUERY_WORDS[1]} words Zipf-drawn from the vocabulary minus its {QUERY_MIN_RANK} "
              f"commonest words (e.g. \"{s['example_queries'][0]}\"); a query matches {s['match_fraction']:.1%} "
              f"of the passages on average. rank_bm25 is skipped at this size (pure-Python scoring of every "
              f"document per query term, and its per-document dicts would not fit comfortably in memory).", "",
              "| build / storage | value |", "|---|---:|",
              f"| generate the corpus (numpy, in the build child) | {ob['generate_seconds']:.1f} s |",
              f"| `BM25Index.build` (child process) | {ob['build_seconds']:.1f} s "
              f"({ob['passages'] / ob['build_seconds']:,.0f} passages/s) |",
              f"| peak RSS during the build (VmHWM reset just before it) | {ob['peak_build_mib']:,.0f} MiB |",
              f"| RSS before the build (generated corpus in memory) → peak delta | {ob['rss_before_mib']:,.0f} MiB → "
              f"+{ob['peak_build_mib'] - ob['rss_before_mib']:,.0f} MiB |",
              f"| RSS after the build (corpus + index) | {ob['rss_after_build_mib']:,.0f} MiB |",
              f"| vocabulary (stemmed terms) | {ob['vocab_size']:,} |",
              f"| `BM25Index.save` (peak RSS during save) | {ob['save_seconds']:.1f} s ({ob['peak_save_mib']:,.0f} MiB) |",
              f"| index directory on disk (matrices + corpus.jsonl) | {s['index_mib']:,.0f} MiB |",
              f"| `BM25Index.load` (mmap) | {s['load_seconds']:.2f} s |",
              f"| raw `bm25s.BM25.load` of the same directory (into memory, no corpus) | {s['raw_load_seconds']:.2f} s |",
              f"| RSS delta after `BM25Index.load` / after all in-process queries (incl. raw bm25s' in-memory "
              f"copy of the matrices and the touched mmap pages) | "
              f"+{s['rss_after_load_delta_mib']:,.0f} MiB / +{s['rss_after_queries_delta_mib']:,.0f} MiB |",
              f"| server start-up (process start → healthy) / server RSS after the run | "
              f"{s['server_startup_seconds']:.1f} s / {s['server_rss_mib']:,.0f} MiB |"]
        if "raw_build" in s:
            rb = s["raw_build"]
            L.append(f"| raw bm25s build (`tokenize` + `index`, same child setup) | {rb['build_seconds']:.1f} s, "
                     f"peak {rb['peak_build_mib']:,.0f} MiB (from {rb['rss_before_mib']:,.0f}) |")
        else:
            L.append("| raw bm25s build | not run (`--raw-build`; `BM25Index.build` is bm25s `tokenize` + "
                     "`index` plus a list copy of the rows, compared on HotpotQA above) |")
        L += [""]
        L += qps_table(q, [("raw bm25s (`bm25s.BM25.load` of the same directory, in memory)", "raw"),
                           ("ours: `BM25Index.search` (loaded, mmap)", "ours"),
                           ("HTTP `/search`, 1 client", "http_c1"),
                           (f"HTTP `/search`, {c} concurrent clients", f"http_c{c}"),
                           ("what-if (not library code): bm25s scores, top-k over non-zero scores only",
                            "nonzero_topk")])
        L.append("| rank_bm25 | skipped | – |")
        best_http = max(q["http_c1"], q[f"http_c{c}"])
        L += ["", "| ratio | value | target |", "|---|---:|---|",
              f"| ours / raw bm25s | {q['ours'] / q['raw']:.2f} | {check(q['ours'] / q['raw'], 0.9)} |",
              f"| HTTP (better of 1 / {c} clients) / raw bm25s | {best_http / q['raw']:.2f} | "
              f"{check(best_http / q['raw'], 0.8)} |",
              "", f"Identical top-{K} documents: raw vs ours {s['agree_raw_ours']}, HTTP vs in-process "
              + ", ".join(f"{x}" for x in s["agree_http_ours"].values())
              + f"; what-if vs raw {s['agree_nonzero_raw']} (same scores {s['agree_nonzero_raw_scores']}; "
              f"synthetic passages tie often, and ties at the k-th place may resolve differently). "
              f"Server micro-batcher: {s['batcher']['queries']:,} queries in {s['batcher']['calls']:,} index calls.",
              ""]
    if hotpot:
        L += ["### 3. Recall of the gold supporting titles (HotpotQA sample, question as query, BM25 over the "
              "sample's own corpus, `retrieval.metrics.recall_at_k` with `LocalSearchEngine`)",
              "", "| subset | questions | recall@3 | recall@5 |", "|---|---:|---:|---:|"]
        for name, n, rec in hotpot["recall"]:
            L.append(f"| {name} | {n} | {rec[3]:.3f} | {rec[5]:.3f} |")
        L.append("")
    notes = observations(hotpot, synth, args)
    if notes:
        L += ["### Observations (computed from the numbers above)", ""] + [f"- {n}" for n in notes] + [""]
    L += ["Re-run (about 10-15 min on 2 cores): `PYTHONPATH=. python -m benchmarks.retrieval --million 1000000 "
          "--queries 1000` (`--million 0` skips the synthetic part, `--no-write` only prints; `--help`).", END]
    return "\n".join(L) + "\n"


def write_section(path: Path, section: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else RESULTS_HEADER
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + section.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--million", type=int, default=1_000_000, help="synthetic corpus size (0 skips that part)")
    p.add_argument("--queries", type=int, default=1000, help="generated queries for the synthetic corpus")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results file (its marked section is replaced)")
    p.add_argument("--repeats", type=int, default=7, help="best-of-N repeats on HotpotQA")
    p.add_argument("--million-repeats", type=int, default=1,
                   help="best-of-N repeats on the synthetic corpus (one pass of 1,000 queries over 1M "
                        "passages takes about a minute per system)")
    p.add_argument("--http-batch", type=int, default=256,
                   help="queries per HTTP request (HttpSearchEngine's default max_batch)")
    p.add_argument("--http-clients", type=int, default=4, help="concurrent HTTP client threads")
    p.add_argument("--rank-bm25-queries", type=int, default=600, help="HotpotQA queries timed for rank_bm25")
    p.add_argument("--raw-build", action=argparse.BooleanOptionalAction, default=False,
                   help="also time a raw bm25s build of the synthetic corpus (another child process, ~4 min at 1M)")
    p.add_argument("--hotpot-dir", default=str(DEFAULT_HOTPOT))
    p.add_argument("--skip-hotpot", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    p.add_argument("--no-write", action="store_true", help="print only; leave --out alone")
    p.add_argument("--child-build", choices=["ours", "raw"], help=argparse.SUPPRESS)
    p.add_argument("--child-index-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child_build:
        out = child_build(args.million, args.seed, args.child_index_dir, args.child_build)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_retrieval_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        machine = machine_info()
        hotpot = None if args.skip_hotpot else bench_hotpot(args, work)
        synth = bench_synthetic(args, work) if args.million > 0 else None
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    section = render(args, machine, hotpot, synth, time.perf_counter() - start)
    print(section)
    if not args.no_write:
        write_section(args.out, section)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
