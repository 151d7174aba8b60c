"""KV4 cache layout and attention over it, against float64 references on random
inputs: paged blocks, GQA, chunked queries (a query chunk at the end of a longer
context), several sequences in one batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_quarot.format import OnlineHadamard
from vllm_quarot.hadamard import hadamard_factor, hadamard_matrix
from vllm_quarot.quant import fake_quantize_asym
from vllm_quarot.runtime.kv_attention import (
    KV4_DTYPE,
    QuaRotCPUAttentionImpl,
    pack_kv,
    pivot_tail,
    pivot_tail_bytes,
    slot_bytes,
    token_positions,
    unpack_kv,
)
from vllm_quarot.runtime.ops import cpu as cpu_ops


@pytest.mark.parametrize("d", [8, 64, 128])
def test_pack_unpack_is_the_asymmetric_4bit_quantizer(d):
    torch.manual_seed(d)
    x = torch.randn(7, 3, d) * torch.rand(7, 3, 1) * 5 + torch.randn(7, 3, 1)
    b = pack_kv(x, 0.95)
    assert b.dtype == torch.uint8 and b.shape == (7, 3, d // 2 + 4)
    assert 2 * b.shape[-1] == slot_bytes(d)
    y = unpack_kv(b, d)
    assert torch.equal(y, fake_quantize_asym(x, 4, 0.95).float())
    # without clipping every element is within half a step of the original, plus what
    # the float16 scale and zero point lose: ~2^-11 of the token's magnitude (a token
    # whose range is tiny next to its offset has a zero point in the thousands)
    y1 = unpack_kv(pack_kv(x, 1.0), d)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
    fp16 = 2.0**-10 * x.abs().amax(-1, keepdim=True)
    assert ((y1 - x).abs() <= step * 0.5 + 1e-3 * step + fp16 + 1e-4).all()


def test_near_constant_vectors_stay_finite():
    """A key/value vector whose range is tiny next to its offset: the zero point would
    overflow float16 (inf, then -inf values, NaN attention) without the scale's floor of
    max|x| / 1024; with it the error is at most ~2^-11 of the magnitude."""
    x = torch.full((2, 1, 64), -1.0)
    x[0, 0, 0] += 1e-5
    x[1, 0] = 3.0 + torch.linspace(0, 1e-3, 64)
    y = unpack_kv(pack_kv(x, 1.0), 64)
    assert torch.isfinite(y).all()
    assert ((y - x).abs() <= 2.0**-10 * x.abs().amax(-1, keepdim=True)).all()


# "reference" = the PyTorch code; "native-<isa>" = csrc/cpu/kv4_attention.cpp on that path
PATHS = ["reference"] + [f"native-{isa}" for isa in cpu_ops.supported_isas()]


@pytest.fixture(params=PATHS)
def path(request):
    if request.param == "reference":
        yield request.param
        return
    previous = cpu_ops.set_isa(request.param.removeprefix("native-"))
    yield request.param
    cpu_ops.set_isa(previous)


def _impl(r3: bool, heads=4, kv_heads=2, d=64, path="reference"):
    """The KV4 paths of the impl, without a vLLM engine around it (its __init__ reads
    the engine's config; the end-to-end tests cover that part)."""
    impl = QuaRotCPUAttentionImpl.__new__(QuaRotCPUAttentionImpl)
    impl.num_heads, impl.head_size, impl.num_kv_heads = heads, d, kv_heads
    impl.scale, impl.kv_cache_dtype, impl.kv4, impl.clip_ratio = d**-0.5, KV4_DTYPE, True, 1.0
    impl.had = hadamard_factor(d, torch.float32) if r3 else None
    impl.native = path != "reference"
    impl.layer_ready, impl.k_shift, impl.v_shift, impl.v_shift_heads = True, None, None, None
    impl.pivots = 0
    return impl


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("r3", [False, True])
def test_attention_over_paged_kv4_matches_float64(r3, d, path):
    torch.manual_seed(0)
    heads, kv_heads, bs = 4, 2, 16
    impl = _impl(r3, heads, kv_heads, d, path)
    num_blocks = 12
    cache = torch.zeros(num_blocks, kv_heads, bs, slot_bytes(d), dtype=torch.uint8)
    # two sequences: 37 tokens of context (last 5 are this step's queries: chunked
    # prefill), and 20 tokens with a single decode query; blocks scattered
    seq_lens, q_lens = [37, 20], [5, 1]
    tables = [[7, 2, 9], [4, 11]]
    ks = [torch.randn(n, kv_heads, d) for n in seq_lens]
    vs = [torch.randn(n, kv_heads, d) for n in seq_lens]
    for k, v, table in zip(ks, vs, tables, strict=True):
        slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(k.shape[0])])
        impl.do_kv_cache_update(None, k, v, cache, torch.cat([slots, torch.tensor([-1])])[:-1])
    q = torch.randn(sum(q_lens), heads, d)
    meta = SimpleNamespace(
        query_start_loc=torch.tensor([0, 5, 6]), seq_lens=torch.tensor(seq_lens),
        block_table=torch.tensor([[7, 2, 9], [4, 11, 0]]), causal=True)
    out = torch.empty(sum(q_lens), heads, d)
    impl.forward(None, q, None, None, cache, meta, out)

    h = hadamard_matrix(d) if r3 else torch.eye(d, dtype=torch.float64)
    start = 0
    for k, v, n, tq in zip(ks, vs, seq_lens, q_lens, strict=True):
        kq = fake_quantize_asym((k.double() @ h).float(), 4, 1.0).double()
        vq = fake_quantize_asym(v, 4, 1.0).double()
        qq = q[start : start + tq].double() @ h
        for hd in range(heads):
            g = hd // (heads // kv_heads)
            s = qq[:, hd] @ kq[:, g].t() / math.sqrt(d)
            pos = torch.arange(n - tq, n).unsqueeze(1)
            s = s.masked_fill(torch.arange(n).unsqueeze(0) > pos, float("-inf"))
            ref = torch.softmax(s, -1) @ vq[:, g]
            assert torch.allclose(out[start : start + tq, hd].double(), ref, atol=1e-4)
        start += tq


@pytest.mark.skipif(not cpu_ops.AVAILABLE, reason="native kernels not built")
@pytest.mark.parametrize("r3", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_cache_bytes_equal_the_reference(r3, dtype):
    """The C++ writer stores exactly the reference's bytes (with R3, float-order ties of
    the rotated key may move a code by one step)."""
    torch.manual_seed(1)
    caches = []
    k, v = (torch.randn(40, 2, 64, dtype=dtype) * 3 for _ in range(2))
    # near-constant vectors: the scale's floor (max|x| / 1024) keeps their zero point finite
    k[0, 0], v[1, 1] = -1.0, 3.0 + torch.linspace(0, 1e-5, 64).to(dtype)
    k[0, 0, 0] = -1.0 + 2.0**-7
    slots = torch.randperm(64)[:40]
    for native in (False, True):
        cache = torch.zeros(4, 2, 16, slot_bytes(64), dtype=torch.uint8)
        impl = _impl(r3, path="native" if native else "reference")
        impl.clip_ratio = 0.95
        impl.do_kv_cache_update(None, k, v, cache, slots)
        caches.append(cache)
    assert all(torch.isfinite(unpack_kv(c, 64)).all() for c in caches)
    if not r3:
        assert torch.equal(caches[0], caches[1])
    else:
        a, b = (unpack_kv(c, 64) for c in caches)
        step = (a.amax(-1, keepdim=True) - a.amin(-1, keepdim=True)) / 15
        assert ((a - b).abs() <= step * 1.01).all()
        assert ((a - b).abs() > 1e-6).float().mean() < 2e-3


def test_kv_cache_update_skips_padding_slots(path):
    impl = _impl(False, path=path)
    cache = torch.zeros(2, 2, 16, slot_bytes(64), dtype=torch.uint8)
    k = torch.randn(3, 2, 64)
    impl.do_kv_cache_update(None, k, k, cache, torch.tensor([0, -1, 17]))
    assert cache[0, :, 0].any() and cache[1, :, 1].any()
    assert not cache[0, :, 1:].any() and not cache[1, :, 2:].any()


@pytest.mark.parametrize("r3", [False, True])
def test_shifted_keys_and_values(r3, path):
    """kv_cache.shift: keys with a massive constant component (Qwen2's k_proj biases)
    are stored minus the layer's shift, values too, and the value shift is added back
    to the output: the result is attention over the shifted, quantized cache, and it
    is far closer to exact attention than the unshifted cache (the constant moves all
    of a query's scores alike)."""
    torch.manual_seed(2)
    heads, kv_heads, d, bs, n = 4, 2, 64, 16, 40
    big = torch.zeros(kv_heads, d)
    big[:, [31, 63]] = torch.tensor([[120.0, -80.0], [-150.0, 60.0]])
    k = torch.randn(n, kv_heads, d) + big
    v = torch.randn(n, kv_heads, d) + 5.0
    q = torch.randn(1, heads, d)
    q[..., [31, 63]] += 2.0
    k_shift, v_shift = big + 0.1 * torch.randn(kv_heads, d), torch.full((kv_heads, d), 5.0)
    meta = SimpleNamespace(query_start_loc=torch.tensor([0, 1]), seq_lens=torch.tensor([n]),
                           block_table=torch.tensor([[0, 1, 2]]), causal=True,
                           num_actual_tokens=1)
    h = hadamard_matrix(d) if r3 else torch.eye(d, dtype=torch.float64)
    group = heads // kv_heads

    def exact(kk, vv, qq):
        s = torch.einsum("hd,nhd->hn", qq[0].double(), kk.double().repeat_interleave(group, 1))
        return torch.einsum("hn,nhd->hd", torch.softmax(s / math.sqrt(d), -1),
                            vv.double().repeat_interleave(group, 1))

    outs = {}
    for shifted in (False, True):
        impl = _impl(r3, heads, kv_heads, d, path)
        if shifted:  # as the engine sets it up: the layer's shifts, on its first call
            impl.layer_ready, impl.had, impl.tp = False, None, (0, 1)
            impl.r3 = OnlineHadamard.of_size(d) if r3 else None
            impl.shifts = {0: (k_shift, v_shift)}
        cache = torch.zeros(3, kv_heads, bs, slot_bytes(d), dtype=torch.uint8)
        layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
        impl.do_kv_cache_update(layer, k, v, cache, torch.arange(n))
        out = torch.empty(1, heads, d)
        impl.forward(layer, q, None, None, cache, meta, out)
        outs[shifted] = out[0].double()
    kq = fake_quantize_asym(((k - k_shift).double() @ h).float(), 4, 1.0)
    vq = fake_quantize_asym(v - v_shift, 4, 1.0)
    want = exact(kq, vq + v_shift, (q.double() @ h).float())
    assert torch.allclose(outs[True], want, atol=1e-3), (outs[True] - want).abs().max()
    ref = exact(k, v, q)
    err = {s: ((o - ref).norm() / ref.norm()).item() for s, o in outs.items()}
    assert err[True] < err[False] / 4, err


# ------------------------------------------------------------ pivots (kv_cache.pivots)


def _padded_cache(num_blocks: int, kv_heads: int, bs: int, d: int, pivots: int) -> torch.Tensor:
    """A KV4 cache as vLLM lays it out with pivots: [blocks, kv heads, block, bytes] views
    of pages padded by the pivots' float16 tail (block stride > the codes' bytes)."""
    page = kv_heads * bs * slot_bytes(d) + pivot_tail_bytes(kv_heads, d, pivots)
    raw = torch.zeros(num_blocks * page + 64, dtype=torch.uint8)[32:]  # an offset storage
    return torch.as_strided(raw, (num_blocks, kv_heads, bs, slot_bytes(d)),
                            (page, bs * slot_bytes(d), slot_bytes(d), 1))


def test_token_positions():
    """Positions of a step's query tokens: a chunk at the end of a longer context, a
    decode token, a whole prompt, and padding after the last."""
    pos = token_positions(torch.tensor([0, 3, 4, 9]), torch.tensor([10, 7, 5]), 11)
    assert pos.tolist() == [7, 8, 9, 6, 0, 1, 2, 3, 4, -1, -1]


def _write(impl, cache, k, v, pos_from, table, bs, seq_len):
    """Write tokens pos_from..pos_from+len(k) of one sequence, as one prefill chunk."""
    n = k.shape[0]
    slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(pos_from, pos_from + n)])
    meta = SimpleNamespace(query_start_loc=torch.tensor([0, n]), seq_lens=torch.tensor([seq_len]))
    impl._metadata = lambda _layer: meta
    impl.do_kv_cache_update(None, k, v, cache, slots)


@pytest.mark.parametrize("r3", [False, True])
def test_pivots_stay_exact_through_chunks_and_a_shared_first_block(r3, path):
    """kv_cache.pivots = 2: the first two tokens of each sequence keep float16 keys and
    values (after R3) in the tail of their first block, written by the prefill chunk
    that holds them; attention reads them there. Sequence A is prefilled in two chunks
    (20 + 17 tokens); sequence B shares A's first block (a prefix-cache hit: its first
    16 tokens are not written again) and prefills 7 more. Both attend as float64
    attention over exact pivots and 4-bit codes for the rest."""
    torch.manual_seed(3)
    heads, kv_heads, d, bs, pivots = 4, 2, 64, 16, 2
    impl = _impl(r3, heads, kv_heads, d, path)
    impl.pivots = pivots
    cache = _padded_cache(12, kv_heads, bs, d, pivots)
    # the pivots are unlike the other tokens: a sink's small key, a large value
    k_a = torch.randn(37, kv_heads, d) * 3
    v_a = torch.randn(37, kv_heads, d)
    k_a[:pivots] *= 0.1
    v_a[:pivots] *= 5
    table_a = [7, 2, 9]
    _write(impl, cache, k_a[:20], v_a[:20], 0, table_a, bs, 20)
    _write(impl, cache, k_a[20:], v_a[20:], 20, table_a, bs, 37)
    k_b = torch.cat([k_a[:16], torch.randn(7, kv_heads, d) * 3])
    v_b = torch.cat([v_a[:16], torch.randn(7, kv_heads, d)])
    table_b = [7, 4]
    _write(impl, cache, k_b[16:], v_b[16:], 16, table_b, bs, 23)
    tail = pivot_tail(cache, pivots)
    assert tail is not None and tail[[7, 2, 9, 4]].any(dim=(1, 2, 3, 4)).tolist() == [
        True, False, False, False]  # only A's first block holds pivots
    q = torch.randn(5 + 3, heads, d)
    meta = SimpleNamespace(
        query_start_loc=torch.tensor([0, 5, 8]), seq_lens=torch.tensor([37, 23]),
        block_table=torch.tensor([[7, 2, 9], [7, 4, 0]]), causal=True)
    out = torch.empty(8, heads, d)
    impl.forward(None, q, None, None, cache, meta, out)

    h = hadamard_matrix(d) if r3 else torch.eye(d, dtype=torch.float64)
    start = 0
    for k, v, n, tq in ((k_a, v_a, 37, 5), (k_b, v_b, 23, 3)):
        kr = (k.double() @ h).float()
        kq = fake_quantize_asym(kr, 4, 1.0).double()
        vq = fake_quantize_asym(v, 4, 1.0).double()
        kq[:pivots] = kr[:pivots].half().double()
        vq[:pivots] = v[:pivots].half().double()
        qq = q[start:start + tq].double() @ h
        for hd in range(heads):
            g = hd // (heads // kv_heads)
            s = qq[:, hd] @ kq[:, g].t() / math.sqrt(d)
            pos = torch.arange(n - tq, n).unsqueeze(1)
            s = s.masked_fill(torch.arange(n).unsqueeze(0) > pos, float("-inf"))
            ref = torch.softmax(s, -1) @ vq[:, g]
            assert torch.allclose(out[start:start + tq, hd].double(), ref, atol=1e-4), (
                (out[start:start + tq, hd].double() - ref).abs().max())
        start += tq


def test_pivot_of_a_one_token_first_chunk(path):
    """A first chunk shorter than the pivots (one token, P = 2): its only key is the
    exact pivot, so attention returns its float16 value."""
    impl = _impl(False, 4, 2, 64, path)
    impl.pivots = 2
    cache = _padded_cache(2, 2, 16, 64, 2)
    k, v = torch.randn(1, 2, 64), torch.randn(1, 2, 64) * 7
    _write(impl, cache, k, v, 0, [1], 16, 1)
    meta = SimpleNamespace(query_start_loc=torch.tensor([0, 1]), seq_lens=torch.tensor([1]),
                           block_table=torch.tensor([[1]]), causal=True)
    out = torch.empty(1, 4, 64)
    impl.forward(None, torch.randn(1, 4, 64), None, None, cache, meta, out)
    want = v[0].half().float().repeat_interleave(2, dim=0)
    assert torch.allclose(out[0], want, atol=1e-5)


@pytest.mark.skipif(not cpu_ops.AVAILABLE, reason="native kernels not built")
@pytest.mark.parametrize("r3", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_pivot_bytes_equal_the_reference(r3, dtype):
    """The C++ writer stores the reference's pivots and codes, byte for byte without R3
    (with R3, float-order ties may move a code by one step and a pivot by an fp16 ulp)."""
    torch.manual_seed(4)
    k, v = (torch.randn(40, 2, 64, dtype=dtype) * 3 for _ in range(2))
    caches = []
    for native in (False, True):
        cache = _padded_cache(6, 2, 16, 64, 3)
        impl = _impl(r3, path="native" if native else "reference")
        impl.pivots, impl.clip_ratio = 3, 0.95
        # two sequences in one step: 25 tokens (from position 0) and 15 (a later chunk
        # from position 16: its tokens are no pivots)
        slots = torch.cat([torch.arange(25) + 16 * 0, torch.arange(15) + 16 * 3 + 0])
        slots[16:25] = torch.arange(9) + 16 * 5
        meta = SimpleNamespace(query_start_loc=torch.tensor([0, 25, 40]),
                               seq_lens=torch.tensor([25, 31]))
        impl._metadata = lambda _layer, meta=meta: meta
        impl.do_kv_cache_update(None, k, v, cache, slots)
        caches.append(cache)
    ta, tb = (pivot_tail(c, 3) for c in caches)
    assert ta[0].abs().sum() > 0 and not ta[1:].any()
    if not r3:
        assert torch.equal(caches[0], caches[1]) and torch.equal(ta, tb)
    else:
        assert torch.allclose(ta.float(), tb.float(), rtol=2e-3, atol=1e-3)
