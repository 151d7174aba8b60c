"""Round-to-nearest quantization math shared by the quantizer, the runtime ops and the
simulation, so that all three round the same way.

Symmetric b-bit integers live in [-2^(b-1), 2^(b-1) - 1]; scales are float32.
"""

from __future__ import annotations

import torch

__all__ = [
    "dequantize_weight",
    "fake_quantize_asym",
    "fake_smooth_quantize",
    "fake_quantize_per_token",
    "fake_quantize_per_token_blocks",
    "pack_kv",
    "pack_weight",
    "quantize_per_token",
    "quantize_static",
    "quantize_weight_rtn",
    "slot_bytes",
    "smooth_factor_levels",
    "smooth_order",
    "smooth_quantize",
    "unpack_kv",
    "unpack_weight",
    "weight_scales",
]

_EPS = 1e-12


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize_per_token(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row quantization: (int8 codes, float32 scale [.., 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).mul_(clip_ratio / qmax(bits))
    scale = scale.clamp_(min=_EPS)
    q = torch.round(xf / scale).clamp_(-qmax(bits) - 1, qmax(bits)).to(torch.int8)
    return q, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric codes with one calibrated scale for the whole tensor."""
    q = torch.round(x.float() / scale.float()).clamp_(-qmax(bits) - 1, qmax(bits))
    return q.to(torch.int8)


def fake_quantize_per_token(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0
) -> torch.Tensor:
    """quantize_per_token followed by dequantization, in x's dtype."""
    q, scale = quantize_per_token(x, bits, clip_ratio)
    return (q.float() * scale).to(x.dtype)


def fake_quantize_per_token_blocks(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, blocks: int = 1
) -> torch.Tensor:
    """fake_quantize_per_token with one scale per (token, block of K/blocks): the inputs
    of the row-parallel linears of a tensor_parallel_blocks checkpoint (each rank
    quantizes its own slice). blocks == 1 is fake_quantize_per_token itself."""
    if blocks == 1:
        return fake_quantize_per_token(x, bits, clip_ratio)
    k = x.shape[-1]
    if k % blocks:
        raise ValueError(f"{blocks} blocks do not divide the input size {k}")
    y = fake_quantize_per_token(x.reshape(*x.shape[:-1], blocks, k // blocks), bits,
                                clip_ratio)
    return y.reshape(x.shape)


# Rotated Runtime Smooth (the quantizer's --smooth runtime; activation.smooth in the
# format). After the rotation(s), a linear's input channels are split into groups of G
# (in the order ``perm``: channels grouped by their calibration maxima); every group is
# divided by its runtime smoothing factor, the group's largest |x| over the token, the
# smoothed row is quantized per token, and the integer GEMM multiplies each group's
# partial sum by (token scale × smoothing factor). No weight is rescaled.
#
# Integer factors (activation.smooth.factor_levels L > 0, format v9, the quantizer's
# default L = 16): each group's scale is f_g · base with f_g an integer in [1, L] and
# base = (the token's largest group scale) / L. Codes times their group's factor are
# still int8 (|code| ≤ 2^(bits-1), so L · 2^(bits-1) ≤ 128), and Σ_g f_g · Σ_k code·w =
# Σ_k (f_g·code)·w exactly in int32: the GEMM is the plain per-token one, with no
# per-group epilogue.


def smooth_factor_levels(levels: int, bits: int) -> int:
    """The integer smoothing factors a layer at ``bits`` activations uses for the
    checkpoint's factor_levels (0: float factors): at most 128 / 2^(bits-1), so that a
    code times its factor fits int8 (16 at 4 bits; 1 at 8 bits: plain per-token)."""
    return min(levels, 128 >> (bits - 1)) if levels else 0


def smooth_quantize(
    x: torch.Tensor, bits: int, clip_ratio: float, group_size: int,
    perm: torch.Tensor | None = None, levels: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runtime-smoothed per-token quantization of x [..., K]: (int8 codes [..., K] in the
    order ``perm`` (the channel order; None: natural), float32 scales [..., K/G]; with
    integer factors (levels > 0, see smooth_factor_levels): codes times their group's
    factor and the per-token base [..., 1], i.e. per-token codes and scale).

    With m_g = max_{j in g} |x_j| (over the token): the smoothing factor s_g = max(m_g,
    eps), the per-token scale of the smoothed row a = max(max_g(m_g / s_g) · clip/qmax,
    eps), the group's scale a · s_g, and code_j = round(x_j / (a · s_g)): dequantized
    x_j = code_j · scale_g. (Quantizing x_j / s_g by a rounds twice; dividing once by
    the scale the GEMM multiplies back is the same up to last-bit ties, and cheaper.)
    """
    xf = x.float()
    if perm is not None:
        xf = xf.index_select(-1, perm)
    k = xf.shape[-1]
    if k % group_size:
        raise ValueError(f"smoothing group size {group_size} does not divide {k}")
    g = xf.reshape(*xf.shape[:-1], k // group_size, group_size)
    m = g.abs().amax(dim=-1, keepdim=True)
    if levels:
        # t_g the group's own scale, base = max_g t_g / L, f_g = round(t_g / base) in
        # [1, L]; code = round(x / (base·f_g)) · f_g (float32, in this order)
        t = m.mul(clip_ratio / qmax(bits))
        base = (t.amax(dim=-2, keepdim=True) / levels).clamp_(min=_EPS)
        f = torch.round(t / base).clamp_(1, levels)
        q = torch.round(g / (base * f)).clamp_(-qmax(bits) - 1, qmax(bits)).mul_(f)
        return q.to(torch.int8).reshape(xf.shape), base.reshape(*xf.shape[:-1], 1)
    s = m.clamp(min=_EPS)
    a = (m / s).amax(dim=-2, keepdim=True).mul_(clip_ratio / qmax(bits)).clamp_(min=_EPS)
    scale = a * s
    q = torch.round(g / scale).clamp_(-qmax(bits) - 1, qmax(bits)).to(torch.int8)
    return q.reshape(xf.shape), scale.squeeze(-1)


def fake_smooth_quantize(
    x: torch.Tensor, bits: int, clip_ratio: float, group_size: int,
    perm: torch.Tensor | None = None, levels: int = 0,
) -> torch.Tensor:
    """smooth_quantize followed by dequantization, in x's channel order and dtype."""
    q, scale = smooth_quantize(x, bits, clip_ratio, group_size, perm, levels)
    k = x.shape[-1]
    groups = scale.shape[-1]
    deq = (q.float().reshape(*q.shape[:-1], groups, k // groups)
           * scale.unsqueeze(-1)).reshape(q.shape)
    if perm is not None:
        deq = deq.index_select(-1, torch.argsort(perm))
    return deq.to(x.dtype)


def smooth_order(amax: torch.Tensor) -> torch.Tensor:
    """The channel order of a linear's input for runtime smoothing: channels sorted by
    their calibration maxima (largest first; ties by index), so that each group of G
    consecutive channels holds channels of similar range. int32 [K]."""
    order = sorted(range(amax.numel()), key=lambda j: (-float(amax[j]), j))
    return torch.tensor(order, dtype=torch.int32)


def quantize_kv(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row (last dim) quantization, as the KV cache stores it:
    (uint8 codes in [0, 2^b - 1], scale, zero point), scale and zero float16-exact."""
    xf = x.float()
    hi = xf.amax(dim=-1, keepdim=True) * clip_ratio
    lo = xf.amin(dim=-1, keepdim=True) * clip_ratio
    maxq = (1 << bits) - 1
    # the scale is at least max|x| / 1024, so that the zero point stays within ±1026, an
    # exact float16 integer: a token whose range is tiny next to its offset would
    # otherwise get a zero point beyond float16's range (inf -> -inf values)
    floor = torch.maximum(hi.abs(), lo.abs()) * (1.0 / 1024)
    scale = torch.maximum((hi - lo) / maxq, floor).clamp_(min=1e-6).half().float()
    zero = torch.round(-lo / scale).half().float()
    q = torch.clamp(torch.round(xf / scale) + zero, 0, maxq).to(torch.uint8)
    return q, scale, zero


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def fake_quantize_asym(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """quantize_kv followed by dequantize_kv, in x's dtype."""
    return dequantize_kv(*quantize_kv(x, bits, clip_ratio)).to(x.dtype)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    if k % gs:
        raise ValueError(f"group size {gs} does not divide the input size {k}")
    return w.reshape(n, k // gs, gs)


def weight_scales(
    w: torch.Tensor, bits: int, group_size: int = -1, clip_ratio: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Symmetric scales [N, G] from the max |w| of each row (group), times clip_ratio."""
    amax = _grouped(w, group_size).abs().amax(dim=-1)
    return (amax * clip_ratio / qmax(bits)).clamp(min=_EPS)


def quantize_with_scales(
    w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = -1
) -> torch.Tensor:
    """int8 codes of w [N, K] for the given per-row/group scales [N, G]."""
    g = _grouped(w, group_size)
    q = torch.round(g / scale.to(w.dtype).unsqueeze(-1)).clamp(-qmax(bits) - 1, qmax(bits))
    return q.reshape(w.shape).to(torch.int8)


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, group_size: int = -1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """codes [N, K] × scales [N, G] -> dense weight in dtype."""
    g = _grouped(q.to(dtype), group_size)
    return (g * scale.to(dtype).unsqueeze(-1)).reshape(q.shape)


# The per-channel weight clip search of QuaRot's and GPTQ's quantizers (find_params with
# mse=True): shrink the max by 1 - i/100 for i < 80, keep the scale with the least
# Σ|w - ŵ|^2.4 over the row (group).
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4


def search_clip_scales(w: torch.Tensor, bits: int, group_size: int = -1) -> torch.Tensor:
    """Scales [N, G] (w's dtype) from the clip search; float32 maths is enough (it
    only compares errors). Rows are searched CLIP_ROWS at a time, so that the 80
    passes over a block stay in cache (2× faster on a 5632×2048 weight; each row's
    search is independent, the result is the same)."""
    g = _grouped(w.float(), group_size)
    out = torch.empty(g.shape[:2], dtype=torch.float32, device=g.device)
    rows = CLIP_ROWS if g.device.type == "cpu" else g.shape[0]  # GPU: no cache to fit
    for r in range(0, g.shape[0], rows):
        out[r:r + rows] = _search_block(g[r:r + rows], bits)
    return out.to(w.dtype)


CLIP_ROWS = 128


def _search_block(g: torch.Tensor, bits: int) -> torch.Tensor:
    amax = g.abs().amax(dim=-1)
    best = torch.full_like(amax, float("inf"))
    scale = (amax / qmax(bits)).clamp(min=_EPS)
    lo, hi = -qmax(bits) - 1, qmax(bits)
    q = torch.empty_like(g)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        s = (amax * (1 - i / CLIP_GRID) / qmax(bits)).clamp(min=_EPS)
        torch.div(g, s.unsqueeze(-1), out=q)
        q.round_().clamp_(lo, hi)
        err = (q.mul_(s.unsqueeze(-1)).sub_(g)).abs_().pow_(CLIP_NORM).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
    return scale


def quantize_weight_rtn(
    w: torch.Tensor, bits: int, group_size: int = -1, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN weights: (int8 codes [N, K], float32 scales [N, G]); with clip_search, each
    row's (group's) scale comes from ``search_clip_scales``."""
    wd = w.double()
    if clip_search:
        scale = search_clip_scales(wd, bits, group_size)
    else:
        scale = weight_scales(wd, bits, group_size)
    q = quantize_with_scales(wd, scale, bits, group_size)
    return q, scale.float()


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [N, K] -> int32 [N, ceil(K·bits/32)] (compressed-tensors layout)."""
    # imported here: the kernels and their tests need only torch (a bare GPU box)
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q, bits, packed_dim=1)


def unpack_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_weight: int32 [N, P] -> int8 codes [N, in_features]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    n = packed.shape[0]
    return unpack_from_int32(packed, bits, torch.Size((n, in_features)), packed_dim=1)


# The KV4 cache's bytes per (token, KV head); shared by the CPU backend and the kernels.
def slot_bytes(head_dim: int) -> int:
    """Bytes per token per KV head: packed K and V codes plus their fp16 scale/zero."""
    return 2 * (head_dim // 2 + 4)


def pack_kv(x: torch.Tensor, clip_ratio: float) -> torch.Tensor:
    """[T, H, D] -> uint8 [T, H, D/2 + 4]: two codes per byte (low nibble first)."""
    codes, scale, zero = quantize_kv(x, 4, clip_ratio)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    sz = torch.cat([scale, zero], dim=-1).to(torch.float16).view(torch.uint8)
    return torch.cat([packed, sz], dim=-1)


def unpack_kv(b: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of pack_kv (up to quantization): uint8 [..., D/2 + 4] -> float32 [..., D]."""
    half = head_dim // 2
    packed = b[..., :half]
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*b.shape[:-1], head_dim)
    sz = b[..., half : half + 4].contiguous().view(torch.float16).float()
    return dequantize_kv(codes, sz[..., :1], sz[..., 1:2])
