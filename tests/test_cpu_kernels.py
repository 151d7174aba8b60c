"""The native CPU kernels (csrc/cpu) against the reference ops, on every dispatch path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vllm_quarot.hadamard import hadamard_factor, hadamard_transform
from vllm_quarot.runtime.ops import cpu as cpu_ops
from vllm_quarot.runtime.ops import reference as ops

if not cpu_ops.AVAILABLE:
    if os.environ.get("VLLM_QUAROT_NO_EXT") == "1":
        pytest.skip("VLLM_QUAROT_NO_EXT=1: native kernels disabled", allow_module_level=True)
    raise RuntimeError("vllm_quarot/_C_cpu was not built: run scripts/setup.sh with a compiler")

ISAS = cpu_ops.supported_isas()
Q = torch.ops.quarot_cpu


@pytest.fixture(params=ISAS)
def isa(request):
    previous = cpu_ops.set_isa(request.param)
    yield request.param
    cpu_ops.set_isa(previous)


def test_this_machine_has_a_vector_path():
    assert "scalar" in ISAS and len(ISAS) >= 2, ISAS


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f
                     if line.startswith("flags")), set())


def test_every_path_the_cpu_has_is_offered():
    flags = _cpu_flags()
    assert ("avx2" in flags) == ("avx2" in ISAS)
    assert ("avx512_vnni" in flags and "avx512bw" in flags) == ("avx512_vnni" in ISAS)
    # AMX also needs Linux's tile permission (kernel >= 5.16 grants it on request; torch
    # asks the same way)
    amx = "amx_int8" in flags and "avx512_vnni" in flags and torch._C._cpu._init_amx()
    assert amx == ("amx" in ISAS)


def test_peak_microbenchmarks_run():
    for seq, isa in (("avx2_maddubs", "avx2"), ("avx2_maddubs_i16", "avx2"),
                     ("avx512_vnni", "avx512_vnni"),
                     ("amx_int8", "amx")):
        if isa in ISAS:
            macs = Q.peak(seq, 1, 1000)
            assert 1e8 < macs < 1e14, (seq, macs)
    buf = torch.ones(1 << 20, dtype=torch.uint8)
    assert 1e8 < Q.read_bandwidth(buf, 1, 2) < 1e13
    with pytest.raises(RuntimeError, match="unknown sequence"):
        Q.peak("sse9", 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,clip", [(4, 1.0), (4, 0.9), (8, 1.0)])
def test_quantize_equals_reference(isa, dtype, bits, clip):
    torch.manual_seed(0)
    x = (torch.randn(37, 200) * torch.rand(37, 1) * 5).to(dtype)
    x[3, 7] = 40.0  # an outlier row
    codes, scales, asums = Q.quantize(x, None, bits, clip, None, 5)
    ref_codes, ref_scales = ops.quantize_per_token(x, bits, clip)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(asums, ref_codes.int().reshape(37, 5, 40).sum(-1))


def test_static_quantize_equals_reference(isa):
    x = torch.randn(9, 64, dtype=torch.bfloat16) * 3
    scale = torch.tensor([0.05])
    codes, scales, _ = Q.quantize(x, None, 8, 1.0, scale, 1)
    assert torch.equal(codes, ops.quantize_static(x, scale, 8))
    assert torch.equal(scales, scale.expand(9, 1))


@pytest.mark.parametrize("n", [64, 12 * 16, 20 * 8, 28 * 4, 44 * 32, 172 * 64, 4096])
def test_hadamard_matches_float64(isa, n):
    torch.manual_seed(n)
    x = torch.randn(5, n)
    had = hadamard_factor(n, torch.float32)
    ref = hadamard_transform(x.double(), had.double())
    out = Q.hadamard(x, had)
    assert torch.allclose(out.double(), ref, atol=1e-5 * ref.abs().max().item())


def test_hadamard_quantize_matches_reference(isa):
    """R4 fused into quantization: the same codes up to float-order ties."""
    torch.manual_seed(1)
    n = 172 * 16
    x = torch.randn(33, n, dtype=torch.bfloat16)
    had = hadamard_factor(n, torch.float32)
    codes, scales, _ = Q.quantize(x, had, 4, 0.95, None, 1)
    ref_codes, ref_scales = ops.quantize_per_token(ops.hadamard(x.float(), had), 4, 0.95)
    assert torch.allclose(scales, ref_scales, rtol=1e-5)
    diff = (codes.int() - ref_codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3


def _random_layer(n: int, k: int, bits: int, groups: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lo = -(1 << (bits - 1))
    w = torch.randint(lo, -lo, (n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, groups, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    return w, w_scale, bias


SHAPES = [  # (M, K, N, groups): ragged M, K and N off the 64/16-wide blocks
    (1, 64, 48, 1), (3, 136, 37, 1), (5, 256, 100, 4), (17, 200, 70, 5), (70, 512, 130, 1),
    # M >= 16 with groups of a multiple of 64 run AMX under "amx": one or two 16-row tiles
    # in the last 32-row pair, an odd number of 16-channel blocks (half a 32-channel
    # panel), more than one 256-row chunk, several groups
    (16, 64, 16, 1), (33, 128, 48, 2), (48, 640, 200, 5), (300, 256, 70, 2),
]


@pytest.mark.parametrize("m,k,n,groups", SHAPES)
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (4, 8), (8, 8)])
def test_gemm_equals_int_linear(isa, m, k, n, groups, w_bits, a_bits):
    w, w_scale, bias = _random_layer(n, k, w_bits, groups, seed=m * k + n)
    x = torch.randn(m, k) * 2
    codes, scales, asums = Q.quantize(x, None, a_bits, 1.0, None, groups)
    packed = Q.repack_weight(w, w_bits)
    scale_t = Q.repack_scale(w_scale)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for b in (bias, None):
            ref = ops.int_linear(codes, scales, w, w_scale, b, out_dtype)
            out = Q.gemm(codes, scales, asums, packed, scale_t, b, n, w_bits, out_dtype)
            assert out.dtype == out_dtype
            # bit-exact: int32 sums, then the reference's float operations in its order
            assert torch.equal(out, ref), (out - ref).abs().max()


@pytest.mark.parametrize("code", [-128, 127])
@pytest.mark.parametrize("bits,w_val", [(4, 7), (4, -8), (8, 127), (8, -128), (8, 15)])
def test_gemm_extreme_codes_are_exact(isa, code, bits, w_val):
    """The largest sums the int16 runs of the AVX2 paths can meet (every weight nibble 15
    or 0 against 8-bit codes at the ends of their range, 4 rows): exact."""
    m, k, n = 4, 512, 48
    w = torch.full((n, k), w_val, dtype=torch.int8)
    w_scale = torch.full((n, 1), 0.5)
    codes = torch.full((m, k), code, dtype=torch.int8)
    scales = torch.ones(m, 1)
    asums = codes.int().sum(-1, keepdim=True).int()
    out = Q.gemm(codes, scales, asums, Q.repack_weight(w, bits), Q.repack_scale(w_scale),
                 None, n, bits, torch.float32)
    ref = ops.int_linear(codes, scales, w, w_scale, None, torch.float32)
    assert torch.equal(out, ref)
    assert out[0, 0].item() == code * w_val * k * 0.5


@pytest.mark.parametrize("online_hadamard", [False, True])
def test_fused_linear_equals_reference_ops(isa, online_hadamard):
    """The one-call layer = (hadamard →) quantize_per_token → int_linear."""
    m, k, n = 11, 28 * 16, 50
    w, w_scale, bias = _random_layer(n, k, 4, 1, seed=3)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    had = hadamard_factor(k, torch.float32) if online_hadamard else None
    out = Q.linear(x, had, Q.repack_weight(w, 4), Q.repack_scale(w_scale), bias, n, 4, 4, 0.9,
                   None)
    xr = ops.hadamard(x, had) if online_hadamard else x
    ref = ops.int_linear(*ops.quantize_per_token(xr, 4, 0.9), w, w_scale, bias, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    # with R4, bf16 rounding of the rotated input (reference) vs float32 (fused) may
    # move a few codes by one step: compare relative to the output scale
    tol = 0.05 if online_hadamard else 0.01
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_fake_impls_pass_opcheck():
    k, n = 64, 32
    w, w_scale, bias = _random_layer(n, k, 4, 1, seed=5)
    args = (torch.randn(3, k), hadamard_factor(k, torch.float32), Q.repack_weight(w, 4),
            Q.repack_scale(w_scale), bias, n, 4, 4, 1.0, None)
    torch.library.opcheck(Q.linear.default, args)
    torch.library.opcheck(Q.quantize.default, (torch.randn(3, k), None, 4, 1.0, None, 2))


def test_bad_input_is_a_clear_error():
    w, w_scale, _ = _random_layer(16, 60, 4, 1, seed=6)
    with pytest.raises(RuntimeError, match="K=60 must be a multiple of 8"):
        Q.repack_weight(w, 4)
    with pytest.raises(RuntimeError, match="does not match N=16"):
        codes, s, a = Q.quantize(torch.randn(2, 64), None, 4, 1.0, None, 1)
        Q.gemm(codes, s, a, Q.repack_weight(torch.zeros(16, 128, dtype=torch.int8), 4),
               Q.repack_scale(w_scale), None, 16, 4, torch.float32)
    with pytest.raises(RuntimeError, match="not a power of two"):
        Q.hadamard(torch.randn(2, 24 * 3), torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="unknown ISA 'sse9'"):
        cpu_ops.set_isa("sse9")


def test_environment_variable_forces_the_path():
    code = "from vllm_quarot.runtime.ops import cpu; print(cpu.isa())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, VLLM_QUAROT_CPU_ISA="scalar"), check=True)
    assert out.stdout.strip() == "scalar"
