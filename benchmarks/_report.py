"""Rendering of the retrieval benchmark's results as the Markdown section of RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

from benchmarks._harness import (
    BEGIN,
    BODY_WORDS,
    END,
    QUERY_MIN_RANK,
    QUERY_WORDS,
    RESULTS_HEADER,
    TITLE_WORDS,
    VOCAB_SIZE,
    ZIPF_S,
    K,
)


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
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "mem_gib": round(mem, 1) if mem else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_start": load,
    }


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
        out.append(
            f"At {synth['passages']:,} passages a query costs {us(q['raw']) / 1000:.1f} ms in raw bm25s and "
            f"{us(q['ours_ids']) / 1000:.1f} ms in ours (`search_ids`): raw bm25s takes its top-k with "
            f"`np.argpartition` over all {synth['passages']:,} scores, most of them exactly 0, on which numpy's "
            f"selection degrades; ours selects among the matching documents only. Same top-{K} scores for "
            f"{synth['agree_raw_ours_scores']} queries; documents differ only where scores tie at the k-th "
            f"place (ours breaks ties by row)."
        )
    if hotpot:
        q = hotpot["qps"]
        out.append(
            f"HotpotQA: passage rendering costs {us(q['ours']) - us(q['ours_ids']):.0f} µs/query on the built "
            f"index and {us(q['ours_loaded']) - us(q['ours_ids']):.0f} µs/query on the loaded one (each hit's "
            f"corpus.jsonl line is JSON-parsed), against {us(q['raw']):.0f} µs/query for raw bm25s' whole "
            f"search; `search_ids` alone runs at {q['ours_ids'] / q['raw']:.2f}x raw."
        )
        best_http = max(q["http_c1"], q[f"http_c{args.http_clients}"])
        out.append(
            f"HotpotQA over HTTP: {us(best_http) - us(q['ours_loaded']):.0f} µs/query on top of the loaded "
            f"index's in-process search (request/response JSON, the client rebuilding `Passage`s, client and "
            f"server competing for 2 cores); at {synth['passages']:,} passages the same overhead is small "
            f"against the search itself."
            if synth
            else f"HotpotQA over HTTP: {us(best_http) - us(q['ours_loaded']):.0f} µs/query on top of the loaded "
            f"index's in-process search."
        )
    return out


def render(args, machine: dict, hotpot: dict | None, synth: dict | None, total_s: float) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    v = machine["versions"]
    c = args.http_clients
    load = machine["loadavg_start"]
    L = [
        BEGIN,
        "## Retrieval (BM25)",
        "",
        f"Measured {now} in one run of `python -m benchmarks.retrieval --million {args.million} "
        f"--queries {args.queries}` ({total_s / 60:.1f} min wall).",
        "",
        f"- Machine: {machine['usable_cores']} cores ({machine['cpu']}), {machine['mem_gib']} GiB RAM, "
        f"Python {machine['python']}, {machine['platform']}; "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + (
            f". Load average at start {load[0]:.2f} (the machine was shared with other work, so timings "
            "carry some noise)."
            if load
            else "."
        ),
        f"- QPS = queries per second over the whole query set, k={K}, same queries for every system, "
        f"best of {args.repeats} repeats on HotpotQA and of {args.million_repeats} on the synthetic corpus, "
        f'every system (HTTP included) interleaved within each repeat. Raw bm25s = `bm25s.tokenize(..., stopwords="english", '
        f'stemmer=Stemmer.Stemmer("english"))` + `BM25.retrieve(k={K})` (numpy backend, 1 thread) on '
        f"an index built the same way (k1=0.9, b=0.4, lucene).",
        f"- HTTP = the real `retrieval.server` (`serve()`: uvicorn, 1 worker, micro-batcher) in a child "
        f"process on 127.0.0.1 over the saved index; `HttpSearchEngine` clients, {args.http_batch} queries "
        f"per request, 1 client or {c} concurrent client threads; client and server share the same cores.",
        "",
    ]
    if hotpot:
        h = hotpot
        q = h["qps"]
        L += [f"### 1. HotpotQA sample: {h['passages']:,} passages, {h['queries']} questions as queries", ""]
        L += qps_table(
            q,
            [
                ("raw bm25s: `bm25s.tokenize` + `retrieve`", "raw"),
                ("ours: `BM25Index.search` (tokenise + retrieve + passages), built index", "ours"),
                ("ours: `BM25Index.search`, index loaded from disk (mmap, as served)", "ours_loaded"),
                ("ours: `BM25Index.search_ids` (no passages)", "ours_ids"),
                ("HTTP `/search`, 1 client", "http_c1"),
                (f"HTTP `/search`, {c} concurrent clients", f"http_c{c}"),
            ],
        )
        if "rank_bm25_qps" in h:
            L.append(
                f"| rank_bm25 `BM25Okapi.get_scores` + argsort, per query ({h['rank_bm25_queries']} queries) "
                f"| {fmt_qps(h['rank_bm25_qps'])} | {h['rank_bm25_qps'] / q['raw']:.3f} |"
            )
        best_http = max(q["http_c1"], q[f"http_c{c}"])
        L += [
            "",
            "| ratio | value | target |",
            "|---|---:|---|",
            f"| ours / raw bm25s | {q['ours'] / q['raw']:.2f} | {check(q['ours'] / q['raw'], 0.9)} |",
            f"| HTTP (better of 1 / {c} clients) / raw bm25s | {best_http / q['raw']:.2f} | "
            f"{check(best_http / q['raw'], 0.8)} |",
        ]
        if "rank_bm25_qps" in h:
            r = q["ours"] / h["rank_bm25_qps"]
            L.append(f"| ours / rank_bm25 | {r:.1f} | {check(r, 50)} |")
        else:
            L.append(f"| ours / rank_bm25 | – | {h.get('rank_bm25')} |")
        b = h["build_seconds"]
        L += [
            "",
            f"Build (best of {args.repeats}): ours {b['ours']:.2f} s, raw bm25s {b['raw']:.2f} s"
            + (f", rank_bm25 {h['rank_bm25_build_seconds']:.2f} s" if "rank_bm25_build_seconds" in h else "")
            + f"; save {h['save_seconds']:.2f} s, load {h['load_seconds']:.2f} s, server start-up "
            f"(process start → healthy) {h['server_startup_seconds']:.1f} s, server RSS {h['server_rss_mib']:,.0f} MiB. "
            f"Tokenising the {h['queries']} queries alone: {fmt_qps(q['ours_tokenize'])} QPS. "
            f"Identical top-{K} documents: raw vs ours {h['agree_raw_ours']}, loaded vs built "
            f"{h['agree_loaded_ours']}, HTTP vs in-process "
            + ", ".join(f"{x}" for x in h["agree_http_ours"].values())
            + f"; same top-{K} scores raw vs ours {h['agree_raw_ours_scores']}. "
            f"Server micro-batcher: {h['batcher']['queries']:,} queries in {h['batcher']['calls']:,} index calls.",
            "",
        ]
    if synth:
        s = synth
        ob = s["ours_build"]
        q = s["qps"]
        L += [
            f"### 2. Synthetic corpus: {s['passages']:,} passages, {s['queries']:,} generated queries",
            "",
            f"Deterministic (seed {args.seed}): {VOCAB_SIZE:,} pseudo-words, Zipf(s={ZIPF_S}) word ranks, "
            f"{TITLE_WORDS[0]}-{TITLE_WORDS[1]} title words + {BODY_WORDS[0]}-{BODY_WORDS[1]} body words per "
            f'passage ("Title\\ntext"), {ob["corpus_chars"] / 2**20:,.0f} MiB of text. Queries: '
            f"{QUERY_WORDS[0]}-{QUERY_WORDS[1]} words Zipf-drawn from the vocabulary minus its {QUERY_MIN_RANK} "
            f'commonest words (e.g. "{s["example_queries"][0]}"); a query matches {s["match_fraction"]:.1%} '
            f"of the passages on average. rank_bm25 is skipped at this size (pure-Python scoring of every "
            f"document per query term, and its per-document dicts would not fit comfortably in memory).",
            "",
            "| build / storage | value |",
            "|---|---:|",
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
            f"{s['server_startup_seconds']:.1f} s / {s['server_rss_mib']:,.0f} MiB |",
        ]
        if "raw_build" in s:
            rb = s["raw_build"]
            L.append(
                f"| raw bm25s build (`tokenize` + `index`, same child setup) | {rb['build_seconds']:.1f} s, "
                f"peak {rb['peak_build_mib']:,.0f} MiB (from {rb['rss_before_mib']:,.0f}) |"
            )
        else:
            L.append(
                "| raw bm25s build | not run (`--raw-build`; `BM25Index.build` is bm25s `tokenize` + "
                "`index` plus a list copy of the rows, compared on HotpotQA above) |"
            )
        L += [""]
        L += qps_table(
            q,
            [
                ("raw bm25s (`bm25s.BM25.load` of the same directory, in memory)", "raw"),
                ("ours: `BM25Index.search` (loaded, mmap)", "ours"),
                ("HTTP `/search`, 1 client", "http_c1"),
                (f"HTTP `/search`, {c} concurrent clients", f"http_c{c}"),
                ("ours: `BM25Index.search_ids` (no passages)", "ours_ids"),
            ],
        )
        L.append("| rank_bm25 | skipped | – |")
        best_http = max(q["http_c1"], q[f"http_c{c}"])
        L += [
            "",
            "| ratio | value | target |",
            "|---|---:|---|",
            f"| ours / raw bm25s | {q['ours'] / q['raw']:.2f} | {check(q['ours'] / q['raw'], 0.9)} |",
            f"| HTTP (better of 1 / {c} clients) / raw bm25s | {best_http / q['raw']:.2f} | "
            f"{check(best_http / q['raw'], 0.8)} |",
            "",
            f"Identical top-{K} documents: raw vs ours {s['agree_raw_ours']}, HTTP vs in-process "
            + ", ".join(f"{x}" for x in s["agree_http_ours"].values())
            + f"; same top-{K} scores raw vs ours {s['agree_raw_ours_scores']} (synthetic passages tie "
            f"often; ties at the k-th place are ordered by row in ours). "
            f"Server micro-batcher: {s['batcher']['queries']:,} queries in {s['batcher']['calls']:,} index calls.",
            "",
        ]
    if hotpot:
        L += [
            "### 3. Recall of the gold supporting titles (HotpotQA sample, question as query, BM25 over the "
            "sample's own corpus, `retrieval.metrics.recall_at_k` with `LocalSearchEngine`)",
            "",
            "| subset | questions | recall@3 | recall@5 |",
            "|---|---:|---:|---:|",
        ]
        for name, n, rec in hotpot["recall"]:
            L.append(f"| {name} | {n} | {rec[3]:.3f} | {rec[5]:.3f} |")
        L.append("")
    notes = observations(hotpot, synth, args)
    if notes:
        L += ["### Observations (computed from the numbers above)", ""] + [f"- {n}" for n in notes] + [""]
    L += [
        "Re-run (about 10-15 min on 2 cores): `PYTHONPATH=. python -m benchmarks.retrieval --million 1000000 "
        "--queries 1000` (`--million 0` skips the synthetic part, `--no-write` only prints; `--help`).",
        END,
    ]
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
