"""An OpenAI-compatible completions server (vLLM, SGLang) behind the engine interface.

Prompts go out as token ids (``/v1/completions`` accepts a list of ints as ``prompt``) and, where the
server allows it (vLLM: ``return_token_ids``), the generated token ids come back, so rollouts stay
token-exact across the network. A server that returns only text is still usable: the text is
encoded locally and the result is marked ``meta["token_exact"] = False`` so callers can tell.

Several base URLs form a fleet: every request goes to the server with the fewest requests in
flight. Each request is its own HTTP call, so the server's continuous batching sees every
trajectory independently (no lock-step); failed calls are retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from agent.engine_api import GenRequest, GenResult

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class EngineHTTPError(RuntimeError):
    pass


class OpenAIEngine:
    """Completions over HTTP with token ids in and (where supported) token ids out."""

    name = "openai"

    def __init__(
        self,
        base_urls: str | Sequence[str],
        model: str,
        tokenizer,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        max_in_flight: int = 256,
        transport=None,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("OpenAIEngine needs at least one base URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.model, self.tokenizer = model, tokenizer
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.retries, self.max_in_flight = timeout, retries, max_in_flight
        self.in_flight = {u: 0 for u in self.base_urls}
        self.calls = {u: 0 for u in self.base_urls}
        self._transport = transport  # an httpx transport (tests); default: real connections
        self._client = None
        self._client_loop = None
        self._sem: asyncio.Semaphore | None = None

    def _endpoint(self, base: str) -> str:
        return f"{base}/completions" if base.endswith("/v1") else f"{base}/v1/completions"

    def _client_for_loop(self):
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
            self._client = httpx.AsyncClient(
                timeout=self.timeout, limits=limits, headers=self.headers, transport=self._transport
            )
            self._client_loop = loop
            self._sem = asyncio.Semaphore(self.max_in_flight)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._client_loop = None

    def body(self, r: GenRequest) -> dict:
        body = {
            "model": self.model,
            "prompt": list(r.prompt_ids),
            "max_tokens": r.max_new_tokens,
            "temperature": r.temperature,
            "top_p": r.top_p if r.temperature > 0 else 1.0,
            "stop": list(r.stop) or None,
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "return_token_ids": True,
        }
        if r.seed is not None:
            body["seed"] = r.seed
        if r.allowed_token_ids:  # a vLLM server extension of the completions API
            body["allowed_token_ids"] = list(r.allowed_token_ids)
        return body

    def parse(self, payload: dict, request: GenRequest) -> GenResult:
        try:
            choice = payload["choices"][0]
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineHTTPError(f"unexpected completions response: {str(payload)[:300]}") from exc
        ids = choice.get("token_ids")
        exact = ids is not None
        if ids is None:
            ids = self.tokenizer.encode(choice.get("text", ""), add_special_tokens=False)
        ids = list(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        stop_reason = choice.get("stop_reason")
        finish = choice.get("finish_reason")
        if isinstance(stop_reason, str) and stop_reason in request.stop:
            res = GenResult(ids, text, "stop", stop_reason)
        elif finish == "stop":
            # servers that do not report the matched string: find which stop string ended the text
            hit = next((s for s in request.stop if s and text.rstrip().endswith(s.rstrip())), None)
            res = GenResult(ids, text, "stop", hit) if hit else GenResult(ids, text, "eos")
        else:
            res = GenResult(ids, text, "length")
        res.meta["token_exact"] = exact
        return res

    async def agenerate(self, request: GenRequest) -> GenResult:
        import httpx

        client = self._client_for_loop()
        assert self._sem is not None
        async with self._sem:
            base = min(self.base_urls, key=lambda u: (self.in_flight[u], self.calls[u]))
            self.in_flight[base] += 1
            self.calls[base] += 1
            try:
                last = None
                for attempt in range(self.retries + 1):
                    try:
                        resp = await client.post(self._endpoint(base), json=self.body(request))
                    except httpx.TransportError as exc:
                        last = f"{type(exc).__name__}: {exc}"
                    else:
                        if resp.status_code == 200:
                            return self.parse(resp.json(), request)
                        last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                        if resp.status_code not in RETRY_STATUS:
                            break
                    if attempt < self.retries:
                        await asyncio.sleep(min(8.0, 0.5 * 2**attempt) * (0.5 + random.random()))
                raise EngineHTTPError(f"{self._endpoint(base)} failed: {last}")
            finally:
                self.in_flight[base] -= 1

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        async def run():
            try:
                return await asyncio.gather(*(self.agenerate(r) for r in requests))
            finally:
                await self.aclose()

        return list(asyncio.run(run()))
