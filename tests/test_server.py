"""The search server for real (uvicorn on a loopback port) under concurrent batch requests."""

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from qadata.text import join_sentences
from qadata.world import WorldSpec, all_paragraphs, build_world, generate_questions
from retrieval.bm25 import BM25Index
from retrieval.engine import HttpSearchEngine, SearchServerError
from retrieval.server import ServerLimits, create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world_index():
    world = build_world(WorldSpec(seed=3, countries=6, places=50, people=300, orgs=40, works=300, questions=200))
    corpus = [
        {"id": str(i), "contents": f"{p['title']}\n{join_sentences(p['sentences'])}"}
        for i, p in enumerate(all_paragraphs(world))
    ]
    questions = [r["question"] for r in generate_questions(world)]
    return BM25Index.build(corpus, show_progress=False), questions


@pytest.fixture(scope="module")
def server(world_index):
    index, _ = world_index
    port = _free_port()
    config = uvicorn.Config(
        create_app(index, ServerLimits(max_batch=64, max_query_chars=300, max_k=10)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def test_concurrent_batches_match_in_process_search(world_index, server):
    index, questions = world_index
    rng = random.Random(0)
    jobs = [(rng.sample(questions, rng.randint(1, 64)), rng.choice([1, 3, 5])) for _ in range(48)]

    def call(job):
        queries, k = job
        with HttpSearchEngine(server, max_batch=64) as engine:
            return engine.search(queries, k)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(call, jobs))
    for (queries, k), got in zip(jobs, answers):
        want = index.search(queries, k)
        assert [[p.id for p in h] for h in got] == [[p.id for p in h] for h in want]
        assert [[round(p.score, 4) for p in h] for h in got] == [[round(p.score, 4) for p in h] for h in want]
    health = httpx.get(f"{server}/health").json()
    # concurrent requests were merged: fewer index calls than requests
    assert health["batcher"]["calls"] < len(jobs) + 1
    assert health["batcher"]["queries"] >= sum(len(q) for q, _ in jobs)


def test_limits_are_enforced(server):
    too_many = httpx.post(f"{server}/search", json={"queries": ["a"] * 65, "k": 3})
    assert too_many.status_code == 413 and "limit of 64" in too_many.text
    too_long = httpx.post(f"{server}/search", json={"queries": ["ok", "x" * 301], "k": 3})
    assert too_long.status_code == 422 and "query 1" in too_long.text
    assert httpx.post(f"{server}/search", json={"queries": ["a"], "k": 11}).status_code == 422
    assert httpx.post(f"{server}/search", json={"queries": "not a list"}).status_code == 422
    with HttpSearchEngine(server, max_batch=1000) as engine, pytest.raises(SearchServerError, match="413"):
        engine.search(["a"] * 100, 3)


def test_client_splits_large_batches_and_renders(world_index, server):
    index, questions = world_index
    with HttpSearchEngine(server, max_batch=64) as engine:
        got = engine.search(questions[:150], 3)
    assert len(got) == 150
    r = httpx.post(f"{server}/search", json={"queries": questions[:2], "k": 2, "render": True}).json()
    assert r["rendered"][0].startswith('result 1: "')
    compat = httpx.post(f"{server}/retrieve", json={"queries": questions[:2], "topk": 2}).json()
    assert len(compat["result"]) == 2 and "contents" in compat["result"][0][0]["document"]


def test_unreachable_server_is_a_clear_error():
    with HttpSearchEngine(f"http://127.0.0.1:{_free_port()}", retries=1) as engine:
        with pytest.raises(SearchServerError, match="unreachable"):
            engine.search(["x"], 1)
