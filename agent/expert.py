"""An expert demonstrator for the generated world: a scripted teacher behind the engine interface.

The paper distils a 32B teacher into a 7B student; on CPU the only model is the 135M student, so the
embedded profile's teacher is a program, as ALFWorld's and BabyAI's scripted experts are. It runs
through the same rollout (Algorithm 1), the same token spans and masks and the real search engine:
each call decodes the context it is given, reads the question (the last user turn) and the
``<search_result>`` blocks already in it, decides the next step and returns token ids, cut by the
request's stop strings and ``max_new_tokens`` exactly as a model engine's are.

What it may read: the question text and the observations in its context. It never sees a gold
answer, a supporting fact or the world's tables; it knows only the world's *grammar* (how questions
are phrased, how paragraphs state a fact), the way a human expert knows how a Wikipedia article is
laid out. So it fails where search fails: an entity whose paragraph is not among the results is
searched once more, then guessed.

- **CoA** (``</end_search>`` among the stop strings: the tool is on): one entity-name search per
  hop, a one-sentence statement of what the result says, then the next search or the answer.
  At temperature T > 0 it sometimes misreads a result (takes the value from another passage of the
  results) or skips a needed search and guesses, so some trajectories are wrong, as a sampled
  LLM's are; at T = 0 it is deterministic and errs only where retrieval does.
- **CoT** (no tool): it cannot know invented facts, so it reasons from what the question states and
  commits to a guess, right only by chance (yes/no and two-way comparisons): the CoT/CoA error
  structure the paper mines contrastive pairs from.

Every step has several phrasings (drawn per request) within one regular structure, and the last
sentence before ``</think>`` is always ``So the answer is X.``: short, explicit demonstrations for a
small student. The temperature is the request's (``RolloutConfig.temperature``) unless the engine
is built with one.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.engine_api import GenRequest, GenResult, cut_at_stop
from agent.protocol import ACTION_CLOSE, ACTION_OPEN, OBS_CLOSE, OBS_OPEN, THINK_CLOSE

EXPERT_MODEL = "expert-demonstrator-v1"  # recorded as the rows' model; the engine name is "expert"
MISREAD_RATE = 0.25  # per read, times T: the value is taken from another passage of the results
SKIP_RATE = 0.15  # per needed follow-up search, times T: the search is skipped and the answer guessed
MAX_ATTEMPTS = 2  # searches for one entity before the expert gives up on it and guesses

# -- the question grammar: pattern -> (start entities, attributes read hop by hop, comparison) -------
# Longer, more specific patterns first: "the founder of the organisation that first presented X" must
# not be read as "the founder of the X".
_Q = [
    (
        r"What is the capital of the country in which the creator of (?P<a>.+) was born\?",
        ("creator", "birth_city", "country", "capital"),
        None,
    ),
    (
        r"In which country are the headquarters of the organisation that the creator of (?P<a>.+) has been associated "
        r"with\?",
        ("creator", "employer", "headquarters", "country"),
        None,
    ),
    (
        r"In which country was the founder of the organisation that first presented (?P<a>.+) born\?",
        ("publisher", "founder", "birth_city", "country"),
        None,
    ),
    (
        r"In what year was the founder of the organisation that first presented (?P<a>.+) born\?",
        ("publisher", "founder", "birth_year"),
        None,
    ),
    (
        r"In which country are the headquarters of the organisation that (?P<a>.+) has been associated with\?",
        ("employer", "headquarters", "country"),
        None,
    ),
    (
        r"In which city are the headquarters of the organisation that (?P<a>.+) has been associated with\?",
        ("employer", "headquarters"),
        None,
    ),
    (r"In which country was the founder of the (?P<a>.+) born\?", ("founder", "birth_city", "country"), None),
    (r"In which country was the creator of (?P<a>.+) born\?", ("creator", "birth_city", "country"), None),
    (r"In which city was the person who [a-z]+ the [a-z ]+? (?P<a>The .+) born\?", ("creator", "birth_city"), None),
    (r"In what year was the creator of (?P<a>.+) born\?", ("creator", "birth_year"), None),
    (r"(?P<a>.+) was born in a city of which country\?", ("birth_city", "country"), None),
    (r"What was the occupation of the founder of the (?P<a>.+)\?", ("founder", "occupation"), None),
    (r"In which city was (?P<a>.+) born\?", ("birth_city",), None),
    (r"In what year was the (?P<a>.+) founded\?", ("founded",), None),
    (r"Which organisation first presented (?P<a>.+) to the public\?", ("publisher",), None),
    (r"Who was born first, (?P<a>.+) or (?P<b>.+)\?", ("birth_year",), "min"),
    (r"Which was founded earlier, the (?P<a>.+) or the (?P<b>.+)\?", ("founded",), "min"),
    (r"Which city has the larger population, (?P<a>.+) or (?P<b>.+)\?", ("population",), "max"),
    (r"Are (?P<a>.+) and (?P<b>.+) of the same nationality\?", ("nationality",), "same"),
    (r"Do (?P<a>.+) and (?P<b>.+) share the same occupation\?", ("occupation",), "same"),
]
_QUESTIONS = [(re.compile(p), attrs, cmp) for p, attrs, cmp in _Q]

# how a paragraph states each fact (the world's sentence shapes)
_FACT = {
    "creator": r"(?:written|directed|composed|painted|designed|made) by ([^.]+)\.",
    "publisher": r"presented to the public by the ([^.]+)\.",
    "birth_city": r"born in the city of ([^.]+)\.",
    "birth_year": r"\(born (\d+)\)",
    "occupation": r"\(born \d+\) is an? \S+ ([^.]+)\.",
    "nationality": r"\(born \d+\) is an? (\S+) ",
    "employer": r"associated with the (.+?) for most of",
    "country": r"is a city in ([^.]+)\.",
    "capital": r"capital and largest city is ([^.]+)\.",
    "founder": r"founded in \d+ by ([^.]+)\.",
    "founded": r"founded in (\d+) by",
    "headquarters": r"headquarters are in ([^.]+)\.",
    "population": r"population of ([\d,]+)\.",
}
_FACT_RE = {k: re.compile(v) for k, v in _FACT.items()}
# the kind of entity whose paragraph states the attribute (for articles and for a refined query)
_HOLDER = {
    "creator": "work",
    "publisher": "work",
    "birth_city": "person",
    "birth_year": "person",
    "occupation": "person",
    "nationality": "person",
    "employer": "person",
    "country": "city",
    "population": "city",
    "capital": "country",
    "founder": "org",
    "founded": "org",
    "headquarters": "org",
}
_REFINE = {
    "work": "first presented",
    "person": "born",
    "city": "city census",
    "country": "sovereign state",
    "org": "founded headquarters",
}
_NUMERIC = {"birth_year", "founded", "population"}

# -- phrasings --------------------------------------------------------------------------------------
_NEED = {
    "creator": ["who created {e}", "the creator of {e}"],
    "publisher": ["who first presented {e}", "the organisation that first presented {e}"],
    "birth_city": ["where {e} was born", "the birth city of {e}"],
    "birth_year": ["when {e} was born", "the birth year of {e}"],
    "occupation": ["the occupation of {e}", "what {e} does for a living"],
    "nationality": ["the nationality of {e}"],
    "employer": ["the organisation {e} is associated with", "where {e} has worked"],
    "country": ["the country {e} is in", "which country {e} belongs to"],
    "capital": ["the capital of {e}", "which city is the capital of {e}"],
    "founder": ["the founder of {e}", "who founded {e}"],
    "founded": ["when {e} was founded", "the founding year of {e}"],
    "headquarters": ["where {e} has its headquarters", "the headquarters of {e}"],
    "population": ["the population of {e}"],
}
_SAYS = {
    "creator": ["{e} is by {v}.", "{e} was created by {v}.", "The creator of {e} is {v}."],
    "publisher": ["{e} was first presented by the {v}.", "The {v} first presented {e}."],
    "birth_city": ["{e} was born in {v}.", "{e}'s birth city is {v}.", "The result says {e} was born in {v}."],
    "birth_year": ["{e} was born in {v}.", "{e}'s birth year is {v}."],
    "occupation": ["{e} is a {v}.", "{e} works as a {v}."],
    "nationality": ["{e} is {v}.", "{e}'s nationality is {v}."],
    "employer": ["{e} is associated with the {v}.", "{e} has worked with the {v}."],
    "country": ["{e} is in {v}.", "{e} is a city in {v}."],
    "capital": ["The capital of {e} is {v}.", "{e}'s capital is {v}."],
    "founder": ["{e} was founded by {v}.", "The founder of {e} is {v}."],
    "founded": ["{e} was founded in {v}.", "The founding year of {e} is {v}."],
    "headquarters": ["{e} has its headquarters in {v}.", "The headquarters of {e} are in {v}."],
    "population": ["{e} has a population of {v}.", "The population of {e} is {v}."],
}
_FIRST = ["I need {need}.", "First I need {need}.", "To answer, I first need {need}."]
_THEN = ["Now I need {need}.", "Next I need {need}.", "Then I need {need}."]
_COMPARE_NEED = {
    "birth_year": "when {a} and {b} were born",
    "founded": "when {a} and {b} were founded",
    "population": "the populations of {a} and {b}",
    "nationality": "the nationalities of {a} and {b}",
    "occupation": "the occupations of {a} and {b}",
}
_COMPARE_FIRST = ["I need {need}.", "To compare, I need {need}."]
_COMPARE_THEN = ["Now I look up {b}.", "Next I need {b}.", "Now I search for {b}."]
_RETRY = ["The results do not show {e}. I search again.", "{e} is not in the results, so I try a more specific query."]
_GIVE_UP = ["I cannot find {e}, so I have to guess.", "The search does not find {e}; I will guess."]
_SKIP = ["I am fairly sure of the rest without another search.", "I think I already know the rest."]
_COT_OPEN = ["The question is about {e}.", "This question starts from {e}.", "I need {need}."]
_COT_COMPARE_OPEN = ["The question compares {a} and {b}.", "I need to compare {a} and {b}."]
_COT_GUESS = [
    "I cannot look this up, so I have to guess.",
    "Without a search I can only guess.",
    "I do not know this, so I will make my best guess.",
]
_FINAL = "So the answer is {v}."

# invented-sounding guesses (the expert's own syllables, unrelated to the world's tables)
_SYLLABLES = [
    "ar",
    "bel",
    "cor",
    "dun",
    "el",
    "fen",
    "gar",
    "hal",
    "is",
    "kel",
    "lor",
    "mer",
    "nor",
    "os",
    "pel",
    "ran",
    "sel",
    "tor",
    "ul",
    "ven",
    "wyn",
    "zar",
]
_GUESS_OCCUPATIONS = [
    "novelist",
    "painter",
    "composer",
    "architect",
    "poet",
    "engineer",
    "physicist",
    "teacher",
    "film director",
    "sculptor",
    "chemist",
    "playwright",
    "journalist",
]
_GUESS_ORGS = ["Press", "University", "Institute", "Gazette", "Bank", "Pictures"]


@dataclass
class _Block:
    query: str
    results: list[tuple[str, str]]  # (title, text) in rank order; empty for no results or a refused action


@dataclass
class _Plan:
    start: tuple[str, ...]  # the entities the question names (two for a comparison)
    attrs: tuple[str, ...]  # attributes read hop by hop (a comparison reads one, for both entities)
    compare: str | None = None  # "min" | "max" | "same" | None (a chain)

    @property
    def answer_kind(self) -> str:
        if self.compare == "same":
            return "yesno"
        if self.compare:
            return "pick"
        return self.attrs[-1]


@dataclass
class _Step:
    """What to write next: a search (``query``) or a final answer (``answer``), after ``text``."""

    text: list[str] = field(default_factory=list)
    query: str | None = None
    answer: str | None = None
    kind: str = ""  # search | retry | final | give_up | skip | guess (meta, for counting)
    noise: str | None = None


def parse_question(text: str) -> _Plan | None:
    """The plan for a question of the generated world, or None for a question it does not know."""
    text = " ".join(text.split())
    for pattern, attrs, cmp in _QUESTIONS:
        m = pattern.fullmatch(text)
        if m:
            start = (m["a"], m["b"]) if cmp else (m["a"],)
            return _Plan(tuple(s.strip() for s in start), attrs, cmp)
    return None


def split_context(text: str) -> tuple[str, str]:
    """``(question, assistant text so far)`` from a decoded chat context.

    The question is the last line of the last user turn that the question grammar knows (another
    template may put instructions or worked examples around it), else that turn's last line, without
    a ``Question:`` label. The assistant text is everything after the last assistant header.
    """
    user_at = text.rfind("<|im_start|>user")
    if user_at >= 0:
        end = text.find("<|im_end|>", user_at)
        user = text[user_at + len("<|im_start|>user") : end if end >= 0 else len(text)]
        asst_at = text.find("<|im_start|>assistant", user_at)
        assistant = text[asst_at + len("<|im_start|>assistant") :].lstrip("\n") if asst_at >= 0 else ""
    else:
        user, assistant = text, ""
    lines = [re.sub(r"^Question:\s*", "", ln.strip()) for ln in user.split("\n") if ln.strip()]
    for line in reversed(lines):
        if parse_question(line) is not None:
            return line, assistant
    return (lines[-1] if lines else ""), assistant


_BLOCK = re.compile(
    re.escape(ACTION_OPEN)
    + r"(.*?)"
    + re.escape(ACTION_CLOSE)
    + r"\s*"
    + re.escape(OBS_OPEN)
    + r"(.*?)"
    + re.escape(OBS_CLOSE),
    re.S,
)
_RESULT = re.compile(r'^result \d+: "(.*)"$', re.M)


def read_observations(assistant: str) -> list[_Block]:
    """Every executed action of the assistant text with the passages its observation shows."""
    blocks = []
    for m in _BLOCK.finditer(assistant):
        body = m.group(2)
        heads = list(_RESULT.finditer(body))
        results = [
            (h.group(1), body[h.end() : heads[i + 1].start() if i + 1 < len(heads) else len(body)].strip())
            for i, h in enumerate(heads)
        ]
        blocks.append(_Block(" ".join(m.group(1).split()), results))
    return blocks


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _read(attr: str, text: str) -> str | None:
    m = _FACT_RE[attr].search(text)
    return m.group(1).strip() if m else None


def _ref(name: str, attr: str) -> str:
    """How a sentence names the entity holding ``attr``: organisations take the article."""
    return f"the {name}" if _HOLDER[attr] == "org" and not name.lower().startswith("the ") else name


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class ExpertEngine:
    """The expert demonstrator as an engine: ``generate(requests) -> results``, token ids in and out.

    Args:
        tokenizer: the student's tokenizer (the expert's text is encoded with it, so the student
            trains on exactly these ids).
        temperature: fixed sampling temperature; None (default) takes each request's.
        seed: mixed into every request's seed (requests without a seed draw from an engine-wide stream).
        misread_rate, skip_rate: error rates per read / per needed follow-up search, multiplied by T.
    """

    name = "expert"

    def __init__(
        self,
        tokenizer,
        *,
        temperature: float | None = None,
        seed: int = 0,
        misread_rate: float = MISREAD_RATE,
        skip_rate: float = SKIP_RATE,
    ):
        self.tokenizer = tokenizer
        self.model_name = EXPERT_MODEL
        self.temperature, self.seed = temperature, seed
        self.misread_rate, self.skip_rate = misread_rate, skip_rate
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        if not self.eos_ids:
            raise ValueError("the expert needs a tokenizer with an EOS token (it ends every answer with it)")
        self._stream = random.Random(seed)

    # -- the engine interface -------------------------------------------------------------------
    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        return [self._one(r) for r in requests]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _one(self, req: GenRequest) -> GenResult:
        if req.allowed_token_ids:
            raise ValueError("the expert demonstrator writes trajectories; it cannot act as a constrained judge")
        context = self._decode(req.prompt_ids)
        question, assistant = split_context(context)
        temperature = self.temperature if self.temperature is not None else req.temperature
        rng = self._rng(req, question, assistant, temperature)
        text, step = self.write(question, assistant, tools=ACTION_CLOSE in req.stop, temperature=temperature, rng=rng)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if step.answer is not None and step.kind != "boxed":
            ids.append(min(self.eos_ids))
        res = cut_at_stop(ids, self._decode, req.stop, self.eos_ids, req.max_new_tokens)
        res.meta.update({"expert_step": step.kind, "noise": step.noise})
        return res

    def _rng(self, req: GenRequest, question: str, assistant: str, temperature: float) -> random.Random:
        # T = 0: phrasings vary across questions and turns but are a function of the context alone
        if temperature <= 0 or req.seed is None:
            if temperature > 0:
                return random.Random(self._stream.getrandbits(64))
            key = f"{self.seed}|{question}|{len(assistant)}".encode()
        else:
            key = f"{self.seed}|{req.seed}".encode()
        return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))

    # -- deciding and writing ------------------------------------------------------------------
    def write(
        self, question: str, assistant: str, *, tools: bool, temperature: float, rng: random.Random
    ) -> tuple[str, _Step]:
        """The text the expert writes after ``assistant`` (the reasoning so far) for ``question``."""
        plan = parse_question(question)
        p_misread = min(1.0, self.misread_rate * max(temperature, 0.0))
        p_skip = min(1.0, self.skip_rate * max(temperature, 0.0))
        tail = assistant.rstrip()
        if re.search(r"\\boxed\{[^}]*$", assistant):  # a forced answer: only the answer and the brace
            step = self._next(plan, question, read_observations(assistant), rng, 0.0, 0.0)
            answer = step.answer if step.answer is not None else self._guess(plan, question, rng)
            return f"{answer}}}", _Step(answer=answer, kind="boxed")
        if assistant.rfind(OBS_OPEN) > assistant.rfind(OBS_CLOSE):  # simulated environment: close the block
            return f"No results found.\n{OBS_CLOSE}", _Step(kind="simulated")
        open_action = assistant.rfind(ACTION_OPEN) > assistant.rfind(ACTION_CLOSE)
        blocks = read_observations(assistant)
        if not tools:
            step = self._cot(plan, question, blocks, rng, started=bool(tail) and tail != "<think>")
        else:
            step = self._next(plan, question, blocks, rng, p_misread, p_skip)
            if open_action:  # the context opened the action (a contrastive branch): write only the query
                if step.query is None:
                    step = _Step(query=plan.start[0] if plan else question.rstrip("?"), kind="search")
                return f" {step.query} {ACTION_CLOSE}", step
        lead = "" if not tail or tail.endswith(("<think>", OBS_CLOSE)) or assistant.endswith((" ", "\n")) else " "
        return lead + self._render(step), step

    def _render(self, step: _Step) -> str:
        body = " ".join(step.text)
        if step.query is not None:
            return f"{body} {ACTION_OPEN} {step.query} {ACTION_CLOSE}".lstrip()
        final = _FINAL.format(v=step.answer)
        return f"{body} {final}".lstrip() + f"{THINK_CLOSE}\n\nThe answer is \\boxed{{{step.answer}}}."

    def _next(
        self,
        plan: _Plan | None,
        question: str,
        blocks: list[_Block],
        rng: random.Random,
        p_misread: float,
        p_skip: float,
    ) -> _Step:
        """The next CoA step, recomputed from the question and the observations each call.

        The entity of a later hop is whatever the expert searched after the earlier one (its own
        queries are its memory), so a value misread in one turn stays misread in the next.
        """
        if plan is None:
            if not blocks:
                return _Step(
                    [rng.choice(["I search for the question directly.", "Let me search for this."])],
                    query=question.rstrip("?"),
                    kind="search",
                )
            top = next((b.results[0][0] for b in reversed(blocks) if b.results), None)
            return _Step(["The top result is the best match."], answer=top or "unknown", kind="final")
        if plan.compare:
            return self._next_compare(plan, blocks, rng, p_misread, p_skip)
        entity, at = plan.start[0], 0
        for hop, attr in enumerate(plan.attrs):
            found = self._lookup(entity, attr, blocks, at, rng, question, plan)
            if isinstance(found, _Step):
                if hop == 0 and found.kind == "search":
                    found.text = [
                        _cap(rng.choice(_FIRST).format(need=rng.choice(_NEED[attr]).format(e=_ref(entity, attr))))
                    ]
                return found
            para, at, results = found
            value = _read(attr, para)
            last = hop == len(plan.attrs) - 1
            if at < len(blocks) and not last:  # already searched the next entity: follow its query
                entity = blocks[at].query
                continue
            noise = None
            if rng.random() < p_misread:
                misread = self._misread(attr, entity, value, results, rng)
                if misread is not None:
                    value, noise = misread, "misread"
            says = _cap(rng.choice(_SAYS[attr]).format(e=_ref(entity, attr), v=value))
            if last:
                return _Step([says], answer=value, kind="final", noise=noise)
            nxt = plan.attrs[hop + 1]
            if rng.random() < p_skip:
                return _Step(
                    [says, rng.choice(_SKIP)], answer=self._guess(plan, question, rng), kind="skip", noise="skip"
                )
            need = rng.choice(_THEN).format(need=rng.choice(_NEED[nxt]).format(e=_ref(value, nxt)))
            return _Step([says, need], query=value, kind="search", noise=noise)
        raise AssertionError("unreachable: the last hop returns")

    def _next_compare(
        self, plan: _Plan, blocks: list[_Block], rng: random.Random, p_misread: float, p_skip: float
    ) -> _Step:
        (a, b), attr = plan.start, plan.attrs[0]
        found_a = self._lookup(a, attr, blocks, 0, rng, "", plan)
        if isinstance(found_a, _Step):
            if found_a.kind == "search":
                need = _COMPARE_NEED[attr].format(a=_ref(a, attr), b=_ref(b, attr))
                found_a.text = [_cap(rng.choice(_COMPARE_FIRST).format(need=need))]
            return found_a
        para_a, at, _ = found_a
        va = _read(attr, para_a)
        says_a = _cap(rng.choice(_SAYS[attr]).format(e=_ref(a, attr), v=va))
        found_b = self._lookup(b, attr, blocks, at, rng, "", plan)
        if isinstance(found_b, _Step):
            if found_b.kind == "search":
                if rng.random() < p_skip:
                    return _Step(
                        [says_a, rng.choice(_SKIP)], answer=self._guess(plan, "", rng), kind="skip", noise="skip"
                    )
                found_b.text = [says_a, rng.choice(_COMPARE_THEN).format(b=_ref(b, attr))]
            return found_b
        para_b, _, results = found_b
        vb, noise = _read(attr, para_b), None
        if rng.random() < p_misread:
            misread = self._misread(attr, b, vb, results, rng)
            if misread is not None:
                vb, noise = misread, "misread"
        says_b = _cap(rng.choice(_SAYS[attr]).format(e=_ref(b, attr), v=vb))
        if plan.compare == "same":
            same = _norm(va) == _norm(vb)
            why = "They are the same." if same else rng.choice(["They differ.", f"{_cap(va)} and {vb} differ."])
            return _Step([says_b, why], answer="yes" if same else "no", kind="final", noise=noise)
        x, y = (int(v.replace(",", "")) for v in (va, vb))
        first = (x <= y) if plan.compare == "min" else (x >= y)
        word = "earlier than" if plan.compare == "min" else "larger than"
        hi, lo = (va, vb) if first else (vb, va)
        return _Step([says_b, f"{hi} is {word} {lo}."], answer=a if first else b, kind="final", noise=noise)

    def _lookup(
        self, entity: str, attr: str, blocks: list[_Block], at: int, rng: random.Random, question: str, plan: _Plan
    ) -> tuple[str, int, list[tuple[str, str]]] | _Step:
        """The paragraph of ``entity`` among the results of its searches (from block ``at`` on), with the
        index after its last search and the passages those searches showed; or the step to take instead."""
        key = _norm(entity)
        mine = [
            i
            for i in range(at, len(blocks))
            if _norm(blocks[i].query) == key or _norm(blocks[i].query).startswith(key + " ")
        ]
        if not mine:
            return _Step(query=entity, kind="search")
        results = [r for i in mine for r in blocks[i].results]
        para = next((text for title, text in results if _norm(title) == key and _read(attr, text) is not None), None)
        if para is not None:
            return para, mine[-1] + 1, results
        ref = _ref(entity, attr)
        if len(mine) < MAX_ATTEMPTS and blocks[mine[-1]].results:
            return _Step(
                [_cap(rng.choice(_RETRY).format(e=ref))], query=f"{entity} {_REFINE[_HOLDER[attr]]}", kind="retry"
            )
        return _Step(
            [_cap(rng.choice(_GIVE_UP).format(e=ref))],
            answer=self._guess(plan, question, rng),
            kind="give_up",
            noise="search_failed",
        )

    @staticmethod
    def _misread(attr: str, entity: str, value: str, results: list[tuple[str, str]], rng: random.Random) -> str | None:
        """A wrong value: the same fact read from another passage of the results (or a number misread)."""
        others = sorted(
            {
                v
                for title, text in results
                if _norm(title) != _norm(entity)
                for v in [_read(attr, text)]
                if v is not None and _norm(v) != _norm(value)
            }
        )
        if others:
            return rng.choice(others)
        if attr in _NUMERIC:
            n = int(value.replace(",", "")) + rng.choice([-1, 1]) * rng.randint(1, 30) * (1000 if "," in value else 1)
            return f"{n:,}" if "," in value else str(n)
        return None

    # -- without the tool ------------------------------------------------------------------------
    def _cot(self, plan: _Plan | None, question: str, blocks: list[_Block], rng: random.Random, started: bool) -> _Step:
        """Reasoning from the question alone, then a committed guess (right only by chance)."""
        if plan is not None and blocks:  # the answer may already stand in the observations
            known = self._next(plan, question, blocks, rng, 0.0, 0.0)
            if known.kind == "final":
                return known
        text = []
        if not started and plan is not None:
            if plan.compare:
                text.append(
                    rng.choice(_COT_COMPARE_OPEN).format(
                        a=_ref(plan.start[0], plan.attrs[0]), b=_ref(plan.start[1], plan.attrs[0])
                    )
                )
            else:
                first = rng.choice(_COT_OPEN)
                text.append(
                    _cap(
                        first.format(
                            e=_ref(plan.start[0], plan.attrs[0]),
                            need=rng.choice(_NEED[plan.attrs[0]]).format(e=_ref(plan.start[0], plan.attrs[0])),
                        )
                    )
                )
        text.append(rng.choice(_COT_GUESS))
        return _Step(text, answer=self._guess(plan, question, rng), kind="guess")

    @staticmethod
    def _guess(plan: _Plan | None, question: str, rng: random.Random) -> str:
        kind = plan.answer_kind if plan is not None else "city"
        if kind == "yesno":
            return rng.choice(["yes", "no"])
        if kind == "pick":
            return rng.choice(plan.start)
        if kind in ("birth_year", "founded"):
            return str(rng.randint(1750, 1990))
        if kind == "occupation":
            return rng.choice(_GUESS_OCCUPATIONS)
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if kind in ("publisher", "employer"):
            return f"{name} {rng.choice(_GUESS_ORGS)}"
        if kind in ("creator", "founder"):
            return f"{name} {''.join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()}"
        return name
