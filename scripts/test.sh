#!/usr/bin/env bash
# The test-suite: lint, then every test (the vLLM end-to-end ones start real engines).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra "$@"
