"""One search interface, in-process or over HTTP, so the rollout engine does not care which."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import httpx
import orjson

from retrieval.bm25 import BM25Index, Passage
from retrieval.render import render_results

log = logging.getLogger(__name__)


@runtime_checkable
class SearchEngine(Protocol):
    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        """One ranked list of passages per query."""
        ...


def search_rendered(engine: SearchEngine, queries: Sequence[str], k: int = 3) -> list[str]:
    """Search and render each result list the way the model sees it."""
    return [render_results(hits) for hits in engine.search(queries, k)]


class LocalSearchEngine:
    """In-process search over a saved index directory (loaded lazily, memory-mapped)."""

    def __init__(self, index_dir: str | Path | None = None, *, index: BM25Index | None = None):
        if index is None and index_dir is None:
            raise ValueError("LocalSearchEngine needs an index_dir or an index")
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._index = index

    @property
    def index(self) -> BM25Index:
        if self._index is None:
            self._index = BM25Index.load(self.index_dir)
        return self._index

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        return self.index.search(queries, k)


class SearchServerError(RuntimeError):
    """The search server answered with an error (the message carries its detail)."""


class HttpSearchEngine:
    """Client of ``autocoa serve-search``; splits large batches to the server's limit."""

    def __init__(self, url: str, *, timeout: float = 60.0, max_batch: int = 256, retries: int = 3):
        self.url = url.rstrip("/")
        self.max_batch = max_batch
        self.retries = retries
        self._client = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpSearchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self) -> dict:
        return self._client.get(f"{self.url}/health").raise_for_status().json()

    def _post(self, queries: list[str], k: int) -> list[list[Passage]]:
        for attempt in range(self.retries):
            try:
                resp = self._client.post(f"{self.url}/search", json={"queries": queries, "k": k})
                break
            except httpx.TransportError as exc:
                if attempt == self.retries - 1:
                    raise SearchServerError(f"search server at {self.url} unreachable: {exc}") from exc
                time.sleep(0.2 * 2**attempt)
        if resp.status_code != 200:
            raise SearchServerError(f"search server at {self.url} answered {resp.status_code}: {resp.text[:500]}")
        return [
            [Passage(p["id"], p["title"], p["text"], p["score"], p["rank"]) for p in hits]
            for hits in orjson.loads(resp.content)["results"]
        ]

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        queries = list(queries)
        out: list[list[Passage]] = []
        for i in range(0, len(queries), self.max_batch):
            out.extend(self._post(queries[i : i + self.max_batch], k))
        return out
