"""Which questions each evaluation benchmark holds: the held-out pool of the generated world, one benchmark's rows
of AutoCoA's shared evaluation file, and the seeded sample left once questions seen in training are removed.

Every pool comes with its counts (``rows_in``, ``excluded_training``, ``excluded_split``), so the rows of a
source reconcile with the sampled, the not sampled, the rejected and the excluded questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evals import datasets as bm
from qadata.text import normalise_question

EMBEDDED = "embedded"
SHARED_BENCHMARKS = ("nq", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
BENCHMARKS = (EMBEDDED, *SHARED_BENCHMARKS)


def embedded_pool(world: pa.Table, sample: pa.Table, splits: Sequence[str]) -> tuple[bm.LoadResult, dict]:
    """Held-out questions of the generated world: not in the training sample (by id or text), in ``splits``.

    A world generated with another seed would be held out too, but its entities are not in the search
    index (built from this world's paragraphs), so its questions could not be answered by searching.
    """
    ids = set(sample.column("id").to_pylist())
    texts = {normalise_question(q) for q in sample.column("question").to_pylist()}
    rows = world.select(["id", "question", "answer", "split"]).to_pylist()
    training = [r for r in rows if r["id"] in ids or normalise_question(r["question"]) in texts]
    seen = {r["id"] for r in training}
    other = [r for r in rows if r["id"] not in seen and r["split"] not in splits]
    seen |= {r["id"] for r in other}
    pool = [r for r in rows if r["id"] not in seen]
    return (
        bm.load_records(pool, benchmark=EMBEDDED, source="embedded_world"),
        {"rows_in": len(rows), "excluded_training": len(training), "excluded_split": len(other)},
    )


def shared_pool(path: str | Path, benchmark: str) -> tuple[bm.LoadResult, dict]:
    """The questions of one benchmark in AutoCoA's evaluation parquet, with the file's own count of its rows."""
    res = bm.load_autocoa_parquet(path)
    # rows of this benchmark counted from the file's own column: the independent side of the reconcile check
    names = pq.read_table(path, columns=["source_file"]).column("source_file").to_pylist()
    rows_in = sum(1 for s in names if isinstance(s, str) and bm.benchmark_name(s) == benchmark)
    mine = bm.LoadResult(
        [q for q in res.questions if q.benchmark == benchmark],
        [r for r in res.rejected if r.benchmark == benchmark],
        rows_in,
    )
    return mine, {
        "rows_in": rows_in,
        "excluded_training": 0,
        "excluded_split": 0,
        "file_rows": res.rows_in,
        "file_rejected_unattributed": sum(r.benchmark == "unknown" for r in res.rejected),
    }


@dataclass(frozen=True)
class Selection:
    """The questions a benchmark partition evaluates, what was left out of its pool (with reasons), and the counts
    that reconcile them with the source's rows."""

    sampled: list[bm.EvalQuestion]
    rejected: list[bm.RejectedQuestion]  # unreadable, duplicate, or leaked (seen in training)
    usable: int  # questions of the pool without a leak, before sampling
    leaked: int
    counts: dict  # rows_in, excluded_training, excluded_split, rows_rejected, sampled, not_sampled, leaked
    source: str = ""
    missing: str | None = None  # why the pool is empty: its source file is absent


def select(
    pool: bm.LoadResult,
    training_questions: Sequence[str],
    training_ids: Sequence[str],
    n: int | None,
    seed: int = 0,
    *,
    pool_counts: dict | None = None,
    source: str = "",
    missing: str | None = None,
) -> Selection:
    """The pool minus every question seen in training (moved to the rejected rows), then a seeded sample of ``n``."""
    leaks = bm.find_leakage(pool.questions, training_questions, training_ids)
    clean = [q for q in pool.questions if (q.benchmark, q.question_id) not in leaks]
    rejected = pool.rejected + [
        bm.RejectedQuestion(
            q.benchmark, q.source, q.source_row, f"leakage: {leaks[(q.benchmark, q.question_id)]}", q.question
        )
        for q in pool.questions
        if (q.benchmark, q.question_id) in leaks
    ]
    sampled = bm.sample_per_benchmark(clean, n, seed)
    counts = {
        **(pool_counts or {}),
        "rows_rejected": len(rejected),
        "sampled": len(sampled),
        "not_sampled": len(clean) - len(sampled),
        "leaked": len(leaks),
    }
    return Selection(sampled, rejected, len(clean), len(leaks), counts, source, missing)


def benchmark_questions(
    benchmark: str,
    world: pa.Table,
    sample: pa.Table,
    *,
    splits: Sequence[str],
    autocoa_file: str | Path,
    n: int | None,
    seed: int = 0,
) -> Selection:
    """The evaluation questions of one benchmark: the embedded world's held-out pool or the benchmark's rows of
    ``autocoa_file`` (none when the file is absent), minus the training sample ``sample``, sampled."""
    path = Path(autocoa_file)
    missing = None
    if benchmark == EMBEDDED:
        (pool, counts), source = embedded_pool(world, sample, splits), "embedded_world"
    elif path.is_file():
        (pool, counts), source = shared_pool(path, benchmark), str(path)
    else:
        pool, counts, source = bm.LoadResult(), {"rows_in": 0, "excluded_training": 0, "excluded_split": 0}, str(path)
        missing = (
            f"{path} not found (a fresh clone has no ../shared/data): partition left empty; "
            "set autocoa_test_file to evaluate on the shared benchmarks"
        )
    ids = sample.column("id").to_pylist() if benchmark == EMBEDDED else ()  # ids are comparable only there
    texts = sample.column("question").to_pylist()
    return select(pool, texts, ids, n, seed, pool_counts=counts, source=source, missing=missing)
