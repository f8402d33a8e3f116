"""Shared fixtures: the real data beside the repo (skipped when absent) and a materialised home."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qadata.paths import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (a fresh clone has no shared data)")
    return SHARED_DATA


@pytest.fixture
def hotpot_row() -> dict:
    """A well-formed question in the Hugging Face layout."""
    return {
        "id": "q1",
        "question": "Which city is Alpha born in?",
        "answer": "Beta",
        "type": "bridge",
        "level": "easy",
        "supporting_facts": {"title": ["Alpha", "Beta"], "sent_id": [1, 0]},
        "context": {
            "title": ["Alpha", "Beta"],
            "sentences": [["Alpha is a poet.", " Alpha was born in Beta."], ["Beta is a city."]],
        },
    }


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("wb") as fh:
        for r in rows:
            fh.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


@pytest.fixture(scope="session")
def embedded_checkpoint(tmp_path_factory):
    """The embedded SmolLM2 converted once per test session (about 20 s)."""
    from agent.models import ensure_embedded_checkpoint

    return ensure_embedded_checkpoint(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_checkpoint)


@pytest.fixture(scope="session")
def tiny_model(embedded_tokenizer, tmp_path_factory):
    """A one-layer random Llama over the embedded tokenizer, saved to disk (training smoke tests)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = embedded_tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id or tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# -- hypothesis profiles (tests/test_properties.py) ---------------------------------------------------------------
# "ci" (the default) generates thousands of cases over the property tests in well under a minute on 2 busy cores;
# "dev" is a quick pass (HYPOTHESIS_PROFILE=dev). No deadline: on a loaded machine per-example timings are noise.
# Failing examples are kept in .hypothesis/ (hypothesis git-ignores it itself) and replayed first on the next run.
try:
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
except ImportError:  # a dev extra; the rest of the suite runs without it
    pass
else:
    import os

    hypothesis_settings.register_profile(
        "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    hypothesis_settings.register_profile("dev", max_examples=50, deadline=None)
    hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
