"""Answer extraction and the HotpotQA/SQuAD answer metrics (EM, F1, cover-EM).

``normalise_answer``, ``exact_match`` and ``f1`` follow the official HotpotQA scorer's definitions
to the letter (lower-case; drop ASCII punctuation; drop the articles a/an/the; collapse
whitespace; F1 is zero when exactly one side is yes/no/noanswer). Unicode letters and non-ASCII
punctuation are kept, as the official scorer keeps them. With several gold answers each metric is
the maximum over them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL = ("yes", "no", "noanswer")
_BOXED = re.compile(r"\\boxed\s*\{")
_OBSERVATION = re.compile(r"<search_result>.*?(?:</search_result>|\Z)", re.S)


def normalise_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(gold)


def f1_precision_recall(prediction: str, gold: str) -> tuple[float, float, float]:
    pred, ref = normalise_answer(prediction), normalise_answer(gold)
    if (pred in _SPECIAL or ref in _SPECIAL) and pred != ref:
        return 0.0, 0.0, 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def f1(prediction: str, gold: str) -> float:
    return f1_precision_recall(prediction, gold)[0]


def cover_exact_match(prediction: str, gold: str) -> bool:
    """Search-R1/FlashRAG "cover EM": the normalised gold occurs inside the normalised prediction."""
    ref = normalise_answer(gold)
    return bool(ref) and ref in normalise_answer(prediction)


@dataclass(frozen=True)
class Scores:
    em: float
    f1: float
    cover_em: float


def score(prediction: str | None, golds: Sequence[str]) -> Scores:
    """Best EM, F1 and cover-EM of one prediction over all gold answers (0 when no prediction)."""
    if prediction is None or not golds:
        return Scores(0.0, 0.0, 0.0)
    return Scores(
        em=float(max(exact_match(prediction, g) for g in golds)),
        f1=max(f1(prediction, g) for g in golds),
        cover_em=float(max(cover_exact_match(prediction, g) for g in golds)),
    )


def strip_observations(text: str) -> str:
    """``text`` with every ``<search_result> … </search_result>`` block removed (an unclosed block runs to the
    end): what the environment wrote is never read as the policy's answer or reasoning."""
    return _OBSERVATION.sub(" ", text)


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed) after the last ``</think>``, never
    inside a search-result block.

    Observation blocks are removed first (:func:`strip_observations`), so a ``\\boxed{}`` or a ``</think>``
    that a search result happens to contain is not credited. Without a ``</think>`` the rest of the text is
    searched. Returns ``None`` when there is no complete boxed answer (an unclosed ``\\boxed{`` does not
    count). The reward, the pair miner and every evaluation metric grade this one extraction.
    """
    text = strip_observations(text)
    end_think = text.rfind("</think>")
    tail = text[end_think + len("</think>") :] if end_think >= 0 else text
    answer = None
    for match in _BOXED.finditer(tail):
        depth, i = 1, match.end()
        while i < len(tail) and depth:
            depth += {"{": 1, "}": -1}.get(tail[i], 0)
            i += 1
        if depth == 0:
            answer = tail[match.end() : i - 1].strip()
    return answer
