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

Our ``search_ids`` scores with bm25s but selects the top-k among the matching documents only (ties
broken by row); raw bm25s' numpy top-k is ``np.argpartition`` over all N scores, which is
pathologically slow when most scores are 0. The report checks that both give the same top-k scores.

The printed markdown section also replaces the ``<!-- retrieval:begin -->`` … ``<!-- retrieval:end -->``
block of ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from benchmarks._harness import (
    BM25_PARAMS,
    DEFAULT_HOTPOT,
    DEFAULT_OUT,
    HOTPOT_FILES,
    REPO,
    VOCAB_SIZE,
    K,
    RawBM25,
    ServerProcess,
    agreement,
    close_runner,
    dir_mib,
    http_runner,
    log,
    passage_ids,
    peak_rss_mib,
    race,
    reset_peak_rss,
    rss_mib,
    score_rows,
    synthetic_corpus,
    synthetic_queries,
    synthetic_vocab,
    timed,
    top_rows,
)
from benchmarks._report import machine_info, render, write_section


# -- child process: build + save with a clean peak-RSS measurement ------------------------------
def child_build(n: int, seed: int, index_dir: str, mode: str) -> dict:
    from retrieval.bm25 import BM25Index

    out: dict = {"mode": mode, "passages": n}
    gen_s, vocab = timed(lambda: synthetic_vocab(VOCAB_SIZE, seed))
    corpus_s, rows = timed(lambda v=vocab: synthetic_corpus(n, v, seed))
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
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.retrieval",
        "--child-build",
        mode,
        "--million",
        str(n),
        "--seed",
        str(seed),
        "--child-index-dir",
        str(index_dir),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build child ({mode}) failed with {proc.returncode}:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
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


def race_with_http(
    res: dict,
    systems: dict[str, Callable[[], object]],
    index_dir: Path,
    log_path: Path,
    queries: list[str],
    args,
    repeats: int,
) -> tuple[dict[str, float], dict[str, object]]:
    """Race the in-process ``systems`` and the real server (child process, 1 and ``--http-clients``
    client threads) together, repeats interleaved, so machine noise hits every system alike."""
    server = ServerProcess(index_dir, log_path)
    runners: dict = {}
    try:
        res["server_startup_seconds"] = server.startup_seconds
        warm = queries[: min(len(queries), 2 * args.http_batch)]
        runners = {
            f"http_c{c}": http_runner(server.url, queries, K, args.http_batch, c)
            for c in sorted({1, args.http_clients})
        }
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
    res.update(
        questions=len(rows), rejected=len(rejected), passages=len(corpus), paragraphs=paragraphs, queries=len(queries)
    )
    log(f"hotpot: {len(rows)} questions, {len(corpus)} passages ({paragraphs} paragraphs)")

    texts = [r["contents"] for r in corpus]
    res["build_seconds"], built = race(
        {"ours": lambda: BM25Index.build(corpus, show_progress=False), "raw": lambda: RawBM25.build(texts)},
        args.repeats,
    )
    ours, raw = built["ours"], built["raw"]
    index_dir = work / "hotpot_index"
    res["save_seconds"], _ = timed(lambda: ours.save(index_dir))
    res["load_seconds"], loaded = timed(lambda: BM25Index.load(index_dir))

    log(f"hotpot: QPS race (in-process + HTTP server), best of {args.repeats}")
    times, out = race_with_http(
        res,
        {
            "raw": lambda: raw.search(queries, K),
            "ours": lambda: ours.search(queries, K),
            "ours_loaded": lambda: loaded.search(queries, K),
            "ours_ids": lambda: ours.search_ids(queries, K),
            "ours_tokenize": lambda: ours.tokenize(queries),
        },
        index_dir,
        work / "hotpot_server.log",
        queries,
        args,
        args.repeats,
    )
    # correctness: the systems must return the same documents
    raw_rows = top_rows(*out["raw"])
    res["agree_raw_ours"] = agreement(raw_rows, top_rows(*out["ours_ids"]))
    ours_ids = passage_ids(out["ours"])
    res["agree_loaded_ours"] = agreement(passage_ids(out["ours_loaded"]), ours_ids)
    res["agree_raw_ours_scores"] = agreement(score_rows(out["ours_ids"][1]), score_rows(out["raw"][1]))
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
        doc_tokens = bm25s.tokenize(texts, stopwords="english", stemmer=stemmer, return_ids=False, show_progress=False)
        res["rank_bm25_build_seconds"], okapi = timed(
            lambda: BM25Okapi(doc_tokens, k1=BM25_PARAMS["k1"], b=BM25_PARAMS["b"])
        )
        subset = queries[: args.rank_bm25_queries]

        def rank_search() -> list:
            q_tokens = bm25s.tokenize(
                subset, stopwords="english", stemmer=stemmer, return_ids=False, show_progress=False
            )
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
    log(
        f"synthetic: ours build {res['ours_build']['build_seconds']:.1f}s, "
        f"peak {res['ours_build']['peak_build_mib']:.0f} MiB"
    )
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
    warm = queries[: min(20, len(queries))]
    for system in (raw, ours):
        system.search(warm, K)
    log(f"synthetic: QPS race over {len(queries)} queries (in-process + HTTP server), best of {args.million_repeats}")
    times, out = race_with_http(
        res,
        {
            "raw": lambda: raw.search(queries, K),
            "ours": lambda: ours.search(queries, K),
            "ours_ids": lambda: ours.search_ids(queries, K),
        },
        index_dir,
        work / "synthetic_server.log",
        queries,
        args,
        args.million_repeats,
    )
    raw_rows = top_rows(*out["raw"])
    ours_ids = passage_ids(out["ours"])
    res["agree_raw_ours"] = agreement(raw_rows, [[int(i) for i in row] for row in ours_ids])
    res["agree_raw_ours_scores"] = agreement(score_rows(out["ours_ids"][1]), score_rows(out["raw"][1]))
    res["match_fraction"] = round(
        float(
            np.mean(
                [
                    (ours._retriever.get_scores(q) > 0).mean()  # noqa: SLF001
                    for q in ours.tokenize(queries[:50])
                    if q
                ]
            )
        ),
        4,
    )
    res["agree_http_ours"] = {n: agreement(passage_ids(out[n]), ours_ids) for n in out if n.startswith("http_")}
    res["rss_after_queries_delta_mib"] = round(rss_mib() - rss0, 1)
    res["qps"] = {name: qps(len(queries), sec) for name, sec in times.items()}
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--million", type=int, default=1_000_000, help="synthetic corpus size (0 skips that part)")
    p.add_argument("--queries", type=int, default=1000, help="generated queries for the synthetic corpus")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results file (its marked section is replaced)")
    p.add_argument("--repeats", type=int, default=7, help="best-of-N repeats on HotpotQA")
    p.add_argument(
        "--million-repeats",
        type=int,
        default=1,
        help="best-of-N repeats on the synthetic corpus (one pass of 1,000 queries over 1M "
        "passages takes about a minute per system)",
    )
    p.add_argument(
        "--http-batch", type=int, default=256, help="queries per HTTP request (HttpSearchEngine's default max_batch)"
    )
    p.add_argument("--http-clients", type=int, default=4, help="concurrent HTTP client threads")
    p.add_argument("--rank-bm25-queries", type=int, default=600, help="HotpotQA queries timed for rank_bm25")
    p.add_argument(
        "--raw-build",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time a raw bm25s build of the synthetic corpus (another child process, ~4 min at 1M)",
    )
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
