"""Loaders for the three HotpotQA layouts people have on disk, into one normalised schema.

* official HotpotQA JSON: a list of objects, ``context`` as ``[[title, [sentences]]]`` and
  ``supporting_facts`` as ``[[title, sent_id]]``;
* the Hugging Face layout (jsonl or parquet): ``context{title[], sentences[][]}`` and
  ``supporting_facts{title[], sent_id[]}``;
* the verl/AutoCoA RL parquet: the question is the last paragraph of ``prompt[0].content`` and
  the gold answers are ``reward_model.ground_truth`` (a string or a list).

Every row either becomes a normalised record or a :class:`Rejected` with a reason; a file that
cannot be read at all raises :class:`SourceError` naming the file and, where known, the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from qadata.schema import RAW_PREVIEW_CHARS, Rejected, RowError, SourceError

LoadedRow = dict | Rejected


@dataclass(frozen=True)
class SourceSpec:
    """One input file: its path, its layout (``auto`` detects it) and the split it holds."""

    path: str
    layout: str = "auto"  # auto | hotpotqa_json | hf | verl
    split: str | None = None

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        """Parse ``path[::split[::layout]]`` as written in run config."""
        parts = text.split("::")
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"bad source spec {text!r}: expected 'path[::split[::layout]]'")
        return cls(
            path=parts[0],
            split=parts[1] if len(parts) > 1 and parts[1] else None,
            layout=parts[2] if len(parts) > 2 else "auto",
        )


def preview_row(raw: Any) -> str:
    """A short printable preview of a raw source row, for quarantine rows and error messages."""
    try:
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(raw)
    return text[:RAW_PREVIEW_CHARS]


def _infer_split(path: Path) -> str:
    name = path.name.lower()
    for split, keys in (("train", ("train",)), ("dev", ("dev", "valid", "validation")), ("test", ("test",))):
        if any(k in name for k in keys):
            return split
    return "unknown"


def _text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(f"missing field '{field}'")
    if not isinstance(value, str):
        raise RowError(f"field '{field}' is {type(value).__name__}, expected a string")
    value = value.strip()
    if not value:
        raise RowError(f"empty {field}")
    return value


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(f"expected a string, got {type(value).__name__}")
    return value.strip() or None


def _supporting_facts(value: Any) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, dict):  # HF layout: {title: [...], sent_id: [...]}
        titles, ids = value.get("title"), value.get("sent_id")
        if not isinstance(titles, (list, tuple)) or not isinstance(ids, (list, tuple)) or len(titles) != len(ids):
            raise RowError("supporting_facts: 'title' and 'sent_id' lists missing or of different length")
        pairs = list(zip(titles, ids))
    elif isinstance(value, list):  # official: [[title, sent_id], ...]
        pairs = []
        for item in value:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise RowError(f"supporting_facts: item {preview_row(item)[:80]} is not [title, sent_id]")
            pairs.append((item[0], item[1]))
    else:
        raise RowError(f"supporting_facts has type {type(value).__name__}")
    out = []
    for title, sent_id in pairs:
        if not isinstance(title, str) or isinstance(sent_id, bool) or not isinstance(sent_id, int):
            raise RowError("supporting_facts: title must be a string and sent_id an integer")
        if not 0 <= sent_id < 2**31:  # a sentence index, stored as int32
            raise RowError(f"supporting_facts: sent_id {sent_id} is not a sentence index")
        out.append({"title": title, "sent_id": int(sent_id)})
    return out


def _context(value: Any) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, dict):  # HF layout: {title: [...], sentences: [[...], ...]}
        titles, sents = value.get("title"), value.get("sentences")
        if not isinstance(titles, (list, tuple)) or not isinstance(sents, (list, tuple)) or len(titles) != len(sents):
            raise RowError("context: 'title' and 'sentences' lists missing or of different length")
        pairs = list(zip(titles, sents))
    elif isinstance(value, list):  # official: [[title, [sentences]], ...]
        pairs = []
        for item in value:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise RowError("context: an item is not [title, [sentences]]")
            pairs.append((item[0], item[1]))
    else:
        raise RowError(f"context has type {type(value).__name__}")
    out = []
    for title, sentences in pairs:
        if not isinstance(title, str) or not isinstance(sentences, (list, tuple)):
            raise RowError("context: title must be a string and sentences a list")
        if not all(isinstance(s, str) for s in sentences):
            raise RowError(f"context: paragraph {title!r} has a non-string sentence")
        out.append({"title": title, "sentences": list(sentences)})
    return out


def normalise_hotpot(raw: Any, *, source: str, split: str, source_file: str, source_row: int) -> dict:
    """Normalise one official- or HF-layout HotpotQA object (raises :class:`RowError`)."""
    if not isinstance(raw, dict):
        raise RowError(f"row is {type(raw).__name__}, expected an object")
    qid = raw.get("_id", raw.get("id"))
    if qid is None or (isinstance(qid, str) and not qid.strip()):
        raise RowError("missing field 'id'")
    answer = _text(raw.get("answer"), "answer")
    facts = _supporting_facts(raw.get("supporting_facts"))
    context = _context(raw.get("context"))
    titles = {p["title"]: len(p["sentences"]) for p in context}
    for fact in facts:
        if context and fact["title"] not in titles:
            raise RowError(f"supporting fact title {fact['title']!r} is not in the context")
    return {
        "id": str(qid).strip(),
        "question": _text(raw.get("question"), "question"),
        "answer": answer,
        "answers": [answer],
        "type": _optional_text(raw.get("type")),
        "level": _optional_text(raw.get("level")),
        "supporting_facts": facts,
        "context": context,
        "source": source,
        "split": _optional_text(raw.get("split")) or split,
        "source_file": source_file,
        "source_row": source_row,
    }


def question_from_prompt(content: str) -> str:
    """The AutoCoA prompt ends with the user's question as its last non-empty paragraph."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", content) if p.strip()]
    if not paragraphs:
        raise RowError("prompt content is empty")
    last = paragraphs[-1]
    # "...question below: \nWho is ...?" arrives as one paragraph when only one newline separates them.
    # split on "\n" only: str.splitlines also splits on U+0085, which a TriviaQA question contains
    lines = [ln.strip() for ln in last.split("\n") if ln.strip()]
    return lines[-1]


def normalise_verl(raw: Any, *, split: str, source_file: str, source_row: int) -> dict:
    """Normalise one verl/AutoCoA RL parquet row (raises :class:`RowError`)."""
    if not isinstance(raw, dict):
        raise RowError(f"row is {type(raw).__name__}, expected an object")
    qid = raw.get("_id", raw.get("id"))
    if qid is None or not str(qid).strip():
        raise RowError("missing field 'id'")
    prompt = raw.get("prompt")
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[0], dict):
        raise RowError("missing field 'prompt[0].content'")
    question = question_from_prompt(_text(prompt[0].get("content"), "prompt[0].content"))
    reward = raw.get("reward_model") or {}
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    if truth is None:
        raise RowError("missing field 'reward_model.ground_truth'")
    if not isinstance(truth, (str, list, tuple)):
        raise RowError(f"reward_model.ground_truth is {type(truth).__name__}, expected a string or a list")
    answers = [truth] if isinstance(truth, str) else list(truth)
    answers = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
    if not answers:
        raise RowError("empty answer")
    extra = raw.get("extra_info") or {}
    return {
        "id": str(qid).strip(),
        "question": question,
        "answer": answers[0],
        "answers": answers,
        "type": None,
        "level": _optional_text(raw.get("level")),
        "supporting_facts": [],
        "context": [],
        "source": "verl",
        "split": _optional_text(extra.get("split") if isinstance(extra, dict) else None) or split,
        "source_file": source_file,
        "source_row": source_row,
    }


def detect_layout(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "hotpotqa_json"
    if suffix == ".jsonl":
        return "hf"
    if suffix == ".parquet":
        try:
            names = set(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise SourceError(f"{path}: cannot read parquet schema: {exc}") from exc
        if {"prompt", "reward_model"} <= names:
            return "verl"
        if {"question", "answer"} <= names:
            return "hf"
        raise SourceError(f"{path}: parquet columns {sorted(names)} match no known HotpotQA layout")
    raise SourceError(f"{path}: unknown file type {suffix!r} (expected .json, .jsonl or .parquet)")


def _iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not valid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, list):
        raise SourceError(f"{path}: official HotpotQA JSON must be a list, found {type(data).__name__}")
    yield from enumerate(data)


class Unreadable:
    """A line of a JSONL file that could not be parsed: why, and its raw text."""

    def __init__(self, reason: str, raw: str):
        self.reason, self.raw = reason, raw


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object or Unreadable)`` for each non-blank line of a JSONL file."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    lineno,
                    Unreadable(
                        f"line {lineno}: not valid UTF-8 (byte {exc.start})", line.decode("utf-8", errors="replace")
                    ),
                )
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, Unreadable(f"line {lineno}: malformed JSON ({exc.msg})", text)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{path}: cannot open parquet file: {exc}") from exc
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield row, rec
            row += 1


def load_source(spec: SourceSpec) -> Iterator[LoadedRow]:
    """Yield normalised rows and :class:`Rejected` rows for one file, in file order."""
    path = Path(spec.path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    layout = detect_layout(path) if spec.layout == "auto" else spec.layout
    if layout not in ("hotpotqa_json", "hf", "verl"):
        raise SourceError(f"{path}: unknown layout {layout!r}")
    split = spec.split or _infer_split(path)
    if path.suffix.lower() == ".json":
        rows = _iter_json_list(path)
    elif path.suffix.lower() == ".jsonl":
        rows = iter_jsonl(path)
    else:
        rows = _iter_parquet(path)
    for row_no, raw in rows:
        common = dict(split=split, source_file=str(path), source_row=row_no)
        if isinstance(raw, Unreadable):
            yield Rejected(source=layout, reason=raw.reason, raw=raw.raw, **common)
            continue
        try:
            if layout == "verl":
                yield normalise_verl(raw, **common)
            else:
                yield normalise_hotpot(raw, source=layout, **common)
        except RowError as exc:
            yield Rejected(source=layout, reason=str(exc), raw=preview_row(raw), **common)


def load_sources(specs: list[SourceSpec], extra_rows: list[LoadedRow] = ()) -> tuple[list[dict], list[Rejected]]:
    """Load many files (plus rows already normalised, e.g. the embedded world), de-duplicating ids.

    A second row with an id already loaded is quarantined with a reason naming the first file, so
    ``rows_in == len(rows) + len(rejected)`` always holds.
    """
    rows: list[dict] = []
    rejected: list[Rejected] = []
    seen: dict[str, str] = {}

    def take(item: LoadedRow) -> None:
        if isinstance(item, Rejected):
            rejected.append(item)
            return
        first = seen.get(item["id"])
        if first is not None:
            rejected.append(
                Rejected(
                    source=item["source"],
                    split=item["split"],
                    source_file=item["source_file"],
                    source_row=item["source_row"],
                    reason=f"duplicate id {item['id']!r} (first loaded from {first})",
                    raw=preview_row(item["question"]),
                )
            )
            return
        seen[item["id"]] = item["source_file"]
        rows.append(item)

    for item in extra_rows:
        take(item)
    for spec in specs:
        for item in load_source(spec):
            take(item)
    return rows, rejected


def count_records(spec: SourceSpec) -> int:
    """Count the records a file holds, independently of parsing them (for reconciliation)."""
    path = Path(spec.path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if suffix == ".json":
        return sum(1 for _ in _iter_json_list(path))
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())
