"""Retrieval quality measures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.engine import SearchEngine


def recall_at_k(engine: SearchEngine, rows: Sequence[dict], ks: Sequence[int] = (3, 5)) -> dict[int, float]:
    """Mean share of a question's gold supporting titles among the top-k passages (question as query).

    Args:
        rows: dicts with ``question`` and ``supporting_facts`` (a list of ``{"title", ...}``).
    """
    rows = [r for r in rows if r["supporting_facts"]]
    if not rows:
        return {k: float("nan") for k in ks}
    hits = engine.search([r["question"] for r in rows], max(ks))
    golds = [{f["title"] for f in r["supporting_facts"]} for r in rows]
    return {
        k: round(float(np.mean([len(g & {p.title for p in h[:k]}) / len(g) for g, h in zip(golds, hits)])), 4)
        for k in ks
    }
