"""Contrastive pair mining (AutoCoA §3.2.1, "CoT+A data"), token-level and engine-agnostic.

From questions whose CoT or CoA trajectory is wrong, build pairs that share a prefix and diverge at a
reasoning juncture on whether an action is taken:

(a) **CoT wrong**: context c = CoA prompt + the CoT reasoning up to the juncture; chosen = an action
    opened there (``<begin_search>``) and continued with real search to a correct answer; rejected =
    the CoT's own continuation from the juncture (no action, wrong).
(b) **CoA wrong**: c = CoA prompt + the CoA reasoning up to its first action; chosen = a continuation
    with the tool disabled (internal reasoning only) that answers correctly; rejected = the CoA's
    own continuation from the juncture (the action, wrong).

Junctures (recorded per pair):

- ``first-sentence`` for (a): the end of the first sentence of the CoT reasoning, or the end of the
  reasoning when it is one sentence (the earliest point where a search could replace recall);
  ``reasoning-start`` for (a) when the CoT has no sentence boundary before its end (it closed
  ``</think>`` at once, or wrote only its answer): the shared prefix is empty and the action is
  inserted as the first step.
- ``first-action`` for (b): right before the CoA's first ``<begin_search>``.

A continuation only counts when it is what its side claims: (a) chosen must reach the search engine;
(b) chosen is rolled out with the tool off and ``cut_actions`` (an action the policy opens ends its
reasoning there and the answer is forced), so it never contains an action. Every continuation is
rolled out with ``force_answer``: one that ends without ``\boxed{}`` is prompted for it, so a branch is
judged on an answer rather than discarded for lack of one. All sequences are token ids: the prefix
is sliced from the trajectory's own ids (never decoded and re-encoded) and continuations come from
the rollout library.

Each continuation carries a 0/1 mask aligned with its ids (``chosen_mask`` / ``rejected_mask``): the
rollout's ``policy_mask`` (the chosen side: the continuation's own rollout; the rejected side: the source
trajectory's, sliced at the juncture), with every observation span zeroed. So the search results and the
forced ``\boxed{`` prompt stay out of SFT-1's P̄ (the paper's P(x|c) is the policy's tokens). One
exception, by design: the ``<begin_search>`` ids the miner inserts at an (a) juncture are the chosen
decision itself (what the pair teaches), so they count as policy tokens although the rollout received
them as prompt.

:func:`budget_pairs` then caps the mined pairs at ``max_pairs`` with a kind balance (the paper trains
SFT-1 on 1,500 pairs, mostly action-chosen); the pairs left out are discarded with the reason.
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from agent.protocol import ACTION_OPEN, THINK_CLOSE
from agent.rollout import Rollout, RolloutConfig
from qadata.answers import score

SENTENCE_END = re.compile(r"[.!?](?=\s)")  # a sentence boundary inside the reasoning


@dataclass
class Pair:
    pair_id: str
    question_id: str
    kind: str  # "a" (action inserted) | "b" (action removed)
    juncture_rule: str
    prompt_ids: list[int]  # the template prompt (shared)
    prefix_ids: list[int]  # the shared reasoning prefix after the prompt
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_correct: bool
    rejected_correct: bool
    chosen_answer: str | None = None
    rejected_answer: str | None = None
    source_trajectory: str = ""
    chosen_has_action: bool = False
    rejected_has_action: bool = False
    chosen_observation_spans: list[tuple[int, int]] = field(default_factory=list)  # within chosen_ids
    rejected_observation_spans: list[tuple[int, int]] = field(default_factory=list)  # within rejected_ids
    chosen_mask: list[int] = field(
        default_factory=list
    )  # 1 = a policy token (in SFT-1's loss), aligned with chosen_ids
    rejected_mask: list[int] = field(default_factory=list)  # the same for rejected_ids


@dataclass
class Discarded:
    question_id: str
    kind: str
    reason: str


def _token_at_char(decode: Callable[[list[int]], str], ids: list[int], char_pos: int) -> int:
    """Smallest n such that decode(ids[:n]) covers ``char_pos`` characters."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(ids[:mid])) >= char_pos:
            hi = mid
        else:
            lo = mid + 1
    return lo


def first_sentence_juncture(row: dict, decode) -> int | None:
    """Token index (into the completion) right after the first sentence of the CoT's reasoning
    (None when the reasoning is empty: see :func:`cot_juncture`)."""
    completion = row["token_ids"][row["prompt_tokens"] :]
    text = decode(completion)
    end = text.find(THINK_CLOSE)
    reasoning = text[: end if end >= 0 else len(text)]
    if not reasoning.strip():
        return None
    m = SENTENCE_END.search(reasoning)
    # the first sentence's end, or the end of a one-sentence reasoning (an action can still replace the answer)
    n = _token_at_char(decode, completion, m.end() if m else len(reasoning.rstrip()))
    return n if 0 < n < len(completion) else None


def cot_juncture(row: dict, decode) -> tuple[int, str] | None:
    """The (a) juncture and its rule: ``first-sentence``, else ``reasoning-start`` for an empty reasoning."""
    j = first_sentence_juncture(row, decode)
    if j is not None:
        return j, "first-sentence"
    if len(row["token_ids"]) > row["prompt_tokens"]:
        return 0, "reasoning-start"
    return None


def first_action_juncture(row: dict) -> int | None:
    """Token index (into the completion) where the CoA's first action span starts."""
    actions = [s for s in row["spans"] if s["kind"] == "action"]
    if not actions:
        return None
    n = actions[0]["start"] - row["prompt_tokens"]
    return n if n >= 0 else None


def _span(s) -> tuple[str, int, int]:
    return (s.kind, s.start, s.end) if hasattr(s, "kind") else (s["kind"], s["start"], s["end"])


def continuation_mask(
    policy_mask: Sequence[int], spans: Sequence, start: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """The continuation from token ``start`` on: its policy mask with every observation span zeroed (a
    simulated result is policy text but still an observation), and its observation spans, both relative
    to ``start``. ``spans`` are the rollout's :class:`~agent.rollout.Span` objects or their stored dicts."""
    mask = [1 if m else 0 for m in policy_mask[start:]]
    obs = []
    for kind, a, b in map(_span, spans):
        if kind == "observation" and b > start:
            a, b = max(a, start) - start, b - start
            mask[a:b] = [0] * (min(b, len(mask)) - a)
            obs.append((a, b))
    return mask, obs


def _graded(text: str, golds: Sequence[str]) -> tuple[str | None, bool]:
    from qadata.answers import extract_boxed

    answer = extract_boxed(text)
    return answer, bool(score(answer, golds).em)


def mine_pairs(
    cot_rows: Sequence[dict],
    coa_rows: Sequence[dict],
    *,
    engine,
    search,
    coa_prompt_ids: Callable[[str], list[int]],
    config: RolloutConfig,
    attempts: int = 4,
    max_per_kind: int | None = None,
) -> tuple[list[Pair], list[Discarded]]:
    """Mine (a) pairs from wrong CoT rows and (b) pairs from wrong CoA rows; every wrong row ends up as a
    pair or as a :class:`Discarded` with the reason, so the counts reconcile. ``max_per_kind`` caps the
    rows mined per kind (in question-id order); the rest are discarded with that reason."""
    tok = engine.tokenizer
    lacking = [r["trajectory_id"] for r in [*cot_rows, *coa_rows] if r.get("policy_mask") is None]
    if lacking:
        raise ValueError(
            f"mine_pairs needs each trajectory's policy_mask (the rejected side's loss mask); "
            f"{len(lacking)} rows lack it, e.g. {lacking[0]}"
        )

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=False)

    action_open = tok.encode(f" {ACTION_OPEN}", add_special_tokens=False)
    plans, discarded = [], []
    for row in cot_rows:
        if row["em"] >= 1.0:
            continue
        found = cot_juncture(row, decode)
        if found is None:
            discarded.append(Discarded(row["question_id"], "a", "empty completion: no juncture"))
            continue
        plans.append(("a", found[1], row, found[0]))
    for row in coa_rows:
        if row["em"] >= 1.0:
            continue
        j = first_action_juncture(row)
        if j is None:
            discarded.append(Discarded(row["question_id"], "b", "wrong CoA took no action: nothing to remove"))
            continue
        plans.append(("b", "first-action", row, j))

    if max_per_kind is not None:
        kept, seen = [], collections.Counter()
        for plan in sorted(plans, key=lambda p: (p[0], p[2]["question_id"], p[2]["trajectory_id"])):
            if seen[plan[0]] < max_per_kind:
                seen[plan[0]] += 1
                kept.append(plan)
            else:
                discarded.append(
                    Discarded(plan[2]["question_id"], plan[0], f"not mined: over max_per_kind={max_per_kind}")
                )
        plans = kept
    tasks_a, tasks_b = [], []
    contexts = {}
    for i, (kind, _rule, row, j) in enumerate(plans):
        prompt = coa_prompt_ids(row["question"])
        prefix = row["token_ids"][row["prompt_tokens"] : row["prompt_tokens"] + j]
        contexts[i] = (prompt, prefix)
        for k in range(attempts):
            if kind == "a":
                tasks_a.append((f"{i}/{k}", prompt + prefix + action_open))
            else:
                tasks_b.append((f"{i}/{k}", prompt + prefix))
    with_tool = Rollout(engine, search, replace(config, force_answer=True)).run(tasks_a) if tasks_a else []
    no_tool = (
        Rollout(engine, None, replace(config, tools=False, cut_actions=True, force_answer=True)).run(tasks_b)
        if tasks_b
        else []
    )
    by_plan: dict[int, list] = {}
    for t in with_tool + no_tool:
        by_plan.setdefault(int(t.task_id.split("/")[0]), []).append(t)

    pairs = []
    for i, (kind, rule, row, j) in enumerate(plans):
        prompt, prefix = contexts[i]
        golds = row["gold_answers"]
        base = len(prompt) + len(prefix)
        chosen = None
        for t in sorted(by_plan.get(i, []), key=lambda t: t.task_id):
            cont = t.token_ids[base:]
            text = decode(cont)
            if kind == "b" and ACTION_OPEN in text:
                continue  # tool disabled, but the policy wrote an action anyway: not an action-free branch
            if kind == "a" and not any(s.kind == "observation" and s.start >= base for s in t.spans):
                continue  # the opened action never reached the search engine
            answer, ok = _graded(decode(prefix + cont), golds)
            if ok:
                chosen = (t, cont, answer)
                break
        if chosen is None:
            discarded.append(
                Discarded(
                    row["question_id"],
                    kind,
                    f"no correct {'action' if kind == 'a' else 'no-action'} continuation in {attempts} attempts",
                )
            )
            continue
        t, cont, answer = chosen
        rejected = row["token_ids"][row["prompt_tokens"] + j :]
        rej_answer, rej_ok = _graded(decode(prefix + rejected), golds)
        chosen_mask, obs = continuation_mask(t.policy_mask, t.spans, base)
        if kind == "a":
            chosen_mask[: len(action_open)] = [1] * len(action_open)  # the inserted action: the chosen decision
        rejected_mask, rej_obs = continuation_mask(row["policy_mask"], row["spans"], row["prompt_tokens"] + j)
        pairs.append(
            Pair(
                pair_id=f"{row['trajectory_id']}#{kind}",
                question_id=row["question_id"],
                kind=kind,
                juncture_rule=rule,
                prompt_ids=prompt,
                prefix_ids=prefix,
                chosen_ids=cont,
                rejected_ids=rejected,
                chosen_correct=True,
                rejected_correct=rej_ok,
                chosen_answer=answer,
                rejected_answer=rej_answer,
                source_trajectory=row["trajectory_id"],
                chosen_has_action=decode(cont).lstrip().startswith(ACTION_OPEN),
                rejected_has_action=decode(rejected).lstrip().startswith(ACTION_OPEN),
                chosen_observation_spans=obs,
                rejected_observation_spans=rej_obs,
                chosen_mask=chosen_mask,
                rejected_mask=rejected_mask,
            )
        )
    return pairs, discarded


def _order_key(seed: int, pair_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}/{pair_id}".encode(), digest_size=8).digest()


def budget_pairs(
    pairs: Sequence[Pair], max_pairs: int | None, action_chosen_share: float, seed: int = 0
) -> tuple[list[Pair], list[Discarded], dict]:
    """Keep at most ``max_pairs`` pairs, ``action_chosen_share`` of them of kind (a) (action-chosen) and the
    rest of kind (b) (think-chosen); a kind short of its share leaves its room to the other. Which pairs of
    a kind are kept is a seeded hash order of the pair ids (deterministic, independent of the input
    order). Returns the kept pairs (input order), the rest as :class:`Discarded`, and the budget stats
    (requested / available / kept per kind)."""
    if not 0.0 <= action_chosen_share <= 1.0:
        raise ValueError(f"action_chosen_share must be in [0, 1], got {action_chosen_share}")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0 or None, got {max_pairs}")
    by_kind = {k: sorted((p for p in pairs if p.kind == k), key=lambda p: _order_key(seed, p.pair_id)) for k in "ab"}
    avail = {k: len(v) for k, v in by_kind.items()}
    cap = sum(avail.values()) if max_pairs is None else max_pairs
    want = {"a": round(cap * action_chosen_share)}
    want["b"] = cap - want["a"]
    keep = {k: min(avail[k], want[k]) for k in "ab"}
    for k in "ab":  # a kind short of its share leaves the room to the other
        keep[k] += min(avail[k] - keep[k], cap - keep["a"] - keep["b"])
    kept_ids = {p.pair_id for k in "ab" for p in by_kind[k][: keep[k]]}
    reason = (
        f"over max_pairs budget (kind balance: action-chosen share {action_chosen_share:g} of "
        f"max_pairs={max_pairs}; kept {keep['a']} a + {keep['b']} b)"
    )
    kept = [p for p in pairs if p.pair_id in kept_ids]
    dropped = [Discarded(p.question_id, p.kind, reason) for p in pairs if p.pair_id not in kept_ids]
    stats = {
        "max_pairs": max_pairs,
        "action_chosen_share": action_chosen_share,
        "requested": want,
        "available": avail,
        "kept": keep,
        "dropped": {k: avail[k] - keep[k] for k in "ab"},
    }
    return kept, dropped, stats
