"""Choosing and loading a generation engine from an :class:`~agent.engine_api.EngineSpec` (vLLM,
transformers, an OpenAI-compatible fleet, or the scripted expert), cached per spec and released on demand.
The interface the engines implement is :mod:`agent.engine_api`."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from pathlib import Path

from agent.engine_api import ENGINE_KINDS, Engine, EngineSpec

log = logging.getLogger(__name__)


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

        engine = VLLMEngine(
            path,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            seed=spec.seed,
        )
    elif kind == "transformers":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        from agent.transformers_engine import TransformersEngine

        engine = TransformersEngine(
            path,
            dtype=spec.dtype or ("bfloat16" if device == "cuda" else "float32"),
            device=device,
            max_batch=spec.max_batch,
            max_model_len=spec.max_model_len,
        )
    elif kind == "expert":
        from transformers import AutoTokenizer

        from agent.expert import EXPERT_MODEL, ExpertEngine

        engine, display = ExpertEngine(AutoTokenizer.from_pretrained(path), seed=spec.seed), EXPERT_MODEL
    else:
        from transformers import AutoTokenizer

        from agent.http_engine import OpenAIEngine

        if not spec.base_urls:
            raise ValueError("engine kind 'openai' needs base_urls (e.g. http://127.0.0.1:8000)")
        engine = OpenAIEngine(
            spec.base_urls, spec.served_model or path, AutoTokenizer.from_pretrained(path), api_key=spec.api_key
        )
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
