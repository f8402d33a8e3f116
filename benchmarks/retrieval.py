"""Retrieval benchmark: our BM25 search vs raw bm25s vs the HTTP server vs rank_bm25.

Run (a command, not a test)::

    python -m benchmarks.retrieval [--million 1000000] [--queries 1000] [--out benchmarks/RESULTS.md]

Everything is measured side by side in one run, best of ``--repeats`` (same queries for every system,
repeats interleaved across systems so drift hits all of them alike):

1. the shared HotpotQA sample (train + dev distractor samples; corpus = their de-duplicated context
   paragraphs; queries = their 600 questions), k=5: raw ``bm25s`` (tokenise + ``retrieve``) on an index
   built exactly like ours, ``BM25Index.search`` (tokenise + retrieve + passage rendering), the real
   HTTP server (``retrieval.server`` in a subprocess, ``HttpSearchEngine`` clients, sequential and
   concurrent), and ``rank_bm25.BM25Okapi`` (``get_scores`` + argsort, per query) on the same tokens;
2. a deterministic synthetic corpus of ``--million`` passages (Zipf-distributed pseudo-words): build
   time and peak RSS of ``BM25Index.build`` (measured in a child process, high-water mark reset just
   before the build), save/load times, and the same QPS comparison minus rank_bm25;
3. BM25 recall@3/@5 of the gold supporting titles on the HotpotQA sample, by split and question type.

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


def race(systems: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per system, repeats interleaved across systems."""
    best = {name: float("inf") for name in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            gc.collect()
            seconds, _ = timed(fn)
            best[name] = min(best[name], seconds)
    return best


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


def top_rows(docs: np.ndarray, scores: np.ndarray) -> list[list[int]]:
    """Result rows per query, without non-matching (score 0) documents."""
    return [[int(d) for d, s in zip(dr, sr) if s > 0 and d >= 0] for dr, sr in zip(docs, scores)]


def agreement(a: list[list], b: list[list]) -> str:
    same = sum(1 for x, y in zip(a, b) if x == y)
    return f"{same}/{len(a)}"


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


def http_runner(url: str, queries: list[str], k: int, batch: int, clients: int) -> Callable[[], list]:
    """A callable searching every query over HTTP in ``batch``-sized requests from ``clients`` threads."""
    from retrieval.engine import HttpSearchEngine

    chunks = [queries[i:i + batch] for i in range(0, len(queries), batch)]
    engines = [HttpSearchEngine(url, max_batch=batch, timeout=600) for _ in range(clients)]
    pool = ThreadPoolExecutor(max_workers=clients) if clients > 1 else None

    def worker(c: int) -> list[tuple[int, list]]:
        return [(i, engines[c].search(chunks[i], k)) for i in range(c, len(chunks), clients)]

    def run() -> list:
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
    out["child_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return out


# -- benchmark sections -------------------------------------------------------------------------
def qps(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


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
    res.update(questions=len(rows), rejected=len(rejected), passages=len(corpus), paragraphs=paragraphs)
    log(f"hotpot: {len(rows)} questions, {len(corpus)} passages ({paragraphs} paragraphs)")

    texts = [r["contents"] for r in corpus]
    builds = race({"ours": lambda: BM25Index.build(corpus, show_progress=False),
                   "raw": lambda: RawBM25.build(texts)}, args.repeats)
    res["build_seconds"] = builds
    ours = BM25Index.build(corpus, show_progress=False)
    raw = RawBM25.build(texts)
    index_dir = work / "hotpot_index"
    res["save_seconds"], _ = timed(lambda: ours.save(index_dir))
    res["load_seconds"], loaded = timed(lambda: BM25Index.load(index_dir))

    # correctness: every system must return the same documents
    rd, rs = raw.search(queries, K)
    od, os_ = ours.search_ids(queries, K)
    res["agree_raw_ours"] = agreement(top_rows(rd, rs), top_rows(od, os_))
    ours_ids = passage_ids(ours.search(queries, K))
    res["agree_loaded_ours"] = agreement(passage_ids(loaded.search(queries, K)), ours_ids)

    log(f"hotpot: QPS race, best of {args.repeats}")
    times = race({"raw": lambda: raw.search(queries, K),
                  "ours": lambda: ours.search(queries, K),
                  "ours_loaded": lambda: loaded.search(queries, K),
                  "ours_ids": lambda: ours.search_ids(queries, K),
                  "ours_tokenize": lambda: ours.tokenize(queries)}, args.repeats)

    log("hotpot: HTTP server")
    server = ServerProcess(index_dir, work / "hotpot_server.log")
    try:
        res["server_startup_seconds"] = server.startup_seconds
        runners = {f"http_c{c}": http_runner(server.url, queries, K, args.http_batch, c)
                   for c in sorted({1, args.http_clients})}
        for run in runners.values():
            run()  # warm-up (connections, page cache)
        res["agree_http_ours"] = agreement(passage_ids(runners["http_c1"]()), ours_ids)
        times.update(race(runners, args.repeats))
        res["batcher"] = server.health()["batcher"]
        for run in runners.values():
            close_runner(run)
    finally:
        server.stop()

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
        res["rank_bm25_build_seconds"], okapi = timed(lambda: BM25Okapi(doc_tokens, k1=BM25_PARAMS["k1"],
                                                                         b=BM25_PARAMS["b"]))
        subset = queries[: args.rank_bm25_queries]

        def rank_search() -> list:
            q_tokens = bm25s.tokenize(subset, stopwords="english", stemmer=stemmer, return_ids=False,
                                      show_progress=False)
            return [np.argsort(okapi.get_scores(q))[::-1][:K] for q in q_tokens]

        rank_s = race({"rank_bm25": rank_search}, max(1, min(args.repeats, 2)))["rank_bm25"]
        res["rank_bm25_queries"] = len(subset)
        res["rank_bm25_qps"] = qps(len(subset), rank_s)

    res["qps"] = {name: qps(len(queries), s) for name, s in times.items()}
    res["queries"] = len(queries)

    # recall of the gold supporting titles, question text as query
    log("hotpot: recall")
    engine = LocalSearchEngine(index=ours)
    groups = [("all", rows)]
    for split in ("train", "dev"):
        groups.append((f"{split} sample", [r for r in rows if r["split"] == split]))
    for qtype in ("bridge", "comparison"):
        groups.append((f"type={qtype}", [r for r in rows if r["type"] == qtype]))
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
    res["load_seconds_first"], ours = timed(lambda: BM25Index.load(index_dir))
    del ours
    gc.collect()
    res["load_seconds"], ours = timed(lambda: BM25Index.load(index_dir))
    res["rss_after_load_delta_mib"] = round(rss_mib() - rss0, 1)
    raw = RawBM25(bm25s.BM25.load(str(index_dir), mmap=True))  # the very same saved matrices

    warm = queries[: min(50, len(queries))]
    raw.search(warm, K)
    ours.search(warm, K)
    rd, rs = raw.search(queries, K)
    od, os_ = ours.search_ids(queries, K)
    res["agree_raw_ours"] = agreement(top_rows(rd, rs), top_rows(od, os_))
    ours_ids = passage_ids(ours.search(queries, K))
    res["rss_after_queries_delta_mib"] = round(rss_mib() - rss0, 1)

    log(f"synthetic: QPS race, best of {args.repeats}")
    times = race({"raw": lambda: raw.search(queries, K),
                  "ours": lambda: ours.search(queries, K),
                  "ours_ids": lambda: ours.search_ids(queries, K)}, args.repeats)

    log("synthetic: HTTP server")
    server = ServerProcess(index_dir, work / "synthetic_server.log")
    try:
        res["server_startup_seconds"] = server.startup_seconds
        runners = {f"http_c{c}": http_runner(server.url, queries, K, args.http_batch, c)
                   for c in sorted({1, args.http_clients})}
        first = runners["http_c1"]
        first(), runners[f"http_c{args.http_clients}"]()  # warm-up
        res["agree_http_ours"] = agreement(passage_ids(first()), ours_ids)
        times.update(race(runners, args.repeats))
        res["batcher"] = server.health()["batcher"]
        for run in runners.values():
            close_runner(run)
    finally:
        server.stop()
    res["qps"] = {name: qps(len(queries), s) for name, s in times.items()}
    return res


# -- report ------------------------------------------------------------------------------------
def machine_info() -> dict:
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
    import scipy  # noqa: F401 - version only

    versions = {"bm25s": bm25s.__version__, "numpy": np.__version__, "scipy": sys.modules["scipy"].__version__}
    try:
        import rank_bm25  # noqa: F401
        from importlib.metadata import version

        versions["rank_bm25"] = version("rank_bm25")
    except Exception:  # noqa: BLE001
        pass
    for mod in ("fastapi", "uvicorn", "httpx"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:  # noqa: BLE001
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "mem_gib": round(mem, 1) if mem else None, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def fmt_qps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def check(value: float, target: float) -> str:
    return f"≥ {target:g}: **{'met' if value >= target else 'MISSED'}**"


def render(args, machine: dict, hotpot: dict | None, synth: dict | None, total_s: float) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    v = machine["versions"]
    L = [BEGIN, "## Retrieval (BM25)", "",
         f"Measured {now} in one run of `python -m benchmarks.retrieval --million {args.million} "
         f"--queries {args.queries}` ({total_s / 60:.1f} min wall). "
         f"Machine: {machine['usable_cores']} cores ({machine['cpu']}), {machine['mem_gib']} GiB RAM, "
         f"Python {machine['python']}, " + ", ".join(f"{k} {x}" for k, x in v.items()) + ". "
         f"QPS = queries per second, best of {args.repeats} interleaved repeats, k={K}, same queries for every system; "
         f"HTTP = `retrieval.server` (uvicorn, 1 worker) in a child process on 127.0.0.1, `HttpSearchEngine` "
         f"clients with {args.http_batch} queries per request, client and server sharing the same cores.",
         ""]
    if hotpot:
        h = hotpot
        q = h["qps"]
        L += [f"### 1. HotpotQA sample: {h['passages']:,} passages, {h['queries']} questions as queries", "",
              "| system | QPS | vs raw bm25s |", "|---|---:|---:|"]
        rows = [("raw bm25s: `bm25s.tokenize` + `retrieve` (numpy backend)", "raw"),
                ("ours: `BM25Index.search` (tokenise + retrieve + passages), built index", "ours"),
                ("ours: `BM25Index.search`, index loaded from disk (mmap, as served)", "ours_loaded"),
                ("ours: `BM25Index.search_ids` (no passage rendering)", "ours_ids"),
                ("HTTP `/search`, 1 client", "http_c1"),
                (f"HTTP `/search`, {args.http_clients} concurrent clients", f"http_c{args.http_clients}")]
        for label, key in rows:
            if key in q:
                L.append(f"| {label} | {fmt_qps(q[key])} | {q[key] / q['raw']:.2f} |")
        if "rank_bm25_qps" in h:
            L.append(f"| rank_bm25 `BM25Okapi.get_scores` + argsort, per query ({h['rank_bm25_queries']} queries) "
                     f"| {fmt_qps(h['rank_bm25_qps'])} | {h['rank_bm25_qps'] / q['raw']:.3f} |")
        best_http = max(q["http_c1"], q[f"http_c{args.http_clients}"])
        L += ["", "| ratio | value | target |", "|---|---:|---|",
              f"| ours / raw bm25s | {q['ours'] / q['raw']:.2f} | {check(q['ours'] / q['raw'], 0.9)} |",
              f"| HTTP (best of 1 / {args.http_clients} clients) / raw bm25s | {best_http / q['raw']:.2f} | "
              f"{check(best_http / q['raw'], 0.8)} |",
              f"| HTTP 1 client / raw bm25s | {q['http_c1'] / q['raw']:.2f} | (info) |"]
        if "rank_bm25_qps" in h:
            r = q["ours"] / h["rank_bm25_qps"]
            L.append(f"| ours / rank_bm25 | {r:.1f} | {check(r, 50)} |")
        else:
            L.append(f"| ours / rank_bm25 | – | {h.get('rank_bm25')} |")
        b = h["build_seconds"]
        L += ["", f"Build (best of {args.repeats}): ours {b['ours']:.2f} s, raw bm25s {b['raw']:.2f} s"
              + (f", rank_bm25 {h['rank_bm25_build_seconds']:.2f} s" if "rank_bm25_build_seconds" in h else "")
              + f"; save {h['save_seconds']:.2f} s, load {h['load_seconds']:.2f} s, "
              f"server start-up (process start → healthy) {h['server_startup_seconds']:.1f} s; "
              f"tokenising the {h['queries']} queries alone: {fmt_qps(q['ours_tokenize'])} QPS. "
              f"Identical top-{K} results: raw vs ours {h['agree_raw_ours']}, loaded vs built "
              f"{h['agree_loaded_ours']}, HTTP vs in-process {h['agree_http_ours']}. "
              f"Server micro-batcher: {h['batcher']['queries']:,} queries in {h['batcher']['calls']:,} index calls.",
              ""]
    if synth:
        s = synth
        ob = s["ours_build"]
        q = s["qps"]
        L += [f"### 2. Synthetic corpus: {s['passages']:,} passages, {s['queries']:,} generated queries", "",
              f"Deterministic (seed {args.seed}): {VOCAB_SIZE:,} pseudo-words, Zipf(s={ZIPF_S}) word ranks, "
              f"{TITLE_WORDS[0]}-{TITLE_WORDS[1]} title words + {BODY_WORDS[0]}-{BODY_WORDS[1]} body words per "
              f"passage (\"Title\\ntext\"), {ob['corpus_chars'] / 2**20:,.0f} MiB of text; queries are "
              f"{QUERY_WORDS[0]}-{QUERY_WORDS[1]} words Zipf-drawn from the vocabulary minus its {QUERY_MIN_RANK} "
              f"commonest words (e.g. \"{s['example_queries'][0]}\"). rank_bm25 is skipped at this size "
              f"(pure-Python per-query scoring over {s['passages']:,} documents; it would take hours).", "",
              "| build / storage | value |", "|---|---:|",
              f"| generate corpus (numpy, child process) | {ob['generate_seconds']:.1f} s |",
              f"| `BM25Index.build` | {ob['build_seconds']:.1f} s ({ob['passages'] / ob['build_seconds']:,.0f} passages/s) |",
              f"| peak RSS during build (high-water mark reset before build) | {ob['peak_build_mib']:,.0f} MiB |",
              f"| RSS before build (corpus in memory) → peak delta | {ob['rss_before_mib']:,.0f} MiB → "
              f"+{ob['peak_build_mib'] - ob['rss_before_mib']:,.0f} MiB |",
              f"| RSS after build (corpus + index) | {ob['rss_after_build_mib']:,.0f} MiB |",
              f"| vocabulary (stemmed terms) | {ob['vocab_size']:,} |",
              f"| `BM25Index.save` (peak RSS during save) | {ob['save_seconds']:.1f} s ({ob['peak_save_mib']:,.0f} MiB) |",
              f"| index directory on disk (matrices + corpus.jsonl) | {s['index_mib']:,.0f} MiB |",
              f"| `BM25Index.load` first (mmap; builds corpus line index) / again | {s['load_seconds_first']:.2f} s / "
              f"{s['load_seconds']:.2f} s |",
              f"| RSS delta after load / after {s['queries']:,} queries | +{s['rss_after_load_delta_mib']:,.0f} MiB / "
              f"+{s['rss_after_queries_delta_mib']:,.0f} MiB |",
              f"| server start-up (process start → healthy) | {s['server_startup_seconds']:.1f} s |"]
        if "raw_build" in s:
            rb = s["raw_build"]
            L.append(f"| raw bm25s build (`tokenize` + `index`, same child setup) | {rb['build_seconds']:.1f} s, "
                     f"peak {rb['peak_build_mib']:,.0f} MiB (from {rb['rss_before_mib']:,.0f}) |")
        L += ["", "| system (index loaded from disk, mmap) | QPS | vs raw bm25s |", "|---|---:|---:|"]
        for label, key in [("raw bm25s (`bm25s.BM25.load` of the same directory)", "raw"),
                           ("ours: `BM25Index.search`", "ours"),
                           ("ours: `BM25Index.search_ids`", "ours_ids"),
                           ("HTTP `/search`, 1 client", "http_c1"),
                           (f"HTTP `/search`, {args.http_clients} concurrent clients", f"http_c{args.http_clients}")]:
            if key in q:
                L.append(f"| {label} | {fmt_qps(q[key])} | {q[key] / q['raw']:.2f} |")
        L.append("| rank_bm25 | skipped | – |")
        best_http = max(q["http_c1"], q[f"http_c{args.http_clients}"])
        L += ["", f"Ratios: ours / raw {q['ours'] / q['raw']:.2f} ({check(q['ours'] / q['raw'], 0.9)}); "
              f"HTTP / raw {best_http / q['raw']:.2f} ({check(best_http / q['raw'], 0.8)}). "
              f"Identical top-{K}: raw vs ours {s['agree_raw_ours']}, HTTP vs in-process {s['agree_http_ours']}. "
              f"Server micro-batcher: {s['batcher']['queries']:,} queries in {s['batcher']['calls']:,} index calls.",
              ""]
    if hotpot:
        L += ["### 3. Recall of gold supporting titles (HotpotQA sample, question as query, BM25 over the sample corpus)",
              "", "| subset | questions | recall@3 | recall@5 |", "|---|---:|---:|---:|"]
        for name, n, rec in hotpot["recall"]:
            L.append(f"| {name} | {n} | {rec[3]:.3f} | {rec[5]:.3f} |")
        L.append("")
    L += ["Re-run: `PYTHONPATH=. python -m benchmarks.retrieval --million 1000000 --queries 1000` "
          "(`--million 0` skips the synthetic part; `--help` for the rest).", END]
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
    p.add_argument("--repeats", type=int, default=3, help="best-of-N repeats")
    p.add_argument("--http-batch", type=int, default=64, help="queries per HTTP request")
    p.add_argument("--http-clients", type=int, default=4, help="concurrent HTTP client threads")
    p.add_argument("--rank-bm25-queries", type=int, default=600, help="HotpotQA queries timed for rank_bm25")
    p.add_argument("--raw-build", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a raw bm25s build of the synthetic corpus (another child process)")
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
