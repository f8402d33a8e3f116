"""Seeded question sampling, stratified by (level, type), split into disjoint CoT and CoA pools."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from qadata.text import normalise_question


def largest_remainder(weights: Sequence[float], total: int, caps: Sequence[int] | None = None) -> list[int]:
    """Integer allocation of ``total`` proportional to ``weights`` (Hamilton's method), capped."""
    caps = list(caps) if caps is not None else [total] * len(weights)
    wsum = float(sum(weights))
    if total <= 0 or wsum <= 0:
        return [0] * len(weights)
    exact = [total * w / wsum for w in weights]
    alloc = [min(int(e), c) for e, c in zip(exact, caps)]
    # hand out the remainder by largest fractional part, respecting caps; loop for capped strata
    while sum(alloc) < total:
        order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - int(exact[i])), i))
        moved = False
        for i in order:
            if sum(alloc) >= total:
                break
            if alloc[i] < caps[i]:
                alloc[i] += 1
                moved = True
        if not moved:
            break
    return alloc


@dataclass
class SampleResult:
    rows: list[dict]
    eligible: int
    excluded_split: int
    excluded_leakage: int
    strata: dict = field(default_factory=dict)  # "level/type" -> {"available", "cot", "coa"}


def stratum_of(row: dict) -> str:
    return f"{row.get('level') or 'unknown'}/{row.get('type') or 'unknown'}"


def sample_questions(
    rows: Iterable[dict],
    *,
    total: int,
    cot_fraction: float = 0.5,
    seed: int = 0,
    splits: Sequence[str] = ("train",),
    eval_questions: Iterable[str] = (),
) -> SampleResult:
    """Draw ``total`` questions stratified by (level, type) and split them into CoT / CoA pools.

    Questions whose normalised text appears in ``eval_questions`` are excluded (leakage) and
    counted, as are questions of other splits; every pool is itself stratified.
    """
    if not 0.0 <= cot_fraction <= 1.0:
        raise ValueError(f"cot_fraction must be in [0, 1], got {cot_fraction}")
    banned = {normalise_question(q) for q in eval_questions}
    by_stratum: dict[str, list[dict]] = defaultdict(list)
    excluded_split = excluded_leak = 0
    for row in rows:
        if splits and row.get("split") not in splits:
            excluded_split += 1
        elif normalise_question(row["question"]) in banned:
            excluded_leak += 1
        else:
            by_stratum[stratum_of(row)].append(row)
    names = sorted(by_stratum)
    sizes = [len(by_stratum[s]) for s in names]
    eligible = sum(sizes)
    take = largest_remainder(sizes, min(total, eligible), caps=sizes)
    n_cot_total = int(round(sum(take) * cot_fraction))
    cot_take = largest_remainder(take, n_cot_total, caps=take)
    out: list[dict] = []
    strata: dict[str, dict] = {}
    for name, n, n_cot in zip(names, take, cot_take):
        pool_rows = sorted(by_stratum[name], key=lambda r: r["id"])  # order-independent of input order
        random.Random(f"{seed}:{name}").shuffle(pool_rows)
        chosen = pool_rows[:n]
        for i, row in enumerate(chosen):
            out.append({**row, "pool": "cot" if i < n_cot else "coa", "stratum": name})
        strata[name] = {"available": len(by_stratum[name]), "cot": n_cot, "coa": n - n_cot}
    out.sort(key=lambda r: (r["pool"], r["stratum"], r["id"]))
    return SampleResult(out, eligible, excluded_split, excluded_leak, strata)
