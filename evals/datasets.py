"""Evaluation questions from every source we evaluate on, in one row type, with a quarantine.

Sources: FlashRAG dataset jsonl (``id, question, golden_answers``), AutoCoA's evaluation parquet
(verl layout; ``source_file`` names the benchmark), HotpotQA in any layout ``qadata`` reads, and
plain records (the embedded world's held-out questions). Every input row becomes an
:class:`EvalQuestion` or a :class:`RejectedQuestion` with a reason, never silently dropped, so
``rows_in == len(questions) + len(rejected)`` holds for every :class:`LoadResult`.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qadata.loaders import Unreadable, iter_jsonl, preview_row  # one JSONL reader: bad lines become rejected rows
from qadata.schema import RAW_PREVIEW_CHARS, RowError, SourceError
from qadata.text import normalise_question

# Clean benchmark names, keyed by the lower-cased file stem without its split suffix. AutoCoA's
# test.parquet names files NQ_dev.json, TriviaQA_dev.json, HotpotQA_dev.json, 2WIKI_dev.json,
# MuSiQue_dev.json, Bamboogle_dev.json and Fanout_dev.json; FlashRAG names dataset folders.
BENCHMARK_NAMES: dict[str, str] = {
    "nq": "nq",
    "naturalquestions": "nq",
    "natural_questions": "nq",
    "triviaqa": "triviaqa",
    "trivia_qa": "triviaqa",
    "popqa": "popqa",
    "hotpotqa": "hotpotqa",
    "hotpot_qa": "hotpotqa",
    "2wiki": "2wikimultihopqa",
    "2wikimultihopqa": "2wikimultihopqa",
    "musique": "musique",
    "bamboogle": "bamboogle",
    "fanout": "fanout",
    "fanoutqa": "fanout",
}
# Table order: single-hop first, then multi-hop (the paper's Table 1 groups them so).
BENCHMARK_ORDER: tuple[str, ...] = (
    "nq",
    "triviaqa",
    "popqa",
    "hotpotqa",
    "2wikimultihopqa",
    "musique",
    "bamboogle",
    "fanout",
)
AUTOCOA_QUESTION_MARKER = "Now, please answer the user's question below:"
_SPLIT_SUFFIX = re.compile(r"[_\-.](dev|test|train|val|validation)$")

QUESTION_SCHEMA = pa.schema(
    [
        ("benchmark", pa.string()),
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("golden_answers", pa.list_(pa.string())),
        ("source", pa.string()),
        ("source_row", pa.int64()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("benchmark", pa.string()),
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)


@dataclass(frozen=True)
class EvalQuestion:
    """One evaluation question. ``(benchmark, question_id)`` is the key: ids repeat across
    benchmarks (AutoCoA's NQ and HotpotQA both have ``dev_…`` ids). Runs of whitespace in the
    question are collapsed to one space; gold answers are stripped and de-duplicated in order."""

    benchmark: str
    question_id: str
    question: str
    golden_answers: tuple[str, ...]
    source: str  # the file (or ``records:<name>``) it came from
    source_row: int = 0

    def as_row(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "question_id": self.question_id,
            "question": self.question,
            "golden_answers": list(self.golden_answers),
            "source": self.source,
            "source_row": self.source_row,
        }

    @property
    def key(self) -> str:
        """``benchmark/question_id``: unique across benchmarks, usable as a rollout task id."""
        return f"{self.benchmark}/{self.question_id}"

    def as_task(self) -> dict:
        """The question dict ``agent.synthesis.synthesize`` takes (``id`` is :attr:`key`)."""
        return {
            "id": self.key,
            "question": self.question,
            "answer": self.golden_answers[0],
            "answers": list(self.golden_answers),
        }


@dataclass(frozen=True)
class RejectedQuestion:
    benchmark: str  # "unknown" when the row does not say
    source: str
    source_row: int
    reason: str
    raw: str

    def as_row(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "source": self.source,
            "source_row": self.source_row,
            "reason": self.reason,
            "raw": self.raw[:RAW_PREVIEW_CHARS],
        }


@dataclass
class LoadResult:
    questions: list[EvalQuestion] = field(default_factory=list)
    rejected: list[RejectedQuestion] = field(default_factory=list)
    rows_in: int = 0  # input rows seen (blank jsonl lines are not rows)

    @property
    def reconciles(self) -> bool:
        return self.rows_in == len(self.questions) + len(self.rejected)

    def extend(self, other: LoadResult) -> LoadResult:
        """Merge another result in place; a key already loaded is quarantined as a duplicate."""
        seen = {(q.benchmark, q.question_id): q for q in self.questions}
        for q in other.questions:
            first = seen.get((q.benchmark, q.question_id))
            if first is not None:
                self.rejected.append(_duplicate(q, first))
            else:
                seen[(q.benchmark, q.question_id)] = q
                self.questions.append(q)
        self.rejected += other.rejected
        self.rows_in += other.rows_in
        return self

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for q in self.questions:
            out[q.benchmark] += 1
        return dict(sorted(out.items(), key=lambda kv: benchmark_sort_key(kv[0])))


def benchmark_name(name: str) -> str | None:
    """Clean benchmark name of a file name or label (``2WIKI_dev.json`` -> ``2wikimultihopqa``), or None."""
    stem = Path(str(name)).name.lower()
    stem = re.sub(r"\.(jsonl|json|parquet)$", "", stem)
    stem = _SPLIT_SUFFIX.sub("", stem)
    return BENCHMARK_NAMES.get(stem)


def benchmark_sort_key(name: str) -> tuple[int, str]:
    return (BENCHMARK_ORDER.index(name) if name in BENCHMARK_ORDER else len(BENCHMARK_ORDER), name)


def _duplicate(q: EvalQuestion, first: EvalQuestion) -> RejectedQuestion:
    return RejectedQuestion(
        q.benchmark,
        q.source,
        q.source_row,
        f"duplicate id {q.question_id!r} (first loaded from {first.source} row {first.source_row})",
        preview_row(q.question),
    )


def _answers(value: Any, field_name: str) -> tuple[str, ...]:
    if value is None:
        raise RowError(f"missing field '{field_name}'")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise RowError(f"field '{field_name}' is {type(value).__name__}, expected a list of strings")
    answers = tuple(dict.fromkeys(a.strip() for a in items if isinstance(a, str) and a.strip()))
    if not answers:
        raise RowError(f"empty {field_name}")
    return answers


def _question_text(value: Any, field_name: str = "question") -> str:
    if value is None:
        raise RowError(f"missing field '{field_name}'")
    if not isinstance(value, str):
        raise RowError(f"field '{field_name}' is {type(value).__name__}, expected a string")
    if not value.strip():
        raise RowError(f"empty {field_name}")
    return " ".join(value.split())


def _qid(raw: dict, *keys: str) -> str:
    for key in keys:
        value = raw.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    raise RowError(f"missing field '{keys[0]}'")


def _collect(rows: Iterable[tuple[int, Any]], make, *, source: str, benchmark: str, unit: str = "row") -> LoadResult:
    """Turn ``(row number, raw)`` pairs into questions or rejected rows; quarantine duplicate keys.

    ``unit`` names what the number counts in reasons (``line`` for jsonl, ``row`` otherwise).
    """
    result = LoadResult()
    seen: dict[tuple[str, str], EvalQuestion] = {}
    for row_no, raw in rows:
        result.rows_in += 1
        if isinstance(raw, Unreadable):
            result.rejected.append(RejectedQuestion(benchmark, source, row_no, raw.reason, raw.raw))
            continue
        try:
            q = make(raw, row_no)
        except RowError as exc:
            bench = benchmark
            if isinstance(raw, dict) and benchmark == "unknown":
                bench = benchmark_name(str(raw.get("source_file") or "")) or "unknown"
            result.rejected.append(RejectedQuestion(bench, source, row_no, f"{unit} {row_no}: {exc}", preview_row(raw)))
            continue
        first = seen.get((q.benchmark, q.question_id))
        if first is not None:
            result.rejected.append(_duplicate(q, first))
            continue
        seen[(q.benchmark, q.question_id)] = q
        result.questions.append(q)
    return result


def _need_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    return path


# -- FlashRAG ----------------------------------------------------------------------------------------
def load_flashrag_jsonl(path: str | Path, benchmark: str | None = None) -> LoadResult:
    """A FlashRAG dataset file (``<dataset>/<split>.jsonl``, rows ``id, question, golden_answers``).

    Args:
        benchmark: the clean name; by default derived from the folder (FlashRAG's layout) or the
            file name. A name we do not know is kept as given, lower-cased.
    """
    path = _need_file(path)
    name = benchmark or benchmark_name(path.parent.name) or benchmark_name(path.name) or path.parent.name.lower()

    def make(raw: Any, row_no: int) -> EvalQuestion:
        if not isinstance(raw, dict):
            raise RowError(f"row is {type(raw).__name__}, expected an object")
        return EvalQuestion(
            name,
            _qid(raw, "id", "_id"),
            _question_text(raw.get("question")),
            _answers(raw.get("golden_answers"), "golden_answers"),
            str(path),
            row_no,
        )

    return _collect(iter_jsonl(path), make, source=str(path), benchmark=name, unit="line")


# -- AutoCoA's evaluation parquet ----------------------------------------------------------------------
def question_from_autocoa_prompt(content: str) -> str:
    """The question of an AutoCoA prompt: the text after its fixed "question below:" line.

    Falls back to the last non-empty line. Lines are split on ``\\n`` only: ``str.splitlines``
    also splits on U+0085, which one TriviaQA question contains ("W.D. & H.O\\x85 ?").
    """
    if AUTOCOA_QUESTION_MARKER in content:
        tail = content.rsplit(AUTOCOA_QUESTION_MARKER, 1)[1]
        if tail.strip():
            return _question_text(tail, "prompt question")
    lines = [ln for ln in content.split("\n") if ln.strip()]
    if not lines:
        raise RowError("prompt content is empty")
    return _question_text(lines[-1], "prompt question")


def _autocoa_row(path: Path):
    def make(raw: Any, row_no: int) -> EvalQuestion:
        if not isinstance(raw, dict):
            raise RowError(f"row is {type(raw).__name__}, expected an object")
        source_file = raw.get("source_file")
        if not isinstance(source_file, str) or not source_file.strip():
            raise RowError("missing field 'source_file'")
        bench = benchmark_name(source_file)
        if bench is None:
            raise RowError(f"unknown benchmark source_file {source_file!r} (known: {sorted(set(BENCHMARK_NAMES))})")
        prompt = raw.get("prompt")
        if prompt is None or len(prompt) == 0 or not isinstance(prompt[0], dict):
            raise RowError("missing field 'prompt[0].content'")
        content = prompt[0].get("content")
        if not isinstance(content, str) or not content.strip():
            raise RowError("missing field 'prompt[0].content'")
        reward = raw.get("reward_model")
        truth = reward.get("ground_truth") if isinstance(reward, dict) else None
        return EvalQuestion(
            bench,
            _qid(raw, "id", "_id"),
            question_from_autocoa_prompt(content),
            _answers(truth, "reward_model.ground_truth"),
            str(path),
            row_no,
        )

    return make


def load_autocoa_parquet(path: str | Path) -> LoadResult:
    """AutoCoA's evaluation parquet (verl layout, 2,936 rows over seven benchmarks).

    Its last row repeats TriviaQA ``dev_2063`` (AutoCoA's own scorer drops the last row); the copy
    is quarantined as a duplicate, so TriviaQA loads 500 questions.
    """
    path = _need_file(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # re-raised with the file named
        raise SourceError(f"{path}: cannot open parquet file: {exc}") from exc
    missing = {"source_file", "prompt", "reward_model"} - set(pf.schema_arrow.names)
    if missing:
        raise SourceError(f"{path}: not an AutoCoA evaluation parquet, missing columns {sorted(missing)}")

    def rows() -> Iterable[tuple[int, Any]]:
        n = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                yield n, rec
                n += 1

    return _collect(rows(), _autocoa_row(path), source=str(path), benchmark="unknown")


# -- HotpotQA through qadata ----------------------------------------------------------------------------
def load_hotpotqa(path: str | Path, *, split: str | None = None, layout: str = "auto") -> LoadResult:
    """HotpotQA in any layout ``qadata.loaders`` reads (official JSON, HF jsonl/parquet, verl)."""
    from qadata.loaders import SourceSpec, load_source
    from qadata.schema import Rejected

    path = _need_file(path)
    items: list[tuple[int, Any]] = []
    for item in load_source(SourceSpec(str(path), layout=layout, split=split)):
        if isinstance(item, Rejected):
            reason = item.reason if item.reason.startswith("line ") else f"row {item.source_row}: {item.reason}"
            items.append((item.source_row, Unreadable(reason, item.raw)))
        else:
            items.append((item["source_row"], item))

    def make(row: dict, row_no: int) -> EvalQuestion:
        return EvalQuestion(
            "hotpotqa",
            row["id"],
            _question_text(row["question"]),
            _answers(row["answers"], "answer"),
            str(path),
            row_no,
        )

    return _collect(items, make, source=str(path), benchmark="hotpotqa")


# -- plain records -----------------------------------------------------------------------------------
def load_records(records: Iterable[Mapping[str, Any]], *, benchmark: str, source: str = "records") -> LoadResult:
    """Questions given as dicts (the embedded world's held-out questions, a notebook's list).

    Accepted keys: ``id``/``_id``/``question_id``; ``question``; ``golden_answers``, ``answers`` or
    ``answer`` (the first present is used).
    """
    label = f"records:{source}"

    def make(raw: Any, row_no: int) -> EvalQuestion:
        if not isinstance(raw, Mapping):
            raise RowError(f"row is {type(raw).__name__}, expected a mapping")
        key = next((k for k in ("golden_answers", "answers", "answer") if raw.get(k) is not None), "golden_answers")
        return EvalQuestion(
            benchmark,
            _qid(dict(raw), "id", "_id", "question_id"),
            _question_text(raw.get("question")),
            _answers(raw.get(key), key),
            label,
            row_no,
        )

    return _collect(enumerate(records), make, source=label, benchmark=benchmark)


# -- sampling and leakage -----------------------------------------------------------------------------
def sample_per_benchmark(
    questions: Sequence[EvalQuestion], n: int | Mapping[str, int] | None, seed: int = 0
) -> list[EvalQuestion]:
    """A seeded sample of ``n`` questions per benchmark (all of a benchmark smaller than ``n``).

    Deterministic whatever the input order (each benchmark is sorted by id, then shuffled by a
    generator seeded with ``seed`` and the benchmark's name), independent across benchmarks, and
    nested: the sample of 50 is the first 50 of the sample of 100.

    Args:
        n: one size for every benchmark, a per-benchmark mapping (a benchmark it omits is left
            out), or None for everything.
    """
    by_bench: dict[str, list[EvalQuestion]] = defaultdict(list)
    for q in questions:
        by_bench[q.benchmark].append(q)
    out: list[EvalQuestion] = []
    for bench in sorted(by_bench, key=benchmark_sort_key):
        want = n.get(bench, 0) if isinstance(n, Mapping) else n
        pool = sorted(by_bench[bench], key=lambda q: q.question_id)
        if want is not None:
            if want < 0:
                raise ValueError(f"sample size for {bench} must be >= 0, got {want}")
            random.Random(f"{seed}/{bench}").shuffle(pool)
            pool = pool[:want]
        out += pool
    return out


def find_leakage(
    questions: Iterable[EvalQuestion], training_questions: Iterable[str], training_ids: Iterable[str] = ()
) -> dict[tuple[str, str], str]:
    """Evaluation questions also seen in training: ``{(benchmark, question_id): reason}``.

    Questions match on ``qadata.text.normalise_question`` (the key training-side sampling uses to
    exclude evaluation questions). Ids match only when ``training_ids`` is given, because ids are
    comparable only within one id space (AutoCoA's ``dev_123`` means different questions in
    different benchmarks).
    """
    texts = {normalise_question(t) for t in training_questions if isinstance(t, str)}
    ids = {str(i) for i in training_ids}
    leaks: dict[tuple[str, str], str] = {}
    for q in questions:
        reasons = []
        if normalise_question(q.question) in texts:
            reasons.append("question text appears in training")
        if q.question_id in ids:
            reasons.append("id appears in training")
        if reasons:
            leaks[(q.benchmark, q.question_id)] = "; ".join(reasons)
    return leaks


def questions_table(questions: Sequence[EvalQuestion]) -> pa.Table:
    return pa.Table.from_pylist([q.as_row() for q in questions], schema=QUESTION_SCHEMA)


def rejected_table(rejected: Sequence[RejectedQuestion]) -> pa.Table:
    return pa.Table.from_pylist([r.as_row() for r in rejected], schema=REJECTED_SCHEMA)


def questions_from_table(table: pa.Table) -> list[EvalQuestion]:
    """The questions of a :func:`questions_table` table, in row order."""
    return [
        EvalQuestion(
            r["benchmark"], r["question_id"], r["question"], tuple(r["golden_answers"]), r["source"], r["source_row"]
        )
        for r in table.to_pylist()
    ]
