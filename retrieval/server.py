"""HTTP search server with a batch endpoint that micro-batches concurrent requests.

Requests are queued; one worker thread drains the queue, merges the queries of every waiting
request into one bm25s call and hands each request its slice. So concurrent clients neither
serialise behind one another's small calls nor race on the (non-thread-safe) stemmer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import orjson
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, Field

from retrieval.bm25 import BM25Index
from retrieval.render import render_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    max_batch: int = 512  # queries in one request
    max_query_chars: int = 2048
    max_k: int = 50
    max_merged_queries: int = 2048  # queries merged into one bm25s call across requests


class SearchRequest(BaseModel):
    queries: list[str] = Field(..., description="Queries to answer, one result list each.")
    k: int = Field(3, ge=1, description="Passages per query.")
    render: bool = Field(False, description="Also return each result list rendered for the model.")


class RetrieveRequest(BaseModel):
    """Search-R1 / FlashRAG retrieval-server compatible request."""

    queries: list[str]
    topk: int = Field(3, ge=1)
    return_scores: bool = True


@dataclass
class _Job:
    queries: list[str]
    k: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Merge the queries of concurrently waiting requests into single index calls."""

    def __init__(self, index: BM25Index, max_merged: int):
        self.index = index
        self.max_merged = max_merged
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="search-batcher", daemon=True)
        self.calls = 0
        self.queries = 0
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    async def submit(self, queries: list[str], k: int):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(_Job(queries, k, loop, fut))
        return await fut

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            n = len(job.queries)
            while n < self.max_merged:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
                n += len(nxt.queries)
            self._answer(jobs)

    def _answer(self, jobs: list[_Job]) -> None:
        merged = [q for j in jobs for q in j.queries]
        k = max(j.k for j in jobs)
        try:
            # top-k' for k' < k is the prefix of the top-k list, so one call serves every job
            hits = self.index.search(merged, k) if merged else []
            error = None
        except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
            log.exception("search failed for a merged batch of %d queries", len(merged))
            hits, error = None, exc
        self.calls += 1
        self.queries += len(merged)
        pos = 0
        for j in jobs:
            if error is not None:
                j.loop.call_soon_threadsafe(_set_exception, j.future, error)
                continue
            part = [h[: j.k] for h in hits[pos : pos + len(j.queries)]]
            pos += len(j.queries)
            j.loop.call_soon_threadsafe(_set_result, j.future, part)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _json(body: dict) -> Response:
    return Response(content=orjson.dumps(body), media_type="application/json")


def create_app(index: BM25Index, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """Build the FastAPI app; run it with uvicorn (``autocoa serve-search`` does)."""
    batcher = MicroBatcher(index, limits.max_merged_queries)
    app = FastAPI(title="AutoCoA search", version="1")
    app.state.batcher = batcher
    app.router.on_shutdown.append(batcher.close)

    def validate(queries: list[str], k: int) -> None:
        if len(queries) > limits.max_batch:
            raise HTTPException(413, f"batch of {len(queries)} queries exceeds the limit of {limits.max_batch}")
        if k > limits.max_k:
            raise HTTPException(422, f"k={k} exceeds the limit of {limits.max_k}")
        for i, q in enumerate(queries):
            if len(q) > limits.max_query_chars:
                raise HTTPException(422, f"query {i} has {len(q)} characters; the limit is {limits.max_query_chars}")

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "num_docs": index.num_docs,
            "vocab_size": index.vocab_size,
            "params": index.params,
            "limits": limits.__dict__,
            "batcher": {"calls": batcher.calls, "queries": batcher.queries},
        }

    @app.post("/search")
    async def search(req: SearchRequest) -> Response:
        validate(req.queries, req.k)
        hits = await batcher.submit(req.queries, req.k)
        body = {"results": [[p.to_dict() for p in h] for h in hits]}
        if req.render:
            body["rendered"] = [render_results(h) for h in hits]
        # serialised directly: FastAPI's generic jsonable_encoder costs more than the search itself
        return _json(body)

    @app.post("/retrieve")
    async def retrieve(req: RetrieveRequest) -> Response:
        validate(req.queries, req.topk)
        hits = await batcher.submit(req.queries, req.topk)
        result = []
        for h in hits:
            docs = [{"id": p.id, "contents": f'"{p.title}"\n{p.text}'} for p in h]
            result.append([{"document": d, "score": p.score} for d, p in zip(docs, h)] if req.return_scores else docs)
        return _json({"result": result})

    return app


def serve(
    index_dir: str,
    host: str = "127.0.0.1",
    port: int = 8099,
    limits: ServerLimits = ServerLimits(),
    log_level: str = "info",
) -> None:
    import uvicorn

    index = BM25Index.load(index_dir)
    log.info("serving %d passages from %s on http://%s:%d", index.num_docs, index_dir, host, port)
    uvicorn.run(create_app(index, limits), host=host, port=port, log_level=log_level, workers=1)
