#!/usr/bin/env bash
# Creates .venv-peers: llm-compressor 0.14 (+ its own transformers <= 5.17 and
# compressed-tensors 0.19) beside torch 2.13.0 (CPU wheel) for benchmarks/peers/.
# Idempotent: an existing complete venv is left as it is. The main .venv is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEERS_VENV:-.venv-peers}
LLMC=${LLMCOMPRESSOR_VERSION:-0.14.0.1}
if [ -f "$VENV/.complete" ] && [ "$(cat "$VENV/.complete")" = "llmcompressor==$LLMC" ]; then
  echo "[peers_venv] $VENV is ready (llmcompressor==$LLMC)"; exit 0
fi
PY=${PYTHON:-python3}
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first, pinned: a bare 'torch' requirement of llmcompressor would pull a CUDA build
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "llmcompressor==$LLMC" "torch==2.13.0"
"$VENV/bin/python" - <<'PY'
import compressed_tensors, llmcompressor, torch, transformers
print("[peers_venv] llmcompressor", llmcompressor.__version__, "| compressed-tensors",
      compressed_tensors.__version__, "| transformers", transformers.__version__,
      "| torch", torch.__version__)
PY
echo "llmcompressor==$LLMC" > "$VENV/.complete"
