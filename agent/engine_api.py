"""The engine interface: token ids in, token ids out, stop strings honoured.

Rollouts never decode and re-encode a trajectory: an engine receives the exact prompt token ids
and returns the exact ids it generated, cut right after the token that completed a stop string
(or after EOS), so the caller can append observation tokens and continue. Engines
(:mod:`agent.transformers_engine`, :mod:`agent.vllm_engine`, :mod:`agent.http_engine`, :mod:`agent.expert`)
implement :class:`Engine`; :mod:`agent.engines` chooses and loads one from an :class:`EngineSpec`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class GenRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int | None = None
    # constrained decoding: every generated token is one of these ids (None: any token). Used by the LLM
    # judge to force a one-token yes/no verdict; vLLM, the transformers engine and vLLM's OpenAI server honour it.
    allowed_token_ids: tuple[int, ...] | None = None


@dataclass
class GenResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop string completed), "eos", or "length"
    stop_str: str | None = None
    meta: dict = field(default_factory=dict)


class Engine(Protocol):
    tokenizer: object
    name: str

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]: ...


def cut_at_stop(token_ids: list[int], decode, stop: Sequence[str], eos_ids: set[int], limit: int) -> GenResult:
    """Trim raw generated ids after the first EOS, or after the token completing the earliest stop string.

    Rows of a batch that finished early are padded by the engine; with pad == EOS the padding is cut
    as an EOS, and a stop string completed before it still wins.
    """
    ids = token_ids[:limit]
    eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    if eos_at is not None:
        ids = ids[: eos_at + 1]
    hit = _first_stop(decode(ids), stop)
    if hit is not None:
        lo, hi = 1, len(ids)  # the shortest prefix whose text contains the stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if hit in decode(ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        ids = ids[:lo]
        return GenResult(ids, decode(ids), "stop", hit)
    finish = "eos" if eos_at is not None or len(ids) < limit else "length"
    return GenResult(ids, decode(ids), finish)


def _first_stop(text: str, stop: Sequence[str]) -> str | None:
    found = [(text.find(s), s) for s in stop if s and s in text]
    return min(found)[1] if found else None


# -- choosing an engine by config ---------------------------------------------------------------
# "expert": the scripted demonstrator of the generated world (agent/expert.py), with the model's tokenizer
ENGINE_KINDS = ("auto", "vllm", "transformers", "openai", "expert")


@dataclass(frozen=True)
class EngineSpec:
    """What to load: ``kind`` (auto = vLLM when installed, else transformers), the model (``embedded``,
    a checkpoint directory or a hub id) and the knobs each engine takes."""

    kind: str = "auto"
    model: str = "embedded"
    dtype: str | None = None
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_batch: int = 64
    base_urls: tuple[str, ...] = ()
    served_model: str | None = None  # the model name the HTTP server knows; default: ``model``
    api_key: str | None = None
    seed: int = 0
