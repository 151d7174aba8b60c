"""The runtime ops of the QuaRot linear layers, as torch custom ops.

Each op has a fake (meta) implementation so that vLLM's torch.compile path can trace
through it, and a plain PyTorch implementation that runs anywhere and is the reference
that faster kernels (registered later behind the same names) are tested against.
Shape-dependent choices live inside the ops, never in traced code.
"""

from __future__ import annotations

import torch

from vllm_quarot.hadamard import hadamard_transform
from vllm_quarot.quant import dequantize_weight
from vllm_quarot.quant import quantize_per_token as _quantize_per_token
from vllm_quarot.quant import quantize_static as _quantize_static
from vllm_quarot.quant import smooth_quantize as _smooth_quantize

__all__ = ["hadamard", "int_linear", "quantize_per_token", "quantize_static",
           "smooth_int_linear", "smooth_quantize", "wna16_linear"]


@torch.library.custom_op("quarot::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, had_k: torch.Tensor) -> torch.Tensor:
    """Normalised x @ (H_K ⊗ H_2^k) over the last dim, computed in float32."""
    return hadamard_transform(x.float(), had_k.float()).to(x.dtype)


@hadamard.register_fake
def _(x: torch.Tensor, had_k: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("quarot::quantize_per_token", mutates_args=())
def quantize_per_token(
    x: torch.Tensor, bits: int, clip_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token codes (int8 [M, K]) and float32 scales [M, 1]."""
    return _quantize_per_token(x, bits, clip_ratio)


@quantize_per_token.register_fake
def _(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device),
    )


@torch.library.custom_op("quarot::quantize_static", mutates_args=())
def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric int8 codes [M, K] with one calibrated per-tensor scale (shape [1])."""
    return _quantize_static(x, scale, bits)


@quantize_static.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


def _int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] × int8 [N, K]ᵀ -> int32 [M, N]."""
    return torch._int_mm(a.contiguous(), b_t.t())


@torch.library.custom_op("quarot::int_linear", mutates_args=())
def int_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(x_q · x_scale) @ (w_q · w_scale)ᵀ + bias with int32 accumulation.

    x_q int8 [M, K], x_scale float32 [M, 1]; w_q int8 [N, K], w_scale float32 [N, G]
    (G = 1 per channel, else K/G-wide groups that are accumulated separately).
    """
    groups = w_scale.shape[1]
    if groups == 1:
        acc = _int_mm(x_q, w_q).float() * w_scale.t()
    else:
        gs = x_q.shape[1] // groups
        acc = torch.zeros((x_q.shape[0], w_q.shape[0]), dtype=torch.float32, device=x_q.device)
        for g in range(groups):
            sl = slice(g * gs, (g + 1) * gs)
            acc += _int_mm(x_q[:, sl], w_q[:, sl]).float() * w_scale[:, g]
    out = acc * x_scale
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


@int_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    return torch.empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype, device=x_q.device)


@torch.library.custom_op("quarot::wna16_linear", mutates_args=())
def wna16_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only: x @ dequant(w_q, w_scale)ᵀ + bias in x's dtype."""
    gs = -1 if w_scale.shape[1] == 1 else w_q.shape[1] // w_scale.shape[1]
    w = dequantize_weight(w_q, w_scale, gs, torch.float32)
    out = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


@wna16_linear.register_fake
def _(x, w_q, w_scale, bias):
    return torch.empty((x.shape[0], w_q.shape[0]), dtype=x.dtype, device=x.device)


# Rotated Runtime Smooth (activation.smooth): per-(token, K group) activation scales.


@torch.library.custom_op("quarot::smooth_quantize", mutates_args=())
def smooth_quantize(
    x: torch.Tensor, bits: int, clip_ratio: float, group_size: int, perm: torch.Tensor | None,
    levels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runtime-smoothed per-token codes (int8 [M, K], channels in the order perm) and
    float32 scales [M, K/group_size] (token scale × the group's smoothing factor); with
    integer factors (levels > 0) codes × factor and the token's base [M, 1], for
    ``quarot::int_linear``."""
    return _smooth_quantize(x, bits, clip_ratio, group_size, perm, levels)


@smooth_quantize.register_fake
def _(x, bits, clip_ratio, group_size, perm, levels):
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty((*x.shape[:-1], 1 if levels else x.shape[-1] // group_size),
                    dtype=torch.float32, device=x.device),
    )


@torch.library.custom_op("quarot::smooth_int_linear", mutates_args=())
def smooth_int_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Σ_g (x_q[:, g] @ w_q[:, g]ᵀ)·x_scale[:, g] · w_scale + bias, int32 partial sums.

    x_q int8 [M, K] and w_q int8 [N, K] in the same channel order; x_scale float32
    [M, G] (one scale per token and group of K/G channels); w_scale float32 [N, 1] (per
    output channel). In float32, in this order: each group's partial sum times its
    scale, summed over the groups in order, times the weight scale, plus the bias.
    """
    groups = x_scale.shape[1]
    gs = x_q.shape[1] // groups
    acc = torch.zeros((x_q.shape[0], w_q.shape[0]), dtype=torch.float32, device=x_q.device)
    for g in range(groups):
        sl = slice(g * gs, (g + 1) * gs)
        acc += _int_mm(x_q[:, sl], w_q[:, sl]).float() * x_scale[:, g:g + 1]
    out = acc * w_scale.t()
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


@smooth_int_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    return torch.empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype, device=x_q.device)
