"""How search results look to the model inside ``<search_result> … </search_result>``."""

from __future__ import annotations

from collections.abc import Sequence

from retrieval.bm25 import Passage


def render_results(passages: Sequence[Passage]) -> str:
    """Render ranked passages as AutoCoA shows them: ``result 1: "Title"`` then the text."""
    if not passages:
        return "No results found."
    return "\n".join(f'result {i}: "{p.title}"\n{p.text}' for i, p in enumerate(passages, start=1))
