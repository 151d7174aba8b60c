#!/usr/bin/env bash
# The main job: SmolLM2-135M-Instruct -> QuaRot W4A4 -> vLLM, side by side with bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/smollm2_demo.py "$@"
