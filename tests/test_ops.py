"""Runtime ops against float64 references on random (never zero) inputs, ragged
shapes included, plus torch.library's op checks (fake impls, schemas)."""

from __future__ import annotations

import pytest
import torch

import vllm_quarot.runtime.ops.reference  # noqa: F401
from vllm_quarot.hadamard import hadamard_factor, hadamard_matrix
from vllm_quarot.quant import pack_weight, qmax, quantize_weight_rtn, unpack_weight

SHAPES = [(1, 64, 32), (3, 192, 40), (17, 320, 72), (33, 576, 100)]  # (M, K, N)


def _ref_quant(x: torch.Tensor, bits: int, clip: float):
    x = x.double()
    s = x.abs().amax(-1, keepdim=True) * clip / qmax(bits)
    q = torch.clamp(torch.round(x / s), -qmax(bits) - 1, qmax(bits))
    return q, s


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_per_token(m, k, n, bits):
    x = torch.randn(m, k) * torch.rand(m, 1) * 10
    q, s = torch.ops.quarot.quantize_per_token(x, bits, 0.9)
    q_ref, s_ref = _ref_quant(x, bits, 0.9)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.allclose(s.double(), s_ref, rtol=1e-6)
    # codes agree except where float32 vs float64 division lands on a .5 boundary
    assert (q.double() - q_ref).abs().max() <= 1
    assert (q.double() != q_ref).float().mean() < 1e-3
    assert q.min() >= -qmax(bits) - 1 and q.max() <= qmax(bits)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_linear_matches_float64(m, k, n, groups, dtype):
    xq = torch.randint(-8, 8, (m, k), dtype=torch.int8)
    xs = torch.rand(m, 1) + 0.1
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    ws = torch.rand(n, groups) + 0.1
    bias = torch.randn(n)
    out = torch.ops.quarot.int_linear(xq, xs, wq, ws, bias, dtype)
    w = (wq.double().reshape(n, groups, -1) * ws.double().unsqueeze(-1)).reshape(n, k)
    ref = (xq.double() * xs.double()) @ w.t() + bias.double()
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_wna16_linear_matches_float64(m, k, n):
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    q, s = quantize_weight_rtn(w, 4, 32 if k % 32 == 0 else -1)
    out = torch.ops.quarot.wna16_linear(x, q, s, None)
    gs = k // s.shape[1]
    ref = x.double() @ (q.double().reshape(n, -1, gs) * s.double().unsqueeze(-1)).reshape(n, k).t()
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [64, 172, 320, 576, 1536])
def test_hadamard_op_matches_dense(n):
    x = torch.randn(5, n)
    out = torch.ops.quarot.hadamard(x, hadamard_factor(n))
    ref = x.double() @ hadamard_matrix(n)
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("k", [64, 100, 576])
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_roundtrip(k, bits):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (9, k), dtype=torch.int8)
    packed = pack_weight(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (9, -(-k * bits // 32))
    assert torch.equal(unpack_weight(packed, bits, k), q)


def test_opcheck_fake_impls():
    x = torch.randn(6, 64)
    torch.library.opcheck(torch.ops.quarot.hadamard.default, (x, hadamard_factor(64)))
    torch.library.opcheck(torch.ops.quarot.quantize_per_token.default, (x, 4, 0.9))
    xq = torch.randint(-8, 8, (6, 64), dtype=torch.int8)
    wq = torch.randint(-8, 8, (24, 64), dtype=torch.int8)
    torch.library.opcheck(
        torch.ops.quarot.int_linear.default,
        (xq, torch.rand(6, 1), wq, torch.rand(24, 1), torch.randn(24), torch.float32),
    )
    torch.library.opcheck(
        torch.ops.quarot.wna16_linear.default, (x, wq, torch.rand(24, 2), None)
    )


def test_compiled_chain_equals_eager():
    """The op chain of a down_proj under torch.compile (what vLLM traces)."""
    had = hadamard_factor(320)
    wq = torch.randint(-8, 8, (48, 320), dtype=torch.int8)
    ws = torch.rand(48, 1) + 0.1

    def f(x):
        x = torch.ops.quarot.hadamard(x, had)
        q, s = torch.ops.quarot.quantize_per_token(x, 4, 0.9)
        return torch.ops.quarot.int_linear(q, s, wq, ws, None, x.dtype)

    compiled = torch.compile(f, dynamic=True)
    for m in (1, 7, 33):
        x = torch.randn(m, 320)
        assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize(("n", "k", "gs"), [(300, 64, -1), (130, 128, 32), (5, 48, 16)])
def test_clip_search_matches_a_plain_per_row_search(n, k, gs):
    """search_clip_scales (blocked over rows) = the plain search of QuaRot's quantizer,
    row by row: shrink 1 − i/100 for i < 80, least Σ|w − ŵ|^2.4."""
    from vllm_quarot.quant import search_clip_scales

    torch.manual_seed(n)
    w = torch.randn(n, k) * torch.rand(n, 1) + 0.1 * torch.randn(n, k) ** 3
    got = search_clip_scales(w, 4, gs)
    groups = w.reshape(n, -1, k if gs == -1 else gs)
    for r in range(n):
        for j in range(groups.shape[1]):
            x = groups[r, j]
            errs = []
            for i in range(80):
                s = max(x.abs().max().item() * (1 - i / 100) / 7, 1e-8)
                q = torch.clamp(torch.round(x / s), -8, 7)
                errs.append(((q * s - x).abs() ** 2.4).sum().item())
            best = min(range(80), key=lambda i: (errs[i], i))
            want = max(x.abs().max().item() * (1 - best / 100) / 7, 1e-8)
            assert got[r, j].item() == pytest.approx(want, rel=1e-6), (r, j)
