"""The transformers engine: generation with ``model.generate`` on CPU or GPU, token-exact (see
:mod:`agent.engine_api`); the fallback when vLLM is not installed, and the engine of small tests."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from agent.engine_api import GenRequest, GenResult, cut_at_stop

log = logging.getLogger(__name__)


class TransformersEngine:
    """In-process batched ``generate`` (left padding, stop strings): the portable fallback."""

    name = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch: int = 32,
        max_model_len: int | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype)).to(device)
        model.eval()
        self._bind(model, device, max_batch, max_model_len)

    @classmethod
    def from_model(
        cls, model, tokenizer, *, max_batch: int = 32, max_model_len: int | None = None
    ) -> TransformersEngine:
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
                    raise ValueError(
                        f"prompt of {len(r.prompt_ids)} tokens does not fit max_model_len={self.max_model_len}"
                    )
            requests = [
                replace(r, max_new_tokens=max(1, min(r.max_new_tokens, self.max_model_len - len(r.prompt_ids))))
                for r in requests
            ]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            # per-request seeds are not part of the key (torch has one generator per generate call):
            # a batch is seeded by its first request, reproducible for the same batch composition
            groups.setdefault((r.temperature, r.top_p, tuple(sorted(r.stop)), r.allowed_token_ids), []).append(i)
        out: list[GenResult | None] = [None] * len(requests)
        for idx in groups.values():
            for j in range(0, len(idx), self.max_batch):
                chunk = idx[j : j + self.max_batch]
                for i, res in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                    out[i] = res
        return out

    def _generate_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        import torch

        width = max(len(r.prompt_ids) for r in reqs)
        input_ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(reqs), width), dtype=torch.long)
        for row, r in enumerate(reqs):
            input_ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attention[row, width - len(r.prompt_ids) :] = 1
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
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max(r.max_new_tokens for r in reqs),
                do_sample=first.temperature > 0,
                temperature=first.temperature if first.temperature > 0 else None,
                top_p=first.top_p if first.temperature > 0 else None,
                pad_token_id=self.pad_id,
                stop_strings=stop or None,
                tokenizer=self.tokenizer if stop else None,
                logits_processor=processors,
            )
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
