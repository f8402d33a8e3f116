"""Generation engines behind one interface: token ids in, token ids out, stop strings honoured.

Rollouts never decode and re-encode a trajectory: an engine receives the exact prompt token ids
and returns the exact ids it generated, cut right after the token that completed a stop string
(or after EOS), so the caller can append observation tokens and continue.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


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

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        ...


def cut_at_stop(token_ids: list[int], decode, stop: Sequence[str], eos_ids: set[int],
                limit: int) -> GenResult:
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


class TransformersEngine:
    """In-process batched ``generate`` (left padding, stop strings): the portable fallback."""

    name = "transformers"

    def __init__(self, model_path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 max_batch: int = 32, max_model_len: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype)).to(device)
        model.eval()
        self._bind(model, device, max_batch, max_model_len)

    @classmethod
    def from_model(cls, model, tokenizer, *, max_batch: int = 32, max_model_len: int | None = None) -> TransformersEngine:
        """Generate with a model already in memory (the policy a trainer is updating), without copying it.

        Neither the model's train/eval mode nor the tokenizer is changed (the batch is padded by hand),
        so the caller decides the mode, e.g. eval for sampling without dropout, then back to train.
        """
        engine = cls.__new__(cls)
        engine.tokenizer = tokenizer
        engine._bind(model, str(model.device), max_batch, max_model_len)
        return engine

    def _bind(self, model, device: str, max_batch: int, max_model_len: int | None = None) -> None:
        self.model = model
        self.max_model_len = max_model_len  # as vLLM: a request whose prompt + max_new_tokens exceeds it is refused
        self.device, self.max_batch = device, max_batch
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        # One generate() call shares sampling settings and stop strings (a row halts on any stop
        # string of its batch), so requests are grouped by them; results come back in request order.
        if self.max_model_len is not None:  # as vLLM: a prompt that does not fit is refused, max_new_tokens clamped
            for r in requests:
                if len(r.prompt_ids) >= self.max_model_len:
                    raise ValueError(f"prompt of {len(r.prompt_ids)} tokens does not fit max_model_len={self.max_model_len}")
            requests = [replace(r, max_new_tokens=max(1, min(r.max_new_tokens, self.max_model_len - len(r.prompt_ids))))
                        for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            # per-request seeds are not part of the key (torch has one generator per generate call):
            # a batch is seeded by its first request, reproducible for the same batch composition
            groups.setdefault((r.temperature, r.top_p, tuple(sorted(r.stop)), r.allowed_token_ids), []).append(i)
        out: list[GenResult | None] = [None] * len(requests)
        for idx in groups.values():
            for j in range(0, len(idx), self.max_batch):
                chunk = idx[j: j + self.max_batch]
                for i, res in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                    out[i] = res
        return out

    def _generate_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        import torch

        width = max(len(r.prompt_ids) for r in reqs)
        input_ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(reqs), width), dtype=torch.long)
        for row, r in enumerate(reqs):
            input_ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention[row, width - len(r.prompt_ids):] = 1
        first = reqs[0]  # every request of the batch shares these settings (see generate)
        stop = list(first.stop)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        processors = None
        if first.allowed_token_ids:
            from transformers import LogitsProcessorList

            processors = LogitsProcessorList([_AllowedTokens(first.allowed_token_ids)])
        with torch.no_grad():
            gen = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                max_new_tokens=max(r.max_new_tokens for r in reqs), do_sample=first.temperature > 0,
                temperature=first.temperature if first.temperature > 0 else None,
                top_p=first.top_p if first.temperature > 0 else None, pad_token_id=self.pad_id,
                stop_strings=stop or None, tokenizer=self.tokenizer if stop else None,
                logits_processor=processors)
        new = gen[:, width:].tolist()
        return [cut_at_stop(ids, self._decode, r.stop, self.eos_ids, r.max_new_tokens) for ids, r in zip(new, reqs)]


class _AllowedTokens:
    """A transformers logits processor: every token outside ``allowed`` gets -inf (``GenRequest.allowed_token_ids``)."""

    def __init__(self, allowed: Sequence[int]):
        self.allowed = list(allowed)

    def __call__(self, input_ids, scores):
        import torch

        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed] = 0.0
        return scores + mask


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


def resolve_model(model: str, cache_dir: str | Path) -> tuple[str, str]:
    """``(path or hub id to load, display name)``; ``embedded`` converts the GGUF once into ``cache_dir``."""
    if model == "embedded":
        from agent.models import EMBEDDED_MODEL, ensure_embedded_checkpoint

        return str(ensure_embedded_checkpoint(cache_dir)), EMBEDDED_MODEL
    return model, Path(model).name if Path(model).exists() else model


def resolve_kind(kind: str) -> str:
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine kind must be one of {ENGINE_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    from agent.vllm_engine import vllm_available

    return "vllm" if vllm_available() else "transformers"


_LOADED: dict[tuple, object] = {}


def load_engine(spec: EngineSpec, cache_dir: str | Path) -> Engine:
    """Build the engine a spec names, once per process (later calls with the same spec reuse it)."""
    kind = resolve_kind(spec.kind)
    key = (kind, spec, str(cache_dir))
    if key in _LOADED:
        return _LOADED[key]
    path, display = resolve_model(spec.model, cache_dir)
    if kind == "vllm":
        from agent.vllm_engine import VLLMEngine

        engine = VLLMEngine(path, dtype=spec.dtype, max_model_len=spec.max_model_len,
                            tensor_parallel_size=spec.tensor_parallel_size,
                            gpu_memory_utilization=spec.gpu_memory_utilization, seed=spec.seed)
    elif kind == "transformers":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = TransformersEngine(path, dtype=spec.dtype or ("bfloat16" if device == "cuda" else "float32"),
                                    device=device, max_batch=spec.max_batch, max_model_len=spec.max_model_len)
    elif kind == "expert":
        from transformers import AutoTokenizer

        from agent.expert import EXPERT_MODEL, ExpertEngine

        engine, display = ExpertEngine(AutoTokenizer.from_pretrained(path), seed=spec.seed), EXPERT_MODEL
    else:
        from transformers import AutoTokenizer

        from agent.http_engine import OpenAIEngine

        if not spec.base_urls:
            raise ValueError("engine kind 'openai' needs base_urls (e.g. http://127.0.0.1:8000)")
        engine = OpenAIEngine(spec.base_urls, spec.served_model or path, AutoTokenizer.from_pretrained(path),
                              api_key=spec.api_key)
    engine.model_name = display
    _LOADED[key] = engine
    return engine


def release_engines(keep: Iterable[EngineSpec] = ()) -> int:
    """Drop the cached engines not loaded from a spec in ``keep``, shut them down and free their memory.

    :func:`load_engine` keeps every engine for the life of the process (a vLLM engine holds its
    weights and KV cache, ~2 GB for the embedded model), so a process that evaluates checkpoint after
    checkpoint calls this between them. An engine with a ``close()`` (vLLM: stepping thread and
    engine core) is closed first. Returns how many engines were released.

    In-process vLLM engines share the process's distributed state, and shutting one down tears it
    down for all (vLLM's ``EngineCore.shutdown``), so releasing one vLLM engine releases every vLLM
    engine, kept ones included: :func:`load_engine` reloads those on their next use (seconds).
    """
    keep = set(keep)
    dropped = [key for key in _LOADED if key[1] not in keep]
    if any(key[0] == "vllm" for key in dropped):
        dropped += [key for key in _LOADED if key[0] == "vllm" and key not in dropped]
    for key in dropped:
        engine = _LOADED.pop(key)
        close = getattr(engine, "close", None)
        if callable(close):
            close()
        log.info("released engine %s (%s)", getattr(engine, "name", "?"), getattr(engine, "model_name", key[1].model))
        del engine
    if dropped:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
    return len(dropped)


def loaded_engines() -> list[EngineSpec]:
    """Specs of the engines :func:`load_engine` holds now (what :func:`release_engines` would drop)."""
    return [key[1] for key in _LOADED]
