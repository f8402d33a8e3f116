"""Search: a BM25 index over a FlashRAG corpus (bm25s), rendering for the model, and a batched
search engine usable in-process or over HTTP. No Dagster imports."""

from retrieval.bm25 import BM25Index, Passage
from retrieval.render import render_results

__all__ = ["BM25Index", "Passage", "render_results"]
