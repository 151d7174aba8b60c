"""Rotated Runtime Smooth (``--smooth runtime``, format v7 ``activation.smooth``, v9
integer factors): the
reference math against a float64 definition, the native CPU kernel bit for bit against
the reference ops on every dispatch path, the format's and the quantizer's checks, and
end to end through real vLLM engines: equal to the simulation, and independent of
batch composition and chunking."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import RANDOM_MODEL_KV_CLIP

import vllm_quarot.runtime.ops.reference as ops
from vllm_quarot.format import (
    FORMAT_VERSION,
    ActivationSpec,
    CheckpointFormatError,
    OnlineHadamard,
    QuaRotFormat,
    RotationSpec,
    SmoothSpec,
    WeightSpec,
)
from vllm_quarot.hadamard import hadamard_factor, hadamard_transform
from vllm_quarot.offline.options import QuantizeError, QuantizeOptions, check_options
from vllm_quarot.quant import (
    fake_smooth_quantize,
    pack_weight,
    qmax,
    quantize_weight_rtn,
    smooth_order,
    smooth_quantize,
)
from vllm_quarot.runtime.ops import cpu as cpu_ops

# under "amx", GEMMs of M >= 16 rows with groups of multiples of 64 run quarot_cpu.cpp's
# AMX tiles with the RRS epilogue (the shapes of 70 rows and more), the rest AVX512-VNNI
ISAS = cpu_ops.supported_isas()
native = pytest.mark.skipif(not cpu_ops.AVAILABLE, reason="native library not built")


@pytest.fixture(params=ISAS or ["none"])
def isa(request):
    if not cpu_ops.AVAILABLE:
        pytest.skip("native library not built")
    previous = cpu_ops.set_isa(request.param)
    yield request.param
    cpu_ops.set_isa(previous)


def _x(m: int, k: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 5
    x[0, k // 3] = 60.0  # a spike
    x[-1, :8] = 0.0  # an all-zero group when the group size is 8
    return x.to(dtype)


# ----------------------------------------------------------------------------
# The reference math


@pytest.mark.parametrize("bits,clip,gs", [(4, 0.9, 8), (4, 1.0, 64), (8, 1.0, 32)])
@pytest.mark.parametrize("reorder", [False, True])
def test_smooth_quantize_matches_float64_definition(bits, clip, gs, reorder):
    m, k = 7, 192
    x = _x(m, k, seed=gs + bits)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1)).int() if reorder \
        else None
    q, scale = smooth_quantize(x, bits, clip, gs, perm)
    assert q.dtype == torch.int8 and scale.shape == (m, k // gs)
    xd = x.double() if perm is None else x.double()[:, perm.long()]
    g = xd.reshape(m, k // gs, gs)
    s = g.abs().amax(-1).clamp(min=1e-12)  # the smoothing factors
    y = g / s.unsqueeze(-1)  # the smoothed row
    a = (y.abs().amax((-1, -2)) * clip / qmax(bits)).clamp(min=1e-12)  # per token
    q_ref = torch.clamp(torch.round(y / a[:, None, None]), -qmax(bits) - 1, qmax(bits))
    assert torch.allclose(scale.double(), a[:, None] * s, rtol=1e-6)
    # float32 vs float64 division may land a .5 tie on its neighbour
    diff = (q.double().reshape(m, -1, gs) - q_ref).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3
    # with per-token maxima every group's largest |x| is a full-range code
    codes = q.reshape(m, -1, gs).abs().amax(-1)
    expected = round(clip * qmax(bits))
    nonzero = s > 1e-12
    assert (codes[nonzero] >= expected - 1).all()
    assert (codes[~nonzero] == 0).all()


@pytest.mark.parametrize("levels,gs", [(16, 8), (16, 64), (4, 32)])
def test_integer_factors_follow_their_definition(levels, gs):
    """Integer factors: every group's codes are multiples of its factor f in [1, L], the
    token's largest group has f = L, codes × f stay int8, and each element dequantizes
    within half a step of its group's scale (base · f) unless clipped; at 8 bits (L' = 1)
    it is plain per-token quantization."""
    from vllm_quarot.quant import quantize_per_token, smooth_factor_levels

    m, k = 9, 192
    x = _x(m, k, seed=levels + gs)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(4)).int()
    q, base = smooth_quantize(x, 4, 0.9, gs, perm, levels)
    assert q.dtype == torch.int8 and base.shape == (m, 1)
    xg = x[:, perm.long()].double().reshape(m, -1, gs)
    t = xg.abs().amax(-1) * 0.9 / 7  # each group's own scale
    f = torch.clamp(torch.round(t / (t.amax(-1, keepdim=True) / levels)), 1, levels)
    qg = q.double().reshape(m, -1, gs)
    live = t > 1e-9
    assert ((qg % f.unsqueeze(-1)) == 0).all()  # multiples of the factor
    assert (f.amax(-1) == levels)[live.any(-1)].all()
    assert (qg / f.unsqueeze(-1)).abs().max() <= 8
    step = base.double().unsqueeze(-1) * f.unsqueeze(-1)
    err = (qg * base.double().unsqueeze(-1) - xg).abs()
    unclipped = (qg / f.unsqueeze(-1)).abs() < 7
    assert (err[unclipped] <= 0.5 * step.expand_as(err)[unclipped] * (1 + 1e-5)).all()
    assert smooth_factor_levels(16, 4) == 16 and smooth_factor_levels(16, 8) == 1
    assert smooth_factor_levels(0, 4) == 0
    q8, s8 = smooth_quantize(x, 8, 1.0, gs, None, 1)
    p8, ps8 = quantize_per_token(x, 8, 1.0)
    assert torch.equal(q8, p8) and torch.equal(s8, ps8)
    # the fake quantization dequantizes them in channel order; finer than per token
    from vllm_quarot.quant import fake_quantize_per_token

    out = fake_smooth_quantize(x, 4, 0.9, gs, perm, levels)
    deq = (q.float() * base).reshape(m, k)
    assert torch.equal(out[:, perm.long()], deq)
    assert (out - x).pow(2).sum() < (fake_quantize_per_token(x, 4, 0.9) - x).pow(2).sum()


def test_fake_smooth_quantize_is_the_dequantized_codes_in_channel_order():
    k, gs = 128, 32
    x = _x(5, k, seed=3)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(2)).int()
    q, scale = smooth_quantize(x, 4, 0.9, gs, perm)
    deq = (q.float().reshape(5, -1, gs) * scale.unsqueeze(-1)).reshape(5, k)
    out = fake_smooth_quantize(x, 4, 0.9, gs, perm)
    assert torch.equal(out[:, perm.long()], deq)
    # finer than per-token quantization on this input (the point of smoothing)
    from vllm_quarot.quant import fake_quantize_per_token

    err_rrs = (out - x).pow(2).sum()
    err_tok = (fake_quantize_per_token(x, 4, 0.9) - x).pow(2).sum()
    assert err_rrs < 0.5 * err_tok


def test_smooth_order_sorts_channels_by_maxima():
    amax = torch.tensor([0.5, 3.0, 0.5, 7.0, 1.0])
    assert smooth_order(amax).tolist() == [3, 1, 4, 0, 2]
    assert smooth_order(amax).dtype == torch.int32


@pytest.mark.parametrize("m,k,n,gs", [(1, 64, 48, 32), (6, 192, 40, 64), (17, 320, 72, 8)])
def test_smooth_int_linear_matches_float64(m, k, n, gs):
    g = torch.Generator().manual_seed(m)
    xq = torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=g)
    xs = torch.rand(m, k // gs, generator=g) + 0.1
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, 1, generator=g) + 0.1
    bias = torch.randn(n, generator=g)
    out = ops.smooth_int_linear(xq, xs, wq, ws, bias, torch.float32)
    xd = (xq.double().reshape(m, -1, gs) * xs.double().unsqueeze(-1)).reshape(m, k)
    ref = xd @ (wq.double() * ws.double()).t() + bias.double()
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_reference_ops_pass_opcheck():
    k, gs = 64, 16
    x = torch.randn(3, k)
    perm = torch.randperm(k).int()
    torch.library.opcheck(ops.smooth_quantize, (x, 4, 0.9, gs, perm, 0))
    torch.library.opcheck(ops.smooth_quantize, (x, 4, 0.9, gs, perm, 16))
    q, s = ops.smooth_quantize(x, 4, 0.9, gs, None, 0)
    wq = torch.randint(-8, 8, (24, k), dtype=torch.int8)
    torch.library.opcheck(ops.smooth_int_linear,
                          (q, s, wq, torch.rand(24, 1), torch.randn(24), torch.float32))


# ----------------------------------------------------------------------------
# The native kernel (csrc/cpu/rrs.cpp) against the reference ops, bit for bit

Q = torch.ops.quarot_cpu
KERNEL_SHAPES = [  # (M, K, N, group): ragged M and N, groups from 8 to the whole row
    (1, 64, 48, 32), (2, 136, 37, 8), (5, 576, 100, 64), (17, 1536, 70, 96),
    (70, 512, 130, 128), (9, 192, 576, 192), (133, 384, 100, 64), (48, 256, 16, 256),
]


@pytest.mark.parametrize("m,k,n,gs", KERNEL_SHAPES)
@pytest.mark.parametrize("reorder", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_quantize_equals_reference(isa, m, k, n, gs, reorder, dtype):
    x = _x(m, k, seed=m + k, dtype=dtype)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)).int() if reorder \
        else None
    for bits, clip in ((4, 0.9), (8, 1.0)):
        codes, scales, asums = Q.rrs_quantize(x, None, perm, bits, clip, gs)
        ref_codes, ref_scales = ops.smooth_quantize(x, bits, clip, gs, perm, 0)
        assert torch.equal(codes, ref_codes)
        assert torch.equal(scales, ref_scales)
        assert torch.equal(asums, ref_codes.int().reshape(m, -1, gs).sum(-1))
        # integer factors: codes × factor, one scale and one code sum per row
        for levels in ((16, 3) if bits == 4 else (1,)):
            codes, scales, asums = Q.rrs_quantize(x, None, perm, bits, clip, gs, levels)
            ref_codes, ref_scales = ops.smooth_quantize(x, bits, clip, gs, perm, levels)
            assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
            assert torch.equal(asums, ref_codes.int().sum(-1, keepdim=True))


def _weights(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    return w, torch.rand(n, 1, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)


@pytest.mark.parametrize("code", [-128, 127])
@pytest.mark.parametrize("w_val", [7, -8])
@pytest.mark.parametrize("k,gs", [(512, 64), (384, 96), (320, 40)])
def test_native_gemm_extreme_codes_are_exact(isa, code, w_val, k, gs):
    """The largest sums the AVX2 tile's int16 runs of 4 k-steps can meet (every nibble 15
    or 0 against 8-bit codes at the ends of their range; groups of 8, 12 and 5 k-steps, so
    that runs are cut by group ends): exact."""
    m, n = 4, 48
    groups = k // gs
    w = torch.full((n, k), w_val, dtype=torch.int8)
    ws = torch.full((n, 1), 0.5)
    codes = torch.full((m, k), code, dtype=torch.int8)
    scales = torch.ones(m, groups)
    asums = codes.int().reshape(m, groups, gs).sum(-1).int()
    out = Q.rrs_gemm(codes, scales, asums, Q.rrs_repack_weight(w, None), ws.reshape(-1), None,
                     n, torch.float32)
    ref = ops.smooth_int_linear(codes, scales, w, ws, None, torch.float32)
    assert torch.equal(out, ref)
    assert out[0, 0].item() == code * w_val * k * 0.5


@pytest.mark.parametrize("m,k,n,gs", KERNEL_SHAPES)
@pytest.mark.parametrize("reorder", [False, True])
@pytest.mark.parametrize("a_bits", [4, 8])
def test_native_gemm_equals_reference(isa, m, k, n, gs, reorder, a_bits):
    x = _x(m, k, seed=m * k + n)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(n)).int() if reorder \
        else None
    w, ws, bias = _weights(n, k, seed=n)
    codes, scales, asums = Q.rrs_quantize(x, None, perm, a_bits, 1.0, gs)
    packed = Q.rrs_repack_weight(w, perm)
    w_ordered = w if perm is None else w[:, perm.long()]
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for b in (bias, None):
            out = Q.rrs_gemm(codes, scales, asums, packed, ws.reshape(-1), b, n, out_dtype)
            ref = ops.smooth_int_linear(codes, scales, w_ordered, ws, b, out_dtype)
            assert out.dtype == out_dtype and torch.equal(out, ref)


@pytest.mark.parametrize("reorder", [False, True])
def test_native_linear_equals_reference_ops(isa, reorder):
    """The one-call layer = smooth_quantize → smooth_int_linear (no Hadamard: bit-exact)."""
    m, k, n, gs = 13, 320, 50, 32
    x = _x(m, k, seed=4, dtype=torch.bfloat16)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(5)).int() if reorder \
        else None
    w, ws, bias = _weights(n, k, seed=6)
    out = Q.rrs_linear(x, None, perm, Q.rrs_repack_weight(w, perm), ws.reshape(-1), bias, n,
                       4, 0.9, gs)
    w_ordered = w if perm is None else w[:, perm.long()]
    ref = ops.smooth_int_linear(*ops.smooth_quantize(x, 4, 0.9, gs, perm, 0), w_ordered, ws,
                                bias, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


@pytest.mark.parametrize("m,k,n,gs", KERNEL_SHAPES)
def test_native_linear_with_integer_factors_is_the_plain_gemm(isa, m, k, n, gs):
    """Integer factors: rrs_linear = smooth_quantize (codes × factor, the row's base) →
    quarot::int_linear (the plain per-token GEMM) bit for bit, on AMX shapes too (M ≥ 16,
    K a multiple of 64), with weights in the smoothing order and repack_scale's layout."""
    x = _x(m, k, seed=3 * m + k, dtype=torch.bfloat16)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(m)).int()
    w, ws, bias = _weights(n, k, seed=k)
    packed = Q.rrs_repack_weight(w, perm)
    for levels, b in ((16, bias), (7, None)):
        out = Q.rrs_linear(x, None, perm, packed, Q.repack_scale(ws), b, n, 4, 0.9, gs,
                           levels)
        ref = ops.int_linear(*ops.smooth_quantize(x, 4, 0.9, gs, perm, levels),
                             w[:, perm.long()], ws, b, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_native_fused_hadamard_matches_reference(isa):
    """R4 fused into the smoothed quantization: the same codes up to float-order ties."""
    m, k, gs = 21, 172 * 16, 86
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    had = hadamard_factor(k, torch.float32)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(8)).int()
    codes, scales, _ = Q.rrs_quantize(x, had, perm, 4, 0.9, gs)
    ref_codes, ref_scales = ops.smooth_quantize(hadamard_transform(x.double(), had.double()),
                                                4, 0.9, gs, perm, 0)
    assert torch.allclose(scales, ref_scales, rtol=1e-5)
    diff = (codes.int() - ref_codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3


@pytest.mark.parametrize("levels", [0, 16])
def test_native_rows_do_not_depend_on_the_batch(isa, levels):
    """Per-token maxima: a token's output is the same bits alone or in any batch."""
    k, n, gs = 576, 96, 64
    x = _x(37, k, seed=9, dtype=torch.bfloat16)
    w, ws, bias = _weights(n, k, seed=10)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(11)).int()
    had = hadamard_factor(k, torch.float32)
    packed = Q.rrs_repack_weight(w, perm)
    scale = Q.repack_scale(ws) if levels else ws.reshape(-1)

    def run(rows: torch.Tensor) -> torch.Tensor:
        return Q.rrs_linear(rows.contiguous(), had, perm, packed, scale, bias, n, 4, 0.9, gs,
                            levels)

    batch = run(x)
    for i in (0, 5, 36):
        assert torch.equal(run(x[i:i + 1])[0], batch[i])
    assert torch.equal(run(x[3:20]), batch[3:20])


def test_native_ops_refuse_bad_arguments():
    if not cpu_ops.AVAILABLE:
        pytest.skip("native library not built")
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="must divide"):
        Q.rrs_quantize(x, None, None, 4, 1.0, 24)
    with pytest.raises(RuntimeError, match="not a permutation"):
        Q.rrs_quantize(x, None, torch.zeros(64, dtype=torch.int32), 4, 1.0, 16)
    with pytest.raises(RuntimeError, match="4-bit"):
        Q.rrs_repack_weight(torch.full((16, 64), 9, dtype=torch.int8), None)
    with pytest.raises(RuntimeError, match="must stay int8"):
        Q.rrs_quantize(x, None, None, 4, 1.0, 16, 17)
    with pytest.raises(RuntimeError, match="must stay int8"):
        Q.rrs_quantize(x, None, None, 8, 1.0, 16, 2)


@native
def test_native_fake_impls_pass_opcheck():
    k, n, gs = 64, 32, 16
    w, ws, bias = _weights(n, k, seed=12)
    perm = torch.randperm(k).int()
    args = (torch.randn(3, k), hadamard_factor(k, torch.float32), perm,
            Q.rrs_repack_weight(w, perm), ws.reshape(-1), bias, n, 4, 0.9, gs)
    torch.library.opcheck(Q.rrs_linear.default, args)
    torch.library.opcheck(Q.rrs_quantize.default, (torch.randn(3, k), None, perm, 4, 1.0, gs))
    torch.library.opcheck(Q.rrs_quantize.default,
                          (torch.randn(3, k), None, perm, 4, 1.0, gs, 16))
    torch.library.opcheck(Q.rrs_linear.default, (*args[:4], Q.repack_scale(ws), *args[5:], 16))


# ----------------------------------------------------------------------------
# Format


G32 = SmoothSpec(group_size=32)


def _fmt(smooth: SmoothSpec | None = G32, **kw) -> QuaRotFormat:
    act = ActivationSpec(bits=4, clip_ratio=0.9, smooth=smooth)
    base = dict(scheme="w4a4", weight=WeightSpec(bits=4, group_size=-1), activation=act,
                kv_cache=None, rotation=RotationSpec())
    base.update(kw)
    return QuaRotFormat(**base)


def test_format_round_trip():
    fmt = _fmt()
    d = fmt.to_dict()
    assert d["format_version"] == FORMAT_VERSION
    assert d["activation"]["smooth"] == {"method": "runtime", "group_size": 32,
                                         "maxima": "token", "reorder": True,
                                         "factor_levels": 0}
    back = QuaRotFormat.from_dict(json.loads(json.dumps(d)))
    assert back.activation.smooth == fmt.activation.smooth
    d["activation"]["smooth"]["factor_levels"] = 16  # v9: integer factors
    assert QuaRotFormat.from_dict(d).activation.smooth.factor_levels == 16
    d["activation"]["smooth"].pop("factor_levels")  # v7-8 sections: float factors
    d["format_version"] = 7
    assert QuaRotFormat.from_dict(d).activation.smooth.factor_levels == 0
    d["activation"].pop("smooth")  # v1-6 sections: no smoothing
    d["format_version"] = 5
    assert QuaRotFormat.from_dict(d).activation.smooth is None


@pytest.mark.parametrize("smooth,kw,match", [
    (dict(maxima="step"), {}, "maxima 'step' is not served"),
    (dict(method="static"), {}, "method must be one of runtime"),
    (dict(group_size=12), {}, "positive multiple of 8"),
    (dict(factor_levels=1), {}, r"factor_levels must be 0 \(float factors\) or in \[2, 16\]"),
    (dict(factor_levels=32), {}, "factor_levels must be 0"),
    ({}, dict(weight=WeightSpec(bits=4, group_size=64)), "per-output-channel"),
    ({}, dict(tp_blocks=2), "tensor_parallel_blocks 1"),
])
def test_format_refuses_what_the_runtime_does_not_serve(smooth, kw, match):
    with pytest.raises(CheckpointFormatError, match=match):
        _fmt(SmoothSpec(**smooth), **kw)
    d = _fmt(G32).to_dict()  # the same, read from config.json
    d["activation"]["smooth"].update(smooth)
    d.update({"weight": kw["weight"].model_dump()} if "weight" in kw else {})
    d.update({"tensor_parallel_blocks": 2} if "tp_blocks" in kw else {})
    with pytest.raises(CheckpointFormatError, match=match):
        QuaRotFormat.from_dict(d)


def test_format_refuses_a_malformed_smooth_section():
    d = _fmt().to_dict()
    d["activation"]["smooth"] = "runtime"
    with pytest.raises(CheckpointFormatError, match="malformed.*activation.smooth"):
        QuaRotFormat.from_dict(d)
    d["activation"]["smooth"] = {"method": "runtime", "groups": 4}
    with pytest.raises(CheckpointFormatError, match="malformed.*activation.smooth.groups"):
        QuaRotFormat.from_dict(d)
    d["activation"]["smooth"] = {"method": "runtime"}  # the rest defaults
    assert QuaRotFormat.from_dict(d).activation.smooth == SmoothSpec()


def test_format_checks_the_group_against_the_model():
    from types import SimpleNamespace

    cfg = SimpleNamespace(architectures=["LlamaForCausalLM"], hidden_size=192,
                          num_attention_heads=3, head_dim=64, intermediate_size=320)
    _fmt(SmoothSpec(group_size=64)).check_model(cfg)
    with pytest.raises(CheckpointFormatError, match="does not divide the intermediate size"):
        _fmt(SmoothSpec(group_size=96)).check_model(cfg)


@pytest.mark.parametrize("opts,match", [
    (dict(scheme="w4a16"), "has none"),
    (dict(scheme="w8a8"), "has none"),
    (dict(group_size=64), "--group-size -1"),
    (dict(tp=2), "--tp 1"),
    (dict(smooth_group=12), "multiple of 8"),
    (dict(smooth="static"), "--smooth must be one of"),
    (dict(smooth_levels=17), "--smooth-levels must be 0 or in"),
    (dict(scheme="w4a8", smooth_levels=16), "needs 4-bit activations"),
    (dict(weight_method="rtn", calib=None), "need calibration text"),
])
def test_quantizer_options_are_checked(opts, match, shared_data):
    from conftest import TINYSTORIES

    base = dict(scheme="w4a4", smooth="runtime", calib=str(TINYSTORIES))
    base.update(opts)
    with pytest.raises(QuantizeError, match=match):
        check_options(QuantizeOptions(**base))


def test_quantizer_default_levels():
    """--smooth runtime writes integer factors 1..16 at 4-bit activations (the plain
    GEMM) and float factors at 8-bit, where integer ones would be plain per-token."""
    assert QuantizeOptions(scheme="w4a4", smooth="runtime").smooth_factor_levels == 16
    assert QuantizeOptions(scheme="w4a8", smooth="runtime").smooth_factor_levels == 0
    assert QuantizeOptions(scheme="w4a4", smooth="runtime",
                           smooth_levels=0).smooth_factor_levels == 0


def test_platforms_without_a_kernel_are_refused_in_the_calling_process(monkeypatch):
    from vllm.platforms import current_platform

    from vllm_quarot.runtime import config
    from vllm_quarot.runtime.ops import triton as triton_ops

    config._check_smoothing_platform(_fmt())  # CPU: served
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(triton_ops, "AVAILABLE", True)
    config._check_smoothing_platform(_fmt())  # CUDA + triton, group 32: the Triton kernels
    with pytest.raises(CheckpointFormatError, match="--smooth-group 64"):
        config._check_smoothing_platform(_fmt(SmoothSpec(group_size=96)))
    monkeypatch.setattr(triton_ops, "AVAILABLE", False)
    with pytest.raises(CheckpointFormatError, match="only on CUDA GPUs with triton"):
        config._check_smoothing_platform(_fmt())
    monkeypatch.setattr(current_platform, "is_cuda", lambda: False)  # e.g. ROCm, XPU
    with pytest.raises(CheckpointFormatError, match="activation.smooth"):
        config._check_smoothing_platform(_fmt())
    config._check_smoothing_platform(_fmt(None))  # no smoothing: nothing to refuse


# ----------------------------------------------------------------------------
# The Triton kernels (GPUs; here under TRITON_INTERPRET=1), bit for bit


def _triton():
    from vllm_quarot.runtime.ops import triton as triton_ops

    if not triton_ops.usable(torch.device("cpu")):
        pytest.skip("triton is not installed or TRITON_INTERPRET is not set")
    return triton_ops


@pytest.mark.parametrize("m,k,gs", [(1, 64, 16), (5, 192, 64), (19, 256, 128)])
@pytest.mark.parametrize("reorder", [False, True])
def test_triton_smooth_quantize_equals_reference(m, k, gs, reorder):
    t = _triton()
    x = _x(m, k, seed=m + gs, dtype=torch.bfloat16)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(gs)).int() if reorder \
        else None
    for bits, clip in ((4, 0.9), (8, 1.0)):
        for levels in ((0, 16, 5) if bits == 4 else (0, 1)):
            codes, scales = t.smooth_quantize_impl(x, bits, clip, gs, perm, levels)
            ref_codes, ref_scales = ops.smooth_quantize(x, bits, clip, gs, perm, levels)
            assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("m,k,n,gs", [(1, 64, 48, 32), (20, 192, 70, 64), (33, 256, 40, 128)])
def test_triton_smooth_gemm_equals_reference(m, k, n, gs):
    t = _triton()
    x = _x(m, k, seed=n)
    w, ws, bias = _weights(n, k, seed=m)
    codes, scales = ops.smooth_quantize(x, 4, 0.9, gs, None, 0)
    packed = t.repack_weight(w, 4)
    for out_dtype in (torch.float32, torch.bfloat16):
        for b in (bias, None):
            out = t.smooth_gemm_impl(codes, scales, packed, ws.reshape(-1), b, out_dtype)
            ref = ops.smooth_int_linear(codes, scales, w, ws, b, out_dtype)
            assert torch.equal(out, ref)


# ----------------------------------------------------------------------------
# The linear method: scheme, kernel choice, loading


@pytest.fixture(scope="module")
def single_process_group():
    """vLLM's parameters ask for their tensor-parallel rank: a world of one."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        cleanup_dist_env_and_memory,
        init_distributed_environment,
        initialize_model_parallel,
    )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield
        cleanup_dist_env_and_memory()


def _layer(fmt: QuaRotFormat, kernel: type | None, monkeypatch, perm: torch.Tensor | None,
           online: bool = True, n: int = 40, k: int = 320, shards: int = 1):
    from vllm_quarot.runtime import linear_method as lm
    from vllm_quarot.runtime.kernels import choose_kernel
    from vllm_quarot.runtime.schemes import scheme_for
    from vllm_quarot.runtime.transform import HadamardTransform

    monkeypatch.setattr(lm, "choose_kernel", choose_kernel if kernel is None
                        else lambda c: kernel)
    fmt = fmt.replace(rotation=RotationSpec(r4=OnlineHadamard.of_size(k)))
    transform = HadamardTransform(fmt.rotation.r4) if online else None
    method = lm.QuaRotLinearMethod(scheme_for(fmt), transform, "model.layers.0.mlp.down_proj")
    layer = torch.nn.Module()
    sizes = [n // shards] * shards
    method.create_weights(layer, k, sizes, k, n, torch.float32,
                          weight_loader=lambda p, w, *a: p.data.copy_(w))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    codes, scale = quantize_weight_rtn(w, 4, -1)
    for name, t in (("weight_packed", pack_weight(codes, 4)), ("weight_scale", scale)):
        p = getattr(layer, name)
        for _ in range(shards):
            p.weight_loader(p, t)
    if perm is not None:
        for _ in range(shards):
            layer.smooth_perm.weight_loader(layer.smooth_perm, perm, 0)
    method.process_weights_after_loading(layer)
    return method, layer


@pytest.mark.parametrize("kernel", ["native", "triton"])
@pytest.mark.parametrize("reorder", [False, True])
@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("levels", [0, 16])
def test_linear_method_kernels_equal_reference(single_process_group, monkeypatch, kernel,
                                               reorder, online, levels):
    from vllm_quarot.runtime.kernels import (
        NativeCPURRSKernel,
        ReferenceRRSKernel,
        TritonRRSKernel,
    )

    if kernel == "native" and not cpu_ops.AVAILABLE:
        pytest.skip("native library not built")
    if kernel == "triton":
        _triton()
    cls = NativeCPURRSKernel if kernel == "native" else TritonRRSKernel
    fmt = _fmt(SmoothSpec(group_size=32, reorder=reorder, factor_levels=levels))
    perm = torch.randperm(320, generator=torch.Generator().manual_seed(3)).int() if reorder \
        else None
    ref_m, ref_l = _layer(fmt, ReferenceRRSKernel, monkeypatch, perm, online)
    assert ref_m.kernel.config.smooth_levels == levels
    out_m, out_l = _layer(fmt, None if kernel == "native" else cls, monkeypatch, perm, online)
    assert type(out_m.kernel) is cls
    x = torch.randn(6, 320, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(40)
    ref, out = ref_m.apply(ref_l, x, bias), out_m.apply(out_l, x, bias)
    if online and cls.fuses_hadamard:  # the Hadamard in another float order: a tie may
        # move one code
        assert torch.allclose(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    else:
        assert torch.equal(out, ref)


def test_kernel_choice_for_smoothed_layers(single_process_group, monkeypatch, caplog):
    from vllm_quarot import envs
    from vllm_quarot.runtime.kernels import (
        LinearConfig,
        NativeCPURRSKernel,
        ReferenceRRSKernel,
        choose_kernel,
    )

    c = LinearConfig(4, -1, 4, 0.9, False, 320, 40, torch.bfloat16, 0, "cpu", 32, True)
    plain = dataclasses.replace(c, smooth_group=0, smooth_reorder=False)
    assert "RRS g32 reordered" in c.describe()
    assert "int factors 1..16" in dataclasses.replace(c, smooth_levels=16).describe()
    if cpu_ops.AVAILABLE:
        assert choose_kernel(c) is NativeCPURRSKernel
    # a plain layer never gets an RRS kernel, a smoothed one never a plain kernel
    assert not choose_kernel(plain).smoothing
    monkeypatch.setattr(envs, "VLLM_QUAROT_DISABLED_KERNELS",
                        ["NativeCPURRSKernel", "TritonRRSKernel"])
    assert choose_kernel(c) is ReferenceRRSKernel
    with pytest.raises(ValueError, match="no QuaRot kernel"):
        choose_kernel(dataclasses.replace(c, device_type="cuda"))


def test_a_bad_channel_order_is_refused(single_process_group, monkeypatch):
    fmt = _fmt(SmoothSpec(group_size=32))
    with pytest.raises(CheckpointFormatError, match="not a permutation"):
        _layer(fmt, None, monkeypatch, torch.zeros(320, dtype=torch.int32))
    with pytest.raises(CheckpointFormatError, match="smooth_perm: missing"):
        _layer(fmt, None, monkeypatch, None)
    perm = torch.randperm(320).int()
    with pytest.raises(CheckpointFormatError, match="store different channel orders"):
        from vllm_quarot.runtime.schemes.rrs import _perm_loader

        p = torch.nn.Parameter(torch.zeros(320, dtype=torch.int32), requires_grad=False)
        load = _perm_loader("model.layers.0.self_attn.qkv_proj")
        load(p, perm, "q")
        load(p, perm.flip(0), "k")


# ----------------------------------------------------------------------------
# Quantizer, simulation and vLLM end to end


# --kv-clip: see conftest.RANDOM_MODEL_KV_CLIP (as conftest's quarot_w4a4kv4)
RRS_OPTIONS = dict(scheme="w4a4kv4", nsamples=8, seqlen=128, kv_clip=RANDOM_MODEL_KV_CLIP)


@pytest.fixture(scope="module")
def rrs_ckpt(tmp_path_factory, random_llama) -> Path:
    """A W4A4KV4 GPTQ checkpoint of the random Llama with --smooth runtime (groups of 32,
    channels reordered by their calibration maxima)."""
    from conftest import TINYSTORIES

    from vllm_quarot.offline.quantize import quantize

    out = tmp_path_factory.mktemp("ckpt") / "llama-w4a4kv4-rrs"
    quantize(random_llama, out, QuantizeOptions(
        **RRS_OPTIONS, calib=str(TINYSTORIES), smooth="runtime", smooth_group=32))
    return out


def test_smoothing_changes_no_weight(rrs_ckpt, random_llama, tmp_path):
    """GPTQ's Hessians, the clip search and the KV calibration see 16-bit activations:
    --smooth runtime adds the channel orders and the format field, nothing else (what
    benchmarks/accuracy.py's rows without RRS rely on). --smooth runs with the fused R1
    (--r1 auto picks it there), so the plain checkpoint is made with --r1 fused."""
    from conftest import TINYSTORIES

    from vllm_quarot.offline.checkpoint import TensorSource
    from vllm_quarot.offline.quantize import quantize

    plain = tmp_path / "plain"  # the same options without --smooth
    quantize(random_llama, plain, QuantizeOptions(**RRS_OPTIONS, calib=str(TINYSTORIES),
                                                  r1="fused"))
    a, b = TensorSource(rrs_ckpt), TensorSource(plain)
    names = set(a.keys())
    assert {n for n in names if not n.endswith(".smooth_perm")} == set(b.keys())
    assert len(names) - len(set(b.keys())) == 2 * 7  # every linear of the 2 layers
    for n in b.keys():
        assert torch.equal(a.get(n), b.get(n)), n
    qa = json.loads((rrs_ckpt / "config.json").read_text())["quantization_config"]
    qb = json.loads((plain / "config.json").read_text())["quantization_config"]
    assert qa["activation"].pop("smooth") is not None and qb["activation"].pop("smooth") is None
    qa["quantizer"].pop("source"), qb["quantizer"].pop("source")
    assert qa == qb


def test_quantizer_writes_the_channel_orders(rrs_ckpt):
    from vllm_quarot.offline.checkpoint import TensorSource
    from vllm_quarot.validate import validate_checkpoint

    cfg = json.loads((rrs_ckpt / "config.json").read_text())
    fmt = QuaRotFormat.from_dict(cfg["quantization_config"])
    assert fmt.activation.smooth == SmoothSpec(method="runtime", group_size=32, maxima="token",
                                             reorder=True, factor_levels=16)
    src = TensorSource(rrs_ckpt)
    p = "model.layers.1."
    perms = {n: src.get(f"{p}{n}.smooth_perm") for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    for name, perm in perms.items():
        assert perm.dtype == torch.int32
        assert torch.equal(perm.sort().values, torch.arange(perm.numel(), dtype=torch.int32))
        assert not torch.equal(perm, torch.arange(perm.numel(), dtype=torch.int32)), name
    assert torch.equal(perms["self_attn.q_proj"], perms["self_attn.v_proj"])
    assert torch.equal(perms["mlp.gate_proj"], perms["mlp.up_proj"])
    assert perms["mlp.down_proj"].numel() == 320
    from transformers import AutoConfig

    validate_checkpoint(rrs_ckpt, fmt, AutoConfig.from_pretrained(rrs_ckpt))


def test_a_checkpoint_without_its_channel_orders_is_refused(rrs_ckpt, tmp_path):
    """validate.py: the smooth_perm tensors are required (and foreign ones refused)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from vllm_quarot.validate import validate_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(rrs_ckpt, bad)
    t = load_file(bad / "model.safetensors")
    del t["model.layers.0.mlp.down_proj.smooth_perm"]
    save_file(t, bad / "model.safetensors")
    fmt = QuaRotFormat.from_dict(json.loads((bad / "config.json").read_text())[
        "quantization_config"])
    with pytest.raises(CheckpointFormatError, match="down_proj.smooth_perm is missing"):
        validate_checkpoint(bad, fmt, AutoConfig.from_pretrained(bad))
    plain = fmt.replace(activation=fmt.activation.model_copy(update={"smooth": None}))
    with pytest.raises(CheckpointFormatError, match="channel orders belong"):
        validate_checkpoint(bad, plain, AutoConfig.from_pretrained(bad))


def test_simulation_applies_the_smoothing(rrs_ckpt):
    """The simulation's linear inputs are fake_smooth_quantize's (after R4 on down_proj)."""
    from vllm_quarot.eval.simulate import load_simulated
    from vllm_quarot.offline.checkpoint import TensorSource

    sim = load_simulated(rrs_ckpt)
    seen, raw = {}, {}
    mod = sim.get_submodule("model.layers.0.self_attn.o_proj")
    # after the simulation's hook, and before it (prepended): the raw input
    mod.register_forward_pre_hook(lambda _m, a: seen.setdefault("in", a[0]))
    mod.register_forward_pre_hook(lambda _m, a: raw.setdefault("x", a[0].clone()),
                                  prepend=True)
    with torch.no_grad():
        sim(torch.tensor([[1, 20, 30, 40, 50]]))
    perm = TensorSource(rrs_ckpt).get("model.layers.0.self_attn.o_proj.smooth_perm")
    want = fake_smooth_quantize(raw["x"], 4, 0.9, 32, perm.long(), 16)
    assert torch.equal(seen["in"], want)


def test_fused_family_stores_one_order_per_input(tmp_path, shared_data):
    """Phi-3 (fused qkv_proj, gate_up_proj): one smooth_perm per fused linear, the
    checkpoint validates, and the simulation smooths the fused module's input."""
    from conftest import TINYSTORIES
    from transformers import AutoConfig

    from vllm_quarot.eval.simulate import load_simulated
    from vllm_quarot.eval.zoo import make_random_model
    from vllm_quarot.offline.checkpoint import TensorSource
    from vllm_quarot.offline.quantize import quantize
    from vllm_quarot.validate import validate_checkpoint

    src = make_random_model(tmp_path / "phi3", "phi3")
    out = tmp_path / "q"
    quantize(src, out, QuantizeOptions(scheme="w4a4", weight_method="rtn", nsamples=2,
                                       seqlen=64, calib=str(TINYSTORIES), smooth="runtime",
                                       smooth_group=32))
    fmt = QuaRotFormat.from_dict(json.loads((out / "config.json").read_text())[
        "quantization_config"])
    validate_checkpoint(out, fmt, AutoConfig.from_pretrained(out))
    t = TensorSource(out)
    perms = sorted(n for n in t.keys() if n.startswith("model.layers.0.")
                   and n.endswith(".smooth_perm"))
    assert perms == [f"model.layers.0.{n}.smooth_perm" for n in (
        "mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj")]
    sim = load_simulated(out)
    seen, raw = {}, {}
    mod = sim.get_submodule("model.layers.0.self_attn.qkv_proj")
    mod.register_forward_pre_hook(lambda _m, a: seen.setdefault("in", a[0]))
    mod.register_forward_pre_hook(lambda _m, a: raw.setdefault("x", a[0].clone()),
                                  prepend=True)
    with torch.no_grad():
        sim(torch.tensor([[1, 20, 30, 40, 50]]))
    perm = t.get("model.layers.0.self_attn.qkv_proj.smooth_perm").long()
    assert torch.equal(seen["in"], fake_smooth_quantize(raw["x"], 4, 0.9, 32, perm, 16))


@pytest.mark.vllm
def test_vllm_matches_simulation_whatever_the_batch(engine, rrs_ckpt):
    """One engine (prefill chunks of 32 tokens): the native CPU RRS kernels inside vLLM
    give the simulation's tokens and prompt log-probs, and, the maxima being per token,
    the same prompts batched together (packed into shared steps) or sent one at a time
    (the long one prefilled in two chunks) give the same tokens and log-probs. The
    reference RRS kernel is checked against the native one layer by layer above."""
    from test_vllm_e2e import KV4_ENGINE, LONG_PREFIX, PROMPTS, simulate

    prompts = PROMPTS + [LONG_PREFIX + " Lily"]
    llm = engine(rrs_ckpt, *KV4_ENGINE)
    batched = llm.run(prompts)
    assert len(batched["results"][-1]["prompt_token_ids"]) > 32
    if cpu_ops.AVAILABLE:
        assert f"run on native CPU RRS kernels ({cpu_ops.isa()})" in batched["log"]
    simulate(rrs_ckpt, batched["results"])
    alone = llm.run(prompts, sequential=True)["results"]
    for a, b in zip(alone, batched["results"], strict=True):
        assert a["token_ids"] == b["token_ids"]
        for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:], strict=True):
            assert abs(x - y) < 1e-4


# The smoothing kernels compiled for NVIDIA GPUs without one (tests/triton_compile.py's
# compile_for, in a subprocess outside the interpreter): tensor-core integer dots, no
# spills, shared memory within the device's.
_COMPILE = r"""
import json, torch
import triton_compile as tc  # tests/ is on the child's PYTHONPATH
from vllm_quarot.runtime.ops import triton as tk
for m in (1, 2048):
    for gs in (64, 128):
        meta = tk.smooth_gemm_meta(m, gs, True, torch.bfloat16)
        types = {"a_ptr": "*i8", "a_scale_ptr": "*fp32", "w_ptr": "*i8",
                 "w_scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
        types |= dict.fromkeys(["M", "N", "K", "stride_a", "stride_as", "stride_w",
                                "stride_o"], "i32")
        for cc in tc.CCS:
            r = tc.compile_for(tk._smooth_gemm_kernel, types, meta, cc)
            mma = [x for x in r.pop("ptx").splitlines() if "mma" in x and "s32.s8.s8" in x]
            print(json.dumps({"case": f"gemm-m{m}-g{gs}", "cc": cc, "mma": len(mma), **r}))
types = {"x_ptr": "*bf16", "perm_ptr": "*i32", "codes_ptr": "*i8", "scale_ptr": "*fp32",
         "K": "i32", "stride_x": "i32", "stride_c": "i32", "stride_s": "i32", "mult": "fp32"}
for levels in (0, 16):
    meta = {"qmax": 7, "GS": 64, "PERM": True, "LEVELS": levels, "num_warps": 4}
    for cc in tc.CCS:
        r = tc.compile_for(tk._smooth_quantize_kernel, types, meta, cc)
        r.pop("ptx")
        print(json.dumps({"case": f"quantize-g64-l{levels}", "cc": cc, "mma": 0, **r}))
"""


def test_triton_kernels_compile_for_gpus():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).parents[1]
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root / "tests"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                          env=env, cwd=root, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from triton_compile import SMEM_LIMIT

    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 18
    for r in rows:
        assert r["local"] == 0 and r["stack"] == 0, r  # no spills
        assert r["shared"] <= SMEM_LIMIT[r["cc"]], r
        if r["case"].startswith("gemm"):
            assert r["mma"] > 0, r  # int8 tensor-core dots (mma.sync / wgmma)
