"""The Triton kernels (the GPU path) against the reference ops on random inputs.

On a CUDA machine they run on the GPU; elsewhere conftest sets TRITON_INTERPRET=1 and
the very same kernels run on CPU tensors in Triton's interpreter (exact semantics of
every tl op, no GPU timings)."""

from __future__ import annotations

import pytest
import torch

from vllm_quarot.hadamard import HadamardSizeError, hadamard_factor
from vllm_quarot.runtime.ops import reference as ops
from vllm_quarot.runtime.ops import triton as tk

pytestmark = pytest.mark.skipif(not tk.AVAILABLE, reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_kernels_are_usable_here():
    """The conftest switch works: CI really executes the kernels (never skips them)."""
    assert tk.usable(torch.device(DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k"), [(1, 136), (5, 200), (70, 4096), (3, 5000)])
@pytest.mark.parametrize(("bits", "clip"), [(4, 1.0), (4, 0.9), (8, 1.0)])
def test_quantize_equals_reference(dtype, m, k, bits, clip):
    x = (torch.randn(m, k, generator=_gen(m + k)) * 3).to(dtype)
    ref_q, ref_s = ops.quantize_per_token(x, bits, clip)
    q, s = tk.quantize_impl(x.to(DEV), False, bits, clip)
    assert torch.equal(q.cpu(), ref_q) and torch.equal(s.cpu(), ref_s)


# every branch of hadamard_plan: 2^k ≤ 64 padded to 16 rows (8, 64), K·2^k with 2^k < 16
# (172, 172·8), one dense block with the K mix (172·64), 128 = 16 × 8 (12·128, 128), two
# blocks with and without K (20·256, 4096, 28·512)
HAD_SIZES = [8, 64, 172, 1376, 11008, 1536, 128, 5120, 4096, 14336]


# the interpreter ignores a dot's precision; on a GPU the 3xTF32 variant is checked too
PRECISIONS = ["ieee", "tf32x3"] if DEV == "cuda" else ["ieee"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("n", HAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hadamard_quantize_equals_reference(n, dtype, precision):
    """Fused R4 + quantize == quarot::hadamard then quarot::quantize_per_token. The
    Hadamard sums in another order, so a value on a rounding tie (a 16-bit rounding, or
    x/scale ≈ k + 0.5 in float32) may rarely land on its neighbour: codes may then differ
    by one, scales by one ulp."""
    m = 6
    x = torch.randn(m, n, generator=_gen(n)).to(dtype)
    x[0, 0] = 40.0  # an outlier: the case the rotation is for
    y = ops.hadamard(x, hadamard_factor(n))
    ref_q, ref_s = ops.quantize_per_token(y, 4, 0.95)
    q, s = tk.quantize_impl(x.to(DEV), True, 4, 0.95, precision)
    q, s = q.cpu(), s.cpu()
    diff = (q.int() - ref_q.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    ulp = 1e-6 if dtype == torch.float32 else 2.0 ** -7
    assert ((s / ref_s) - 1).abs().max() <= ulp


def test_hadamard_plan_limits():
    assert tk.hadamard_plan(11008) == (172, 256, 1, 64, 64)
    assert tk.hadamard_plan(4096) == (1, 1, 64, 64, 64)
    assert tk.hadamard_plan(1536) == (12, 16, 16, 8, 16)  # 128 = 16 × 8, padded to 16
    assert tk.hadamard_plan(172) == (172, 256, 1, 1, 16)
    with pytest.raises(HadamardSizeError, match="2\\^k ≤ 16384"):
        tk.hadamard_plan(1 << 15)


GEMM_CASES = [  # (M, K, N, bits, group size): ragged M/N/K, both tile regimes, groups
    (1, 136, 37, 4, -1), (3, 200, 100, 4, -1), (17, 256, 70, 4, 128), (70, 256, 130, 4, 64),
    (130, 192, 64, 4, -1), (5, 200, 100, 8, -1), (33, 128, 130, 8, 64), (1, 512, 96, 8, 128),
]


@pytest.mark.parametrize(("m", "k", "n", "bits", "gs"), GEMM_CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_equals_int_linear(m, k, n, bits, gs, out_dtype, with_bias):
    """Integer GEMM + epilogue: bit for bit quarot::int_linear."""
    g = _gen(m * k + n)
    qmax = (1 << (bits - 1)) - 1
    x_q = torch.randint(-qmax - 1, qmax + 1, (m, k), generator=g, dtype=torch.int8)
    x_s = torch.rand(m, 1, generator=g) + 0.01
    w_q = torch.randint(-qmax - 1, qmax + 1, (n, k), generator=g, dtype=torch.int8)
    w_s = torch.rand(n, 1 if gs == -1 else k // gs, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g).to(out_dtype) if with_bias else None
    ref = ops.int_linear(x_q, x_s, w_q, w_s, bias, out_dtype)
    out = tk.gemm_impl(
        x_q.to(DEV), x_s.to(DEV), tk.repack_weight(w_q, bits).to(DEV),
        tk.repack_scale(w_s).to(DEV), None if bias is None else bias.to(DEV), bits, out_dtype)
    assert torch.equal(out.cpu(), ref)


# the interpreter computes bfloat16 dots on the raw bits; a GPU runs all three
WEIGHT_ONLY_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if DEV == "cuda" else [])


@pytest.mark.parametrize("dtype", WEIGHT_ONLY_DTYPES)
@pytest.mark.parametrize(("m", "k", "n", "gs"), [(1, 256, 70, 128), (19, 200, 37, -1)])
def test_gemm_weight_only_matches_wna16_linear(dtype, m, k, n, gs):
    """W4A16: codes dequantized in the kernel, float32 accumulation per group."""
    g = _gen(k + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w_q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    w_s = torch.rand(n, 1 if gs == -1 else k // gs, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g).to(dtype)
    ref = ops.wna16_linear(x, w_q, w_s, bias).float()
    out = tk.gemm_impl(x.to(DEV), None, tk.repack_weight(w_q, 4).to(DEV),
                       tk.repack_scale(w_s).to(DEV), bias.to(DEV), 4, dtype).float().cpu()
    tol = 1e-5 if dtype == torch.float32 and DEV == "cpu" else 1e-2
    assert torch.allclose(out, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_repacked_weight_stays_4bit():
    w_q = torch.randint(-8, 8, (64, 256), generator=_gen(1), dtype=torch.int8)
    packed = tk.repack_weight(w_q, 4)
    assert packed.shape == (64, 128) and packed.dtype == torch.int8
    lo = (packed << 4) >> 4
    assert torch.equal(lo, w_q[:, 0::2]) and torch.equal(packed >> 4, w_q[:, 1::2])


def test_gemm_rejects_mismatched_weight():
    x_q = torch.zeros(2, 128, dtype=torch.int8, device=DEV)
    w = tk.repack_weight(torch.ones(16, 256, dtype=torch.int8), 4).to(DEV)
    with pytest.raises(ValueError, match="K=128.*K=256"):
        tk.gemm_impl(x_q, torch.ones(2, 1, device=DEV), w, torch.ones(1, 16, device=DEV),
                     None, 4, torch.float32)


def test_can_run():
    assert tk.can_run(4, 11008, -1) and tk.can_run(4, 4096, 128) and tk.can_run(8, 200, -1)
    assert not tk.can_run(4, 4096, 32) and not tk.can_run(4, 4096, 256)
    assert not tk.can_run(3, 4096, -1)


def test_ops_have_fake_impls():
    """opcheck: schema, fake (meta) impl and dispatch agree, for torch.compile."""
    g = _gen(3)
    x = torch.randn(4, 172, generator=g).to(DEV)
    torch.library.opcheck(torch.ops.quarot_triton.quantize.default, (x, True, 4, 1.0))
    x_q = torch.randint(-8, 8, (4, 256), generator=g, dtype=torch.int8).to(DEV)
    w = tk.repack_weight(torch.randint(-8, 8, (32, 256), generator=g, dtype=torch.int8), 4)
    torch.library.opcheck(torch.ops.quarot_triton.gemm.default, (
        x_q, torch.rand(4, 1).to(DEV), w.to(DEV), torch.rand(1, 32).to(DEV), None, 4,
        torch.float32))


# ----------------------------------------------------------- compiled for real GPUs
# triton.compile with an explicit target needs no GPU: what each launch config becomes
# on sm_80 (A100), sm_89 (L4/L40S/RTX 40xx) and sm_90 (H100): tensor-core MMAs, shared
# memory within the device's limit, and no register spills (ptxas's stack size 0).
# One subprocess (outside the interpreter) compiles all cases of tests/triton_compile.py.
from triton_compile import CASES, CCS, GEMM_SHAPES, SMEM_LIMIT, _gemm_id  # noqa: E402


@pytest.fixture(scope="module")
def compiled() -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return {(r["case"], r["cc"]): r for r in rows}


def test_every_case_compiled(compiled):
    assert len(compiled) == len(CASES) * len(CCS)


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("m", [1, 64, 2048])
@pytest.mark.parametrize(("w_bits", "act", "groups"), GEMM_SHAPES)
def test_gemm_compiles_to_tensor_cores_without_spills(compiled, cc, m, w_bits, act, groups):
    r = compiled[(_gemm_id(m, w_bits, act, groups), cc)]
    ab = "s8.s8" if act is None else ("bf16.bf16" if act == torch.bfloat16 else "f16.f16")
    assert any(ab in line for line in r["mma"]), f"no {ab} tensor-core MMA: {r['mma']}"
    assert r["shared"] <= SMEM_LIMIT[cc]
    assert r["stack"] == 0 and r["local"] == 0, f"ptxas spills: {r}"


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("n", [4096, 11008, 14336, 1536, 18944, 28672])
def test_hadamard_quantize_compiles(compiled, cc, n):
    """Llama-2/3-7/8B's and SmolLM2's sizes compile spill-free; 148·128 (Qwen2-7B) and
    28·1024 (Llama-2-70B) compile with spills (a [256, 128] / [32, 1024] float32 row in
    registers), and 28672 needs more shared memory than sm_86/89 have: there the linear
    method falls back to the unfused Hadamard."""
    r = compiled[(f"hadamard-{n}", cc)]
    if n in (4096, 11008, 14336, 1536):  # at most a 16-byte stack frame (sm_89, 4096)
        assert r["stack"] <= 16 and r["shared"] <= SMEM_LIMIT[cc], r
    assert r["shared"] <= SMEM_LIMIT[90]


@pytest.mark.parametrize("cc", CCS)
def test_quantize_compiles_without_spills(compiled, cc):
    r = compiled[("quantize-4096", cc)]
    assert r["stack"] <= 16 and r["shared"] <= 1024, r


def test_gpu_benchmark_runs(monkeypatch):
    """benchmarks/cuda_kernels.py has not met a GPU yet: run one row of it on the
    interpreter (tiny shape, one call per timer) so that it works when one comes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "cuda_kernels.py"
    spec = importlib.util.spec_from_file_location("cuda_kernels_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.bench_shape(None, 344, 48, 3, 1, had=True, dev=DEV,
                            time_ms=lambda fn, iters: (fn(), 1.0)[1])
    table = bench.markdown([row], "test")
    assert "| 344 -> 48 (+Had) | 3 |" in table and "1.00x" in table
