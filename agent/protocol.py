"""The AutoCoA tag protocol and a parser that never fails on model output.

Reasoning sits in ``<think> … </think>``; an action is ``<begin_search> query </end_search>``; the
environment answers with ``<search_result> … </search_result>``; the final answer is ``\\boxed{…}``
after ``</think>``. :func:`parse` turns any text (unclosed or nested tags, empty queries, several
boxed answers, runaway text) into typed steps with character offsets and, given the tokenizer's
per-token character spans, token offsets; problems are reported in ``issues``, never raised.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from qadata.answers import extract_boxed

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ACTION_OPEN, ACTION_CLOSE = "<begin_search>", "</end_search>"
OBS_OPEN, OBS_CLOSE = "<search_result>", "</search_result>"
_TAG = re.compile(
    "|".join(re.escape(t) for t in (THINK_OPEN, THINK_CLOSE, ACTION_OPEN, ACTION_CLOSE, OBS_OPEN, OBS_CLOSE))
)
_CLOSER = {ACTION_OPEN: ACTION_CLOSE, OBS_OPEN: OBS_CLOSE}
_KIND = {ACTION_OPEN: "action", OBS_OPEN: "observation"}


@dataclass(frozen=True)
class Step:
    kind: str  # think | action | observation | answer
    text: str  # the content between the tags (query, result, reasoning or answer text), stripped
    start: int  # character span of the step in the parsed text, tags included
    end: int
    closed: bool = True
    token_start: int | None = None  # token span [token_start, token_end) when offsets were given
    token_end: int | None = None


@dataclass
class Parsed:
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    think_closed: bool = False
    issues: list[str] = field(default_factory=list)

    @property
    def actions(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "action"]

    @property
    def queries(self) -> list[str]:
        return [s.text for s in self.actions if s.closed and s.text]

    @property
    def balanced(self) -> bool:
        return (
            self.think_closed
            and all(s.closed for s in self.steps)
            and not any(i.startswith(("stray", "nested")) for i in self.issues)
        )


def parse(text: str, *, think_open: bool = False, token_offsets: Sequence[tuple[int, int]] | None = None) -> Parsed:
    """Parse a completion. ``think_open`` says the prompt already opened ``<think>`` (prefill)."""
    out = Parsed()
    in_think = think_open
    open_tag: str | None = None  # ACTION_OPEN / OBS_OPEN currently open
    open_at = 0
    cursor = 0  # start of the text not yet assigned to a step

    def add(kind: str, start: int, end: int, content: str, closed: bool = True) -> None:
        if kind == "think" and not content.strip():
            return
        out.steps.append(Step(kind, content.strip(), start, end, closed))

    for m in _TAG.finditer(text):
        tag, pos = m.group(), m.start()
        if open_tag is not None:
            if tag == _CLOSER[open_tag]:
                inner = text[open_at + len(open_tag) : pos]
                add(_KIND[open_tag], open_at, m.end(), inner)
                if open_tag == ACTION_OPEN and not inner.strip():
                    out.issues.append(f"empty query at {open_at}")
                open_tag, cursor = None, m.end()
            elif tag in _CLOSER:  # a new block opens before the current one closed
                out.issues.append(f"nested {tag} at {pos} inside unclosed {open_tag} from {open_at}")
                add(_KIND[open_tag], open_at, pos, text[open_at + len(open_tag) : pos], closed=False)
                open_tag, open_at, cursor = tag, pos, pos
            elif tag == THINK_CLOSE:
                out.issues.append(f"{THINK_CLOSE} at {pos} inside unclosed {open_tag} from {open_at}")
                add(_KIND[open_tag], open_at, pos, text[open_at + len(open_tag) : pos], closed=False)
                open_tag, cursor = None, m.end()
                in_think = _close_think(out, in_think, pos)
            continue
        if tag in _CLOSER:
            if in_think:
                add("think", cursor, pos, text[cursor:pos])
            elif text[cursor:pos].strip():
                out.issues.append(f"text outside <think> before {tag} at {pos}")
            if not in_think:
                out.issues.append(f"{tag} at {pos} outside <think>")
            open_tag, open_at, cursor = tag, pos, pos
        elif tag == THINK_OPEN:
            if in_think:
                out.issues.append(f"nested {THINK_OPEN} at {pos}")
            if in_think:
                add("think", cursor, pos, text[cursor:pos])
            in_think, cursor = True, m.end()
        elif tag == THINK_CLOSE:
            if in_think:
                add("think", cursor, pos, text[cursor:pos])
            in_think = _close_think(out, in_think, pos)
            cursor = m.end()
        else:  # a closer with nothing open
            out.issues.append(f"stray {tag} at {pos}")

    if open_tag is not None:
        out.issues.append(f"unclosed {open_tag} from {open_at}")
        add(_KIND[open_tag], open_at, len(text), text[open_at + len(open_tag) :], closed=False)
    elif in_think:
        add("think", cursor, len(text), text[cursor:])
    if out.think_closed:
        close = text.rfind(THINK_CLOSE)
        tail = text[close + len(THINK_CLOSE) :]
        if tail.strip():
            out.steps.append(Step("answer", tail.strip(), close + len(THINK_CLOSE), len(text)))
        out.answer = extract_boxed(text)
        boxes = tail.count("\\boxed")
        if boxes > 1:
            out.issues.append(f"{boxes} boxed answers; the last one counts")
    if out.answer is None:
        out.issues.append("no boxed answer after </think>")
    if token_offsets is not None:
        out.steps = [_with_tokens(s, token_offsets) for s in out.steps]
    return out


def _close_think(out: Parsed, in_think: bool, pos: int) -> bool:
    if not in_think or out.think_closed:
        out.issues.append(f"stray {THINK_CLOSE} at {pos}")
    out.think_closed = True
    return False


def _with_tokens(step: Step, offsets: Sequence[tuple[int, int]]) -> Step:
    """Token span covering the step: first token ending after its start to last token starting before its end."""
    ends = [e for _, e in offsets]
    starts = [s for s, _ in offsets]
    first = bisect.bisect_right(ends, step.start)
    last = bisect.bisect_left(starts, step.end)
    return Step(step.kind, step.text, step.start, step.end, step.closed, first, max(first, last))
