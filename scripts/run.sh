#!/usr/bin/env bash
# Materialise every asset on the embedded default (CPU) and print where the outputs are.
# Extra arguments go to `autocoa run` (e.g. --profile shared).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/autocoa run "$@"
