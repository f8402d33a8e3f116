"""Invariants of synthesised trajectories, as plain functions over rows (the asset checks call them).

Each returns ``(checked, problems)`` where ``problems`` lists ``"<trajectory_id>: what is wrong"``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable


def tags_unbalanced(rows: Iterable[dict]) -> tuple[int, list[str]]:
    """``<think>``/``</think>``, actions and results open and close in order (what the parser reports)."""
    n, bad = 0, []
    for r in rows:
        n += 1
        if not r["tags_balanced"]:
            tag_issues = [i for i in r["parse_issues"] if not i.startswith("no boxed")]
            bad.append(f"{r['trajectory_id']}: {'; '.join(tag_issues[:2]) or 'unbalanced'}")
    return n, bad


def actions_over_budget(rows: Iterable[dict]) -> tuple[int, list[str]]:
    n, bad = 0, []
    for r in rows:
        n += 1
        if r["n_actions"] > r["max_actions"]:
            bad.append(f"{r['trajectory_id']}: {r['n_actions']} actions > T={r['max_actions']}")
    return n, bad


def actions_without_observation(rows: Iterable[dict]) -> tuple[int, list[str]]:
    """Every action span is immediately followed by an observation span starting where it ends."""
    n, bad = 0, []
    for r in rows:
        spans = r["spans"]
        for i, s in enumerate(spans):
            if s["kind"] != "action":
                continue
            n += 1
            nxt = spans[i + 1] if i + 1 < len(spans) else None
            if nxt is None or nxt["kind"] != "observation" or nxt["start"] != s["end"]:
                bad.append(
                    f"{r['trajectory_id']}: action at tokens {s['start']}-{s['end']} has no observation after it"
                )
    return n, bad


def mask_misaligned(rows: Iterable[dict]) -> tuple[int, list[str]]:
    """Mask as long as the ids; 0 on the prompt and on real observations; 1 on actions; sums to the generated count."""
    n, bad = 0, []
    for r in rows:
        n += 1
        ids, mask, tid = r["token_ids"], r["policy_mask"], r["trajectory_id"]
        if len(ids) != len(mask):
            bad.append(f"{tid}: {len(ids)} token ids but {len(mask)} mask entries")
            continue
        if any(mask[: r["prompt_tokens"]]):
            bad.append(f"{tid}: prompt tokens marked as policy")
        if sum(mask) != r["generated_tokens"]:
            bad.append(f"{tid}: mask sums to {sum(mask)}, generated {r['generated_tokens']}")
        for s in r["spans"]:
            seg = mask[s["start"] : s["end"]]
            if s["kind"] == "observation" and not s["simulated"] and any(seg):
                bad.append(f"{tid}: observation tokens {s['start']}-{s['end']} marked as policy")
            if s["kind"] == "action" and not all(seg):
                bad.append(f"{tid}: action tokens {s['start']}-{s['end']} not all policy")
    return n, bad


def duplicate_samples(rows: Iterable[dict]) -> tuple[int, list[str]]:
    """At most one row per (round, question, sample)."""
    counts = collections.Counter((r["round"], r["question_id"], r["sample"]) for r in rows)
    return sum(counts.values()), [f"{rd}/{q}/{s}: {c} rows" for (rd, q, s), c in counts.items() if c > 1]


def answer_rate(rows: Iterable[dict]) -> tuple[int, float]:
    rows = list(rows)
    answered = sum(1 for r in rows if (r["predicted_answer"] or "").strip())
    return len(rows), answered / len(rows) if rows else 1.0
