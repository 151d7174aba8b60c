#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run: the Triton and CUDA kernels against their
# PyTorch references, the kernels' speed against cuBLAS bf16, and (when transformers,
# safetensors and compressed-tensors are importable) the quantizer on CUDA against the
# CPU and its speed on Llama-2-7B-shaped layers. vLLM is not needed.
#
#   bash scripts/gpu_check.sh [OUT_DIR]     # default benchmarks/results/gpu
#
# Needs python3 with torch (CUDA), triton, pytest; nvcc for the CUDA C++ kernels. Every
# step's output goes to OUT_DIR/gpu_check.log; exits 1 if any step failed or was not run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/gpu}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
status=0

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

step environment 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name()); \
assert torch.cuda.is_available()"
# --noconftest: the kernel tests use no shared fixture, and the conftest imports the
# quantizer (transformers), which a bare GPU box may not have
step "kernel tests" 300 env PYTHONPATH="tests:." "$PY" -m pytest -q -ra --noconftest \
    -p no:cacheprovider tests/test_triton_kernels.py tests/test_cuda_kernels.py \
    --junitxml "$OUT/kernel_tests.xml"
step "kernel speed" 240 env PYTHONPATH=. "$PY" benchmarks/cuda_kernels.py --iters 30 \
    --out "$OUT/cuda_kernels.md"
if "$PY" -c "import transformers, safetensors, compressed_tensors" 2>/dev/null; then
    step "quantizer: CUDA = CPU" 300 env PYTHONPATH="tests:." "$PY" -m pytest -q -ra \
        -p no:cacheprovider tests/test_quantizer.py -k cuda
    step "quantizer speed" 420 env PYTHONPATH=. "$PY" benchmarks/quantize_speed.py \
        --models 7b --methods rtn,gptq --layers 2 --calib-sizes 32x2048,128x2048 \
        --device cuda --out "$OUT/quantize_speed_cuda.md"
else
    echo "=== quantizer checks NOT RUN: transformers / safetensors / compressed-tensors" \
        "are not importable here" | tee -a "$LOG"
    status=1
fi
echo "=== gpu_check: $([ $status -eq 0 ] && echo all passed || echo FAILED or incomplete)" \
    | tee -a "$LOG"
exit $status
