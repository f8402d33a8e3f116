"""FlashRAG corpora: ``{"id", "contents": "Title\\ntext"}`` per jsonl line.

Built from the context paragraphs of a question set (de-duplicated), or read from an existing
FlashRAG corpus file such as wiki-18, with malformed lines quarantined.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from qadata.schema import Rejected, SourceError
from qadata.text import join_sentences


def make_contents(title: str, text: str) -> str:
    return f"{title}\n{text}"


def corpus_from_questions(rows: Iterable[dict]) -> tuple[list[dict], int]:
    """De-duplicated passages from question contexts; returns (passages, paragraphs seen).

    Two paragraphs are the same passage when title and text are identical; ids are positional
    strings in first-seen order, so the same input always yields the same ids.
    """
    seen: dict[tuple[str, str], int] = {}
    passages: list[dict] = []
    total = 0
    for row in rows:
        for para in row.get("context") or []:
            total += 1
            title, text = para["title"].strip(), join_sentences(list(para["sentences"]))
            key = (title, text)
            if key in seen:
                continue
            seen[key] = len(passages)
            passages.append(
                {"id": str(len(passages)), "title": title, "text": text, "contents": make_contents(title, text)}
            )
    return passages, total


def read_flashrag_corpus(path: str | Path) -> Iterator[dict | Rejected]:
    """Yield passages of a FlashRAG jsonl corpus; malformed lines become :class:`Rejected`."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: corpus file not found")
    seen: set[str] = set()
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue

            def reject(reason: str, raw: str, lineno: int = lineno) -> Rejected:
                return Rejected(
                    source="flashrag",
                    split="corpus",
                    source_file=str(path),
                    source_row=lineno,
                    reason=f"line {lineno}: {reason}",
                    raw=raw,
                )

            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield reject(f"not valid UTF-8 (byte {exc.start})", line.decode("utf-8", "replace"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield reject(f"malformed JSON ({exc.msg})", text)
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("contents"), str) or not obj["contents"].strip():
                yield reject("missing or empty 'contents'", text)
                continue
            pid = str(obj.get("id", lineno - 1))
            if pid in seen:
                yield reject(f"duplicate id {pid!r}", text)
                continue
            seen.add(pid)
            title, _, body = obj["contents"].partition("\n")
            yield {"id": pid, "title": title.strip().strip('"'), "text": body.strip(), "contents": obj["contents"]}
