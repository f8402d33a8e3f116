"""Measurement harness of the retrieval benchmark: memory, timing, the systems raced, the HTTP
server process and the synthetic corpus."""

from __future__ import annotations

import gc
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from qadata.paths import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"
DEFAULT_HOTPOT = SHARED_DATA / "hotpotqa"
HOTPOT_FILES = ("distractor_train_sample.jsonl", "distractor_dev_sample.jsonl")
BEGIN, END = "<!-- retrieval:begin -->", "<!-- retrieval:end -->"
RESULTS_HEADER = (
    "# Benchmarks\n\nMeasured numbers, written by the benchmark commands in this folder; "
    "each command rewrites only its own marked section.\n\n"
)
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
    def build(cls, texts: Sequence[str]) -> RawBM25:
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
        code = (
            "from retrieval.server import serve; "
            f"serve({str(index_dir)!r}, host='127.0.0.1', port={self.port}, log_level='warning')"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self._log = log_path.open("wb")
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"search server exited with {self.proc.returncode}: {log_path.read_text(errors='replace')[-2000:]}"
                )
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
        chunks = [qs[i : i + batch] for i in range(0, len(qs), batch)]

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
    syllables = np.array(
        [c + v for c in consonants for v in vowels] + [c + v + e for c in consonants for v in vowels for e in "nrst"],
        dtype=object,
    )
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
        out.append(" ".join(vocab[i] for i in ids[pos : pos + length]))
        pos += length
    return out


def dir_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)
