"""The one normalised question schema every source is loaded into, and its quarantine schema."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

SUPPORTING_FACT = pa.struct([("title", pa.string()), ("sent_id", pa.int32())])
PARAGRAPH = pa.struct([("title", pa.string()), ("sentences", pa.list_(pa.string()))])

QUESTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("type", pa.string()),
        ("level", pa.string()),
        ("supporting_facts", pa.list_(SUPPORTING_FACT)),
        ("context", pa.list_(PARAGRAPH)),
        ("source", pa.string()),
        ("split", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("split", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)

SOURCES = ("embedded", "hotpotqa_json", "hf", "verl")
RAW_PREVIEW_CHARS = 2000


class RowError(ValueError):
    """A single input row cannot be normalised; it is quarantined with this message as reason."""


class SourceError(RuntimeError):
    """A whole input file cannot be read; the message names the file (and line when known)."""


@dataclass(frozen=True)
class Rejected:
    source: str
    split: str
    source_file: str
    source_row: int
    reason: str
    raw: str

    def as_row(self) -> dict:
        return {
            "source": self.source,
            "split": self.split,
            "source_file": self.source_file,
            "source_row": self.source_row,
            "reason": self.reason,
            "raw": self.raw[:RAW_PREVIEW_CHARS],
        }


def reason_kind(reason: str) -> str:
    """Group quarantine reasons for a summary: drop line numbers, offending values and details."""
    kind = re.sub(r"^line \d+:?\s*", "", reason)
    kind = re.sub(r"(duplicate id|title) '[^']*'", r"\1 …", kind)
    return kind.split(" (")[0].strip()


def questions_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA)


def rejected_table(rows: list[Rejected]) -> pa.Table:
    return pa.Table.from_pylist([r.as_row() for r in rows], schema=REJECTED_SCHEMA)
