"""Triton kernels for the QuaRot linear layers on GPUs.

Registered as ``torch.ops.quarot_triton.*`` (with fake impls for torch.compile):

* ``quantize``: per-token symmetric quantization, optionally fused with the online
  Hadamard x @ (H_K ⊗ H_2^k)/√n (R4 before down_proj). The power-of-two part is one or
  two dense Sylvester blocks and the K×K mix is accumulated over blocks of 16 rows, all
  as ``tl.dot`` on tiles, so every order K·2^k that ``hadamard_factor`` knows (2^k ≤
  16384) is served by one kernel.
* ``gemm``: int8 activation codes × 4-/8-bit weight codes, int32 accumulation on the
  tensor cores (``tl.dot`` int8 -> int32: mma on sm80–89, wgmma on sm90, which has no
  s4 MMA), per-channel or group-wise weight scales, per-token activation scales, bias.
  With 16-bit activations (W4A16) the same kernel dequantizes the codes to the
  activation dtype and accumulates in float32.

Weights stay 4-bit in memory: repacked once at load (``repack_weight``) to [N, K/2] bytes
(low nibble = even k, high nibble = odd k); a tile is widened to int8 codes in k order
in registers (each byte interleaved with itself, then a per-column shift), so the
activation tile is one contiguous load and one dot.

The epilogue rounds in the reference ops' order (float32, no FMA contraction), so on
identical codes the integer path equals ``quarot::int_linear`` bit for bit. Run with
TRITON_INTERPRET=1, the same kernels execute on CPU tensors: that is how CI tests them.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from vllm_quarot.hadamard import HadamardSizeError, fwht, hadamard_factor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # triton is optional: the reference ops serve without it
    AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def usable(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of this device."""
    if not AVAILABLE:
        return False
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


GROUP_SIZES = (64, 128)


def can_run(w_bits: int, in_features: int, group_size: int) -> bool:
    """Whether ``gemm`` serves this layer: 4/8-bit weights, per channel or groups of 64/128."""
    if w_bits not in (4, 8) or in_features % 2:
        return False
    return group_size == -1 or (group_size in GROUP_SIZES and in_features % group_size == 0)


def _no_fma() -> dict:
    # the interpreter takes no compiler options
    return {} if INTERPRET else {"enable_fp_fusion": False}


if AVAILABLE:

    @triton.jit
    def _round_quant(y, scale, qmax: tl.constexpr):
        """round(y / scale) half to even, clamped, as int8: IEEE division, then + 1.5·2^23
        and back (exact for |q| < 2^22; the interpreter has no rint), like torch.round."""
        q = tl.math.div_rn(y, scale)
        q = (q + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax * 1.0)
        return q.to(tl.int8)

    @triton.jit
    def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of this program: GROUP_M row tiles walk the column
        tiles together, so that their weight tiles stay in L2 (grouped ordering)."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BM)
        grid_n = tl.cdiv(N, BN)
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        rows_here = tl.minimum(grid_m - first_m, GROUP_M)
        return first_m + (pid % width) % rows_here, (pid % width) // rows_here

    @triton.jit
    def _round_to(y, ROUND: tl.constexpr):
        """Round float32 y to fp16 (ROUND=1) or bf16 (ROUND=2) precision, half to even.
        bf16 by bit arithmetic: the interpreter's bf16 cast truncates, the GPU's rounds."""
        if ROUND == 1:
            y = y.to(tl.float16).to(tl.float32)
        elif ROUND == 2:
            u = y.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            y = u.to(tl.float32, bitcast=True)
        return y

    @triton.jit
    def _quantize_kernel(
        x_ptr, codes_ptr, scale_ptr, K, stride_x, stride_c, mult,
        qmax: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per row: amax pass, then codes."""
        row = tl.program_id(0).to(tl.int64)
        amax = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.maximum(tl.max(amax, axis=0) * mult, 1e-12)
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0)
            q = _round_quant(x.to(tl.float32), scale, qmax)
            tl.store(codes_ptr + row * stride_c + offs, q, mask=offs < K)

    @triton.jit
    def _pow2_hadamard(
        x_ptr, hp1_ptr, hp2_ptr, r0, R: tl.constexpr, K: tl.constexpr, P: tl.constexpr,
        P1: tl.constexpr, P2: tl.constexpr, P2T: tl.constexpr, PREC: tl.constexpr,
    ):
        """Rows r0 … r0+R of the row's [K, P] view times H_P = H_P1 ⊗ H_P2, as a
        zero-padded [R, P1, P2T] tile (P2T ≥ P2, ≥ 16: a dot's minimum): x @ H_P2 over
        the last axis, then H_P1 @ · over the middle one (when P1 > 1)."""
        a = r0 + tl.arange(0, R)[:, None, None]
        p2 = tl.arange(0, P2T)[None, None, :]
        p = tl.arange(0, P1)[None, :, None] * P2 + p2
        x = tl.load(x_ptr + a * P + p, mask=(a < K) & (p2 < P2), other=0.0).to(tl.float32)
        h2 = tl.load(hp2_ptr + tl.arange(0, P2T)[:, None] * P2T + tl.arange(0, P2T)[None, :])
        y = tl.dot(tl.reshape(x, (R * P1, P2T)), h2, input_precision=PREC)
        y = tl.reshape(y, (R, P1, P2T))
        if P1 > 1:
            h1 = tl.load(hp1_ptr + tl.arange(0, P1)[:, None] * P1 + tl.arange(0, P1)[None, :])
            y = tl.dot(tl.broadcast_to(h1[None, :, :], (R, P1, P1)), y, input_precision=PREC)
        return tl.reshape(y, (R, P1 * P2T))

    @triton.jit
    def _hadamard_quantize_kernel(
        x_ptr, codes_ptr, scale_ptr, hk_ptr, hp1_ptr, hp2_ptr,
        stride_x, stride_c, norm, mult,
        K: tl.constexpr, KP: tl.constexpr, P: tl.constexpr, P1: tl.constexpr,
        P2: tl.constexpr, P2T: tl.constexpr, qmax: tl.constexpr, ROUND: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """One program per row of n = K·P, viewed as [K, P] and held zero-padded as
        [KP, P1·P2T]: the power-of-two transform per row of that view, the K×K mix
        H_Kᵀ @ · accumulated over blocks of 16 input rows (so no dot operand exceeds
        [KP, 16] or [16, P1·P2T]); then normalise, round to x's dtype (as the reference's
        separate Hadamard op does) and quantize."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        if K > 1:
            y = tl.zeros((KP, P1 * P2T), tl.float32)
            for r0 in range(0, K, 16):
                part = _pow2_hadamard(x_row, hp1_ptr, hp2_ptr, r0, 16, K, P, P1, P2, P2T,
                                      PREC)
                hk = tl.load(hk_ptr + tl.arange(0, KP)[:, None] * KP
                             + (r0 + tl.arange(0, 16))[None, :])
                y += tl.dot(hk, part, input_precision=PREC)
        else:
            y = _pow2_hadamard(x_row, hp1_ptr, hp2_ptr, 0, KP, K, P, P1, P2, P2T, PREC)
        y = _round_to(y * norm, ROUND)  # padding stays 0: it does not move the max
        scale = tl.maximum(tl.max(tl.max(tl.abs(y), axis=1), axis=0) * mult, 1e-12)
        tl.store(scale_ptr + row, scale)
        q = tl.reshape(_round_quant(y, scale, qmax), (KP, P1, P2T))
        a = tl.arange(0, KP)[:, None, None]
        p2 = tl.arange(0, P2T)[None, None, :]
        col = a * P + tl.arange(0, P1)[None, :, None] * P2 + p2
        tl.store(codes_ptr + row * stride_c + col, q, mask=(a < K) & (p2 < P2))

    @triton.jit
    def _gemm_kernel(
        a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
        M, N, K, stride_a, stride_w, stride_ws, stride_o,
        W_BITS: tl.constexpr, A_INT: tl.constexpr, GROUPED: tl.constexpr,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, OUT_ROUND: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """out[M, N] = A·Wᵀ · w_scale (· a_scale) + bias, A [M, K], W [N, K].

        W is [N, K/2] nibble pairs (4-bit) or [N, K] int8 (8-bit), K contiguous. A is int8
        codes (A_INT) or 16-bit activations. GROUPED: one weight scale per BK tile (the
        group size is BK), applied to each tile's sum as int_linear applies it per group;
        otherwise one per channel, applied to the whole int32 sum."""
        pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)

        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        # rows/channels past the edge read row 0 / channel 0 (no load masks); not stored
        rm_in = tl.where(rm < M, rm, 0).to(tl.int64)
        rn_in = tl.where(rn < N, rn, 0).to(tl.int64)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + rm_in[:, None] * stride_a + rk[None, :]
        if W_BITS == 4:
            w_ptrs = w_ptr + rn_in[:, None] * stride_w + tl.arange(0, BK // 2)[None, :]
            # each byte twice; even k keeps the low nibble, odd k the high one
            shift = (4 - (rk % 2) * 4).to(tl.int8)
        else:
            w_ptrs = w_ptr + rn_in[:, None] * stride_w + rk[None, :]
        acc_t = tl.int32 if A_INT else tl.float32
        acc = tl.zeros((BM, BN), acc_t)
        total = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + rk < K)[None, :], other=0)
            if W_BITS == 4:
                if EVEN_K:
                    b = tl.load(w_ptrs)
                else:
                    b = tl.load(w_ptrs, mask=(k0 + 2 * tl.arange(0, BK // 2) < K)[None, :],
                                other=0)
                b = tl.interleave(b, b)
                w = (b << shift[None, :]).to(tl.int8) >> 4
                w_ptrs += BK // 2
            else:
                if EVEN_K:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=(k0 + rk < K)[None, :], other=0)
                w_ptrs += BK
            a_ptrs += BK
            if A_INT:
                part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
            else:
                part = tl.dot(a, tl.trans(w).to(a.dtype))
            if GROUPED:
                ws = tl.load(w_scale_ptr + (k0 // BK) * stride_ws + rn_in)
                total += part.to(tl.float32) * ws[None, :]
            else:
                acc += part
        if not GROUPED:
            ws = tl.load(w_scale_ptr + rn_in)
            total = acc.to(tl.float32) * ws[None, :]
        if A_INT:
            xs = tl.load(a_scale_ptr + rm_in)
            total = total * xs[:, None]
        if HAS_BIAS:
            total += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_o + rn[None, :]
        # rounded here so that the cast is exact (the interpreter's bf16 cast truncates)
        tl.store(out, _round_to(total, OUT_ROUND).to(out_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])


_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def hadamard_plan(n: int) -> tuple[int, int, int, int, int]:
    """(K, KP, P1, P2, P2T) for n = K·P1·P2: P2 the dense block of the first dot (held
    as a P2T ≥ 16 tile), P1 ≥ 16 that of the second (1 when 2^k ≤ 64), KP ≥ 16 the padded
    K of the mix (1 when K = 1). Blocks stay ≤ 128 (the 128 × 128 float32 operand of
    a single-block 2^k = 128 made ptxas spill: 128 = 16 × 8 instead)."""
    k = hadamard_factor(n).shape[0]
    p = n // k
    if p > 16384:
        raise HadamardSizeError(f"the Triton Hadamard takes 2^k ≤ 16384, got {p} (n={n})")
    if p <= 64:
        p1, p2 = 1, p
    elif p == 128:
        p1, p2 = 16, 8
    else:
        bits = p.bit_length() - 1
        p1, p2 = 1 << (bits // 2), 1 << (bits - bits // 2)
    kp = 1 if k == 1 else max(16, _next_pow2(k))
    if k == 1 and p1 == 1:
        kp = 16  # a dot needs ≥ 16 rows: pad (only tiny n ≤ 64 get here)
    return k, kp, p1, p2, max(p2, 16)


@functools.cache
def hadamard_tiles(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The ±1 blocks of hadamard_plan(n), zero-padded, float32 on device."""
    k, kp, p1, p2, p2t = hadamard_plan(n)
    hk = torch.zeros(max(kp, 1), max(kp, 1))
    hk[:k, :k] = hadamard_factor(n).t()
    h2 = torch.zeros(p2t, p2t)
    h2[:p2, :p2] = fwht(torch.eye(p2))
    h1 = fwht(torch.eye(p1)) if p1 > 1 else torch.ones(1, 1)
    return tuple(t.contiguous().to(device) for t in (hk, h1, h2))


@functools.cache
def _mult(bits: int, clip_ratio: float) -> float:
    """clip_ratio / qmax rounded to float32, as the reference multiplies by it (cached:
    it is on every quantize call)."""
    return float(torch.tensor(clip_ratio / _qmax(bits), dtype=torch.float32))


def quantize_impl(
    x: torch.Tensor, online_hadamard: bool, bits: int, clip_ratio: float,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hadamard +) per-token quantization of x [M, K]: (int8 codes, float32 scales [M, 1]).

    ``precision`` of the Hadamard's float32 dots: "ieee" (FMA units; what the plugin
    uses) or "tf32x3" (tensor cores, ≈ float32), for benchmarks/cuda_kernels.py to
    compare on a GPU."""
    m, n = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty((m, n), dtype=torch.int8, device=x.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    if online_hadamard:
        hk, h1, h2 = hadamard_tiles(n, x.device)
        _hadamard_quantize_kernel[(m,)](
            x, codes, scales, hk, h1, h2, x.stride(0), codes.stride(0),
            1.0 / math.sqrt(n), _mult(bits, clip_ratio),
            **hadamard_quantize_meta(n, bits, x.dtype, precision), **_no_fma(),
        )
    else:
        _quantize_kernel[(m,)](
            x, codes, scales, n, x.stride(0), codes.stride(0), _mult(bits, clip_ratio),
            **quantize_meta(n, bits), **_no_fma(),
        )
    return codes, scales


@functools.cache
def fused_hadamard_fits(n: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Launch the fused Hadamard + quantize once on a random row (compiling the variant
    the model will use; once per order, not per layer): False when this GPU lacks the
    resources for order n, e.g. the 136 KiB of shared memory 28·1024 needs on an
    sm_86/89 part."""
    try:
        quantize_impl(torch.randn(1, n, device=device).to(dtype), True, 4, 1.0)
    except triton.runtime.errors.OutOfResources:
        return False
    return True


def hadamard_quantize_meta(
    n: int, bits: int, dtype: torch.dtype, precision: str = "ieee"
) -> dict:
    """Compile-time arguments of _hadamard_quantize_kernel (shared with the compile test)."""
    k, kp, p1, p2, p2t = hadamard_plan(n)
    return {"K": k, "KP": kp, "P": n // k, "P1": p1, "P2": p2, "P2T": p2t, "qmax": _qmax(bits),
            "ROUND": _ROUND[dtype], "PREC": precision, "num_warps": 8}


def quantize_meta(n: int, bits: int) -> dict:
    """Compile-time arguments of _quantize_kernel."""
    return {"qmax": _qmax(bits), "BLOCK": min(4096, _next_pow2(n)), "num_warps": 4}


def repack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [N, K] -> the kernel's layout: [N, K/2] nibble pairs (4-bit: low nibble
    even k, high nibble odd k) or the [N, K] codes themselves (8-bit)."""
    if bits == 8:
        return codes.contiguous()
    return ((codes[:, 0::2] & 0xF) | (codes[:, 1::2] << 4)).to(torch.int8).contiguous()


def repack_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, G] -> [G, N] (one contiguous row per group)."""
    return scale.float().t().contiguous()


def gemm_meta(
    m: int, k: int, groups: int, w_bits: int, a_int: bool, has_bias: bool,
    out_dtype: torch.dtype,
) -> dict:
    """Compile-time arguments of _gemm_kernel: the tile for this M (not tuned on hardware
    yet: no GPU was lent) and the flags. Small M streams the weights with narrow N
    tiles, so that every SM has work; large M uses 128×128×64 int8 tiles (BK = 128
    makes ptxas spill). Group-wise scales take BK = the group size (64 or 128)."""
    bk = k // groups if groups > 1 else 64
    if groups > 1 and (k // groups not in GROUP_SIZES or k % groups):
        raise ValueError(f"group size {k / groups:g} is not one of {GROUP_SIZES}")
    # spill-free on sm_80/89/90 (tests/test_triton_kernels.py compiles every one)
    if m <= 16:
        cfg = {"BM": 16, "BN": 32, "BK": 128 if groups == 1 else bk, "num_warps": 4,
               "num_stages": 4}
    elif groups > 1:  # a float32 running sum besides the tile's int32 one: smaller tiles
        cfg = {"BM": 64, "BN": 64, "BK": bk, "num_warps": 8 if bk == 128 else 4,
               "num_stages": 3}
    elif m <= 128:
        cfg = {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}
    return cfg | {"W_BITS": w_bits, "A_INT": a_int, "GROUPED": groups > 1,
                  "HAS_BIAS": has_bias, "EVEN_K": k % cfg["BK"] == 0, "GROUP_M": 8,
                  "OUT_ROUND": _ROUND[out_dtype]}


def gemm_impl(
    a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale_t: torch.Tensor,
    bias: torch.Tensor | None, w_bits: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """a [M, K] (int8 codes with a_scale [M, 1], or 16-bit activations with a_scale None)
    × repacked weights -> out [M, N] in out_dtype."""
    m, k = a.shape
    n, w_k = w.shape[0], w.shape[1] * (2 if w_bits == 4 else 1)
    if w_k != k:
        raise ValueError(f"activations have K={k}, the repacked weight {tuple(w.shape)} "
                         f"holds K={w_k}")
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    a = a if a.stride(-1) == 1 else a.contiguous()
    if a_scale is not None:
        a_scale = a_scale.reshape(-1).contiguous()  # [M] (a static scale comes expanded)
    meta = gemm_meta(m, k, w_scale_t.shape[0], w_bits, a_scale is not None,
                     bias is not None, out_dtype)
    grid = (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)
    _gemm_kernel[grid](
        a, a_scale if a_scale is not None else a, w, w_scale_t,
        bias if bias is not None else w_scale_t, out,
        m, n, k, a.stride(0), w.stride(0), w_scale_t.stride(0), out.stride(0),
        **meta, **_no_fma(),
    )
    return out


if AVAILABLE:

    @torch.library.custom_op("quarot_triton::quantize", mutates_args=())
    def quantize(
        x: torch.Tensor, online_hadamard: bool, bits: int, clip_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_impl(x, online_hadamard, bits, clip_ratio)

    @quantize.register_fake
    def _(x, online_hadamard, bits, clip_ratio):
        return (x.new_empty(x.shape, dtype=torch.int8),
                x.new_empty((x.shape[0], 1), dtype=torch.float32))

    @torch.library.custom_op("quarot_triton::gemm", mutates_args=())
    def gemm(
        a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor,
        w_scale_t: torch.Tensor, bias: torch.Tensor | None, w_bits: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return gemm_impl(a, a_scale, w, w_scale_t, bias, w_bits, out_dtype)

    @gemm.register_fake
    def _(a, a_scale, w, w_scale_t, bias, w_bits, out_dtype):
        return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------
# Rotated Runtime Smooth (activation.smooth): per-(token, K group) activation scales, the
# GEMM scales each group's int32 partial sum. Same maths and rounding order as
# quarot::smooth_quantize / quarot::smooth_int_linear (runtime/ops/reference.py).

SMOOTH_GROUP_SIZES = (16, 32, 64, 128, 256)  # one K tile per group: a power of two ≥ 16


def can_run_smooth(w_bits: int, in_features: int, group_size: int, smooth_group: int) -> bool:
    """Whether ``smooth_gemm`` serves this layer: 4-bit per-channel weights, smoothing
    groups of a power of two from 16 to 256 that divide K."""
    return (w_bits == 4 and group_size == -1 and smooth_group in SMOOTH_GROUP_SIZES
            and in_features % smooth_group == 0)


if AVAILABLE:

    @triton.jit
    def _smooth_group(x_row, perm_ptr, idx, PERM: tl.constexpr):
        """One smoothing group of a row in float32: channels idx of the smoothing order
        (gathered through perm)."""
        if PERM:
            idx = tl.load(perm_ptr + idx)
        return tl.load(x_row + idx).to(tl.float32)

    @triton.jit
    def _smooth_quantize_kernel(
        x_ptr, perm_ptr, codes_ptr, scale_ptr, K, stride_x, stride_c, stride_s, mult,
        qmax: tl.constexpr, GS: tl.constexpr, PERM: tl.constexpr, LEVELS: tl.constexpr,
    ):
        """One program per row: the groups' maxima (channels gathered in the order perm),
        the smoothed row's per-token scale, then each group's codes. LEVELS > 0: integer
        factors, codes × factor and one scale (the row's base) per row."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        groups = K // GS
        offs = tl.arange(0, GS)
        if LEVELS > 0:
            tmax = 0.0
            for g in range(0, groups):
                v = _smooth_group(x_row, perm_ptr, g * GS + offs, PERM)
                tmax = tl.maximum(tmax, tl.max(tl.abs(v), axis=0) * mult)
            base = tl.maximum(tl.math.div_rn(tmax, LEVELS * 1.0), 1e-12)
            for g in range(0, groups):
                v = _smooth_group(x_row, perm_ptr, g * GS + offs, PERM)
                f = tl.math.div_rn(tl.max(tl.abs(v), axis=0) * mult, base)
                f = (f + 12582912.0) - 12582912.0
                f = tl.minimum(tl.maximum(f, 1.0), LEVELS * 1.0)
                q = _round_quant(v, base * f, qmax).to(tl.float32) * f
                tl.store(codes_ptr + row * stride_c + g * GS + offs, q.to(tl.int8))
            tl.store(scale_ptr + row * stride_s, base)
        else:
            ymax = 0.0
            for g in range(0, groups):
                v = _smooth_group(x_row, perm_ptr, g * GS + offs, PERM)
                mg = tl.max(tl.abs(v), axis=0)
                s = tl.maximum(mg, 1e-12)
                tl.store(scale_ptr + row * stride_s + g, s)
                ymax = tl.maximum(ymax, tl.math.div_rn(mg, s))
            a = tl.maximum(ymax * mult, 1e-12)
            for g in range(0, groups):
                v = _smooth_group(x_row, perm_ptr, g * GS + offs, PERM)
                sc = a * tl.load(scale_ptr + row * stride_s + g)
                tl.store(scale_ptr + row * stride_s + g, sc)
                tl.store(codes_ptr + row * stride_c + g * GS + offs, _round_quant(v, sc, qmax))

    @triton.jit
    def _smooth_gemm_kernel(
        a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
        M, N, K, stride_a, stride_as, stride_w, stride_o,
        HAS_BIAS: tl.constexpr, OUT_ROUND: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """out[M, N] = (Σ_g (A_g·W_gᵀ)·a_scale[:, g]) · w_scale + bias: A int8 codes [M, K],
        W 4-bit [N, K/2] nibble pairs (columns in the codes' order), one K tile = one
        smoothing group (BK = the group size)."""
        pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)

        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rm_in = tl.where(rm < M, rm, 0).to(tl.int64)
        rn_in = tl.where(rn < N, rn, 0).to(tl.int64)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + rm_in[:, None] * stride_a + rk[None, :]
        w_ptrs = w_ptr + rn_in[:, None] * stride_w + tl.arange(0, BK // 2)[None, :]
        shift = (4 - (rk % 2) * 4).to(tl.int8)
        total = tl.zeros((BM, BN), tl.float32)
        for g in range(0, K // BK):
            a = tl.load(a_ptrs)
            b = tl.load(w_ptrs)
            b = tl.interleave(b, b)
            w = (b << shift[None, :]).to(tl.int8) >> 4
            part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
            xs = tl.load(a_scale_ptr + rm_in * stride_as + g)
            total += part.to(tl.float32) * xs[:, None]
            a_ptrs += BK
            w_ptrs += BK // 2
        total = total * tl.load(w_scale_ptr + rn_in)[None, :]
        if HAS_BIAS:
            total += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_o + rn[None, :]
        tl.store(out, _round_to(total, OUT_ROUND).to(out_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])


def smooth_quantize_impl(
    x: torch.Tensor, bits: int, clip_ratio: float, group_size: int, perm: torch.Tensor | None,
    levels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K] in the order perm, float32 scales [M, K/group]);
    levels > 0 (integer factors): codes × factor and scales [M, 1], for ``gemm``."""
    m, k = x.shape
    if group_size not in SMOOTH_GROUP_SIZES or k % group_size:
        raise ValueError(f"smoothing group {group_size} of K={k}: a power of two from 16 "
                         "to 256 dividing K")
    x = x if x.stride(-1) == 1 else x.contiguous()
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scales = torch.empty((m, 1 if levels else k // group_size), dtype=torch.float32,
                         device=x.device)
    if m == 0:
        return codes, scales
    perm_arg = perm.to(torch.int32).contiguous() if perm is not None else codes
    _smooth_quantize_kernel[(m,)](
        x, perm_arg, codes, scales, k, x.stride(0), codes.stride(0), scales.stride(0),
        _mult(bits, clip_ratio), qmax=_qmax(bits), GS=group_size, PERM=perm is not None,
        LEVELS=levels, num_warps=4, **_no_fma(),
    )
    return codes, scales


def smooth_gemm_meta(m: int, group_size: int, has_bias: bool, out_dtype: torch.dtype) -> dict:
    """Compile-time arguments of _smooth_gemm_kernel (BK = the smoothing group; tiles
    as the group-wise path of gemm_meta: a float32 running sum besides the int32 tile)."""
    if m <= 16:
        cfg = {"BM": 16, "BN": 32, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BM": 64, "BN": 64, "num_warps": 8 if group_size >= 128 else 4,
               "num_stages": 3}
    return cfg | {"BK": group_size, "HAS_BIAS": has_bias, "OUT_ROUND": _ROUND[out_dtype],
                  "GROUP_M": 8}


def smooth_gemm_impl(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Codes a [M, K] with scales [M, K/G] × repacked 4-bit weights [N, K/2] with
    per-channel scales [N] -> out [M, N]."""
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] * 2 != k:
        raise ValueError(f"activations have K={k}, the repacked weight {tuple(w.shape)} "
                         f"holds K={w.shape[1] * 2}")
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    a = a.contiguous()
    a_scale = a_scale.contiguous()
    meta = smooth_gemm_meta(m, k // a_scale.shape[1], bias is not None, out_dtype)
    grid = (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)
    _smooth_gemm_kernel[grid](
        a, a_scale, w, w_scale, bias if bias is not None else w_scale, out,
        m, n, k, a.stride(0), a_scale.stride(0), w.stride(0), out.stride(0),
        **meta, **_no_fma(),
    )
    return out


if AVAILABLE:

    @torch.library.custom_op("quarot_triton::smooth_quantize", mutates_args=())
    def smooth_quantize(
        x: torch.Tensor, bits: int, clip_ratio: float, group_size: int,
        perm: torch.Tensor | None, levels: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return smooth_quantize_impl(x, bits, clip_ratio, group_size, perm, levels)

    @smooth_quantize.register_fake
    def _(x, bits, clip_ratio, group_size, perm, levels):
        return (x.new_empty(x.shape, dtype=torch.int8),
                x.new_empty((x.shape[0], 1 if levels else x.shape[1] // group_size),
                            dtype=torch.float32))

    @torch.library.custom_op("quarot_triton::smooth_gemm", mutates_args=())
    def smooth_gemm(
        a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return smooth_gemm_impl(a, a_scale, w, w_scale, bias, out_dtype)

    @smooth_gemm.register_fake
    def _(a, a_scale, w, w_scale, bias, out_dtype):
        return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)
