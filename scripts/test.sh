#!/usr/bin/env bash
# The test-suite: lint, then every test (the end-to-end ones start real vLLM engines,
# shared between tests: tests/engines.py), with the 25 slowest listed at the end.
#   bash scripts/test.sh            the whole suite (what CI runs)
#   bash scripts/test.sh --quick    the inner loop: everything that needs no vLLM engine,
#                                   plus one end-to-end case (a few minutes)
# Any other arguments go to pytest (e.g. tests/test_format.py -k unknown).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra --durations=25 "$@"
