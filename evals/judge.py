"""LLM-as-judge: does a prediction mean the same as any gold answer? (Table 1's "LLM" columns.)

EM misses paraphrases ("JFK" for "John F. Kennedy"), so the paper also reports a judged accuracy.
The judge runs through any :class:`agent.engine_api.Engine`, all items in one ``generate`` call, and
every verdict keeps the raw judge text and the prompt id: a judge that answers neither yes nor no
is *unparsable* (``verdict=None``, with a reason), never silently counted as either.

A prompt's id is stored with every verdict, so a change of wording is a new prompt id, never an edit.

By default the verdict is *constrained*: the judge writes exactly one token, chosen among the tokens
that spell yes or no (``GenRequest.allowed_token_ids``), so its greedy choice is the likelier of the
two answers and every asked row gets a verdict. This is what makes a small judge usable at all (the
embedded 135M model rarely starts a free reply with yes or no); with ``constrained=False`` the judge
writes freely and anything but yes/no is kept as unparsable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from agent.engine_api import Engine, GenRequest

_FIRST_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class JudgePrompt:
    id: str
    template: str  # str.format fields: question, golds, prediction

    def render(self, question: str, prediction: str, golden_answers: Sequence[str]) -> str:
        golds = "\n".join(f"- {g}" for g in golden_answers)
        return self.template.format(question=question, golds=golds, prediction=prediction)


JUDGE_PROMPTS: dict[str, JudgePrompt] = {
    p.id: p
    for p in [
        JudgePrompt(
            "judge-match-v1",
            "You are grading answers to a question. Decide whether the predicted answer refers to the same "
            "thing as at least one of the gold answers. Ignore differences of case, punctuation, articles, "
            'word order and formatting, and accept aliases and equivalent forms ("JFK" for "John F. '
            'Kennedy", "1 March 1990" for "March 1, 1990"). A prediction that is vaguer than the gold '
            "answer, adds a conflicting detail, or lists several candidates is incorrect.\n\n"
            "Question: {question}\n"
            "Gold answers:\n{golds}\n"
            "Predicted answer: {prediction}\n\n"
            "Is the predicted answer correct? Reply with one word: yes or no.",
        ),
    ]
}
DEFAULT_JUDGE_PROMPT = "judge-match-v1"


@dataclass(frozen=True)
class JudgeItem:
    question: str
    prediction: str | None  # None: the policy gave no (boxed) answer
    golden_answers: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    """One judgement. ``verdict`` is True/False, or None when the judge's text was unparsable."""

    verdict: bool | None
    raw: str | None  # the judge's text; None when the judge was not called
    reason: str  # how the verdict was reached (parsed / skipped / why unparsable)
    prompt_id: str
    judge_model: str

    @property
    def correct(self) -> bool:
        """For accuracy: an unparsable verdict counts as incorrect, so every method is scored over the
        same questions; the unparsable count is reported beside it, not hidden."""
        return self.verdict is True

    def as_row(self) -> dict:
        return {
            "judge": self.verdict,
            "judge_raw": self.raw,
            "judge_reason": self.reason,
            "judge_prompt_id": self.prompt_id,
            "judge_model": self.judge_model,
        }


def parse_verdict(text: str) -> tuple[bool | None, str]:
    """``(verdict, reason)`` from a judge's text: its first word after any ``</think>``, yes or no.

    Anything else ("maybe", "The answer is correct", an empty reply) is unparsable: guessing from a
    free-form reply would put our heuristics, not the judge, in Table 1.
    """
    tail = text.rsplit("</think>", 1)[-1] if "</think>" in text else text
    if "<think>" in tail:
        return None, "unparsable: the judge did not finish its reasoning (no </think>)"
    match = _FIRST_WORD.search(tail.lower())
    if match is None:
        return (
            None,
            "unparsable: empty verdict" if not tail.strip() else f"unparsable: no word in {tail.strip()[:60]!r}",
        )
    word = match.group(0)
    if word == "yes":
        return True, "parsed: yes"
    if word == "no":
        return False, "parsed: no"
    return None, f"unparsable: expected yes or no, got {tail.strip()[:60]!r}"


def verdict_token_ids(tokenizer) -> tuple[int, ...]:
    """The single-token spellings of yes and no in a tokenizer (any case, with or without a leading space).

    Raises when the tokenizer has no one-token form of either word: the constrained judge could not answer.
    """
    found: dict[str, set[int]] = {"yes": set(), "no": set()}
    for word, spellings in found.items():
        for form in {word, word.capitalize(), word.upper()}:
            for text in (form, " " + form):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) == 1 and tokenizer.decode(ids).strip().lower() == word:
                    spellings.add(ids[0])
    missing = [w for w, ids in found.items() if not ids]
    if missing:
        raise ValueError(f"the judge's tokenizer has no single-token {' or '.join(missing)}: use constrained=False")
    return tuple(sorted(found["yes"] | found["no"]))


def _prompt_ids(tokenizer, text: str) -> list[int]:
    """Chat-format the judge prompt when the tokenizer has a chat template (instruct models), else raw."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    return tokenizer.encode(text, add_special_tokens=False)


def judge(
    engine: Engine,
    items: Sequence[JudgeItem],
    *,
    prompt_id: str = DEFAULT_JUDGE_PROMPT,
    max_new_tokens: int = 8,
    seed: int = 0,
    constrained: bool = True,
) -> list[Verdict]:
    """Judge every item in one batched ``engine.generate`` call; verdicts come back in item order.

    An item without a prediction is judged False without calling the model (a missing answer is
    wrong whatever a judge would say). An item without gold answers cannot be judged: None.
    Decoding is greedy (temperature 0) so a verdict is reproducible. ``max_new_tokens`` is small
    on purpose: the judge should be an instruct model that answers at once; a reasoning judge needs
    a larger budget, or every verdict comes back unparsable (no ``</think>``). With ``constrained``
    (the default) the judge writes one token among :func:`verdict_token_ids` and ``max_new_tokens``
    is not used; the reason says the decoding was constrained.
    """
    if prompt_id not in JUDGE_PROMPTS:
        raise ValueError(f"unknown judge prompt {prompt_id!r}; known: {sorted(JUDGE_PROMPTS)}")
    prompt = JUDGE_PROMPTS[prompt_id]
    model = str(getattr(engine, "model_name", None) or getattr(engine, "name", "unknown"))
    out: list[Verdict | None] = [None] * len(items)
    to_ask: list[int] = []
    requests: list[GenRequest] = []
    allowed = verdict_token_ids(engine.tokenizer) if constrained else None
    budget = 1 if constrained else max_new_tokens
    for i, item in enumerate(items):
        if item.prediction is None or not item.prediction.strip():
            out[i] = Verdict(
                False, None, "skipped: no prediction (no boxed answer), judged incorrect", prompt.id, model
            )
        elif not item.golden_answers:
            out[i] = Verdict(None, None, "skipped: no gold answers to compare with", prompt.id, model)
        else:
            text = prompt.render(item.question, item.prediction.strip(), item.golden_answers)
            requests.append(
                GenRequest(
                    _prompt_ids(engine.tokenizer, text),
                    budget,
                    temperature=0.0,
                    top_p=1.0,
                    seed=seed,
                    allowed_token_ids=allowed,
                )
            )
            to_ask.append(i)
    if requests:
        results = engine.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"judge engine {model!r} returned {len(results)} results for {len(requests)} requests")
        for i, res in zip(to_ask, results):
            verdict, reason = parse_verdict(res.text)
            if constrained:
                reason += " (decoding constrained to yes/no)"
            elif verdict is None and res.finish_reason == "length":
                reason += f" (cut at max_new_tokens={max_new_tokens})"
            out[i] = Verdict(verdict, res.text, reason, prompt.id, model)
    return out  # type: ignore[return-value]  # every slot was filled above
