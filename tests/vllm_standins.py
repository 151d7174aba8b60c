"""Plain PyTorch stand-ins for the vLLM CPU ops that only some machines have.

vLLM's CPU wheel carries three builds of its ops (AVX2, AVX-512, AVX-512 + bf16/AMX)
and loads the one the CPU runs. Our glue to its kernels (``runtime/kernels/vllm_*``)
takes different branches by what the build has: ``cpu_gemm_wna16`` (W4A16) is missing
from the AVX2 build, the AMX int8 GEMM (``convert_weight_packed`` +
``int8_scaled_mm_with_quant``) exists only in the AMX build and is picked only on CPUs
with AMX tiles. A machine that lacks an op still executes the glue's Python side with
these stand-ins, which compute what the op computes from the same arguments (layouts
included) in plain PyTorch; where the real op exists, the tests check the stand-in
against it, so the stand-in cannot drift from what it stands for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    unpack_quantized_values_into_int32,
)
from vllm.scalar_type import scalar_types


def cpu_gemm_wna16(input: torch.Tensor, q_weight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, pack_factor: int,
                   isa_hint: str) -> torch.Tensor:
    """``vllm._custom_ops.cpu_gemm_wna16`` on the layout ``CPUWNA16LinearKernel`` makes:
    q_weight [N/16, 16·K/pack_factor] int32 (blocks of 16 output channels, each row k
    two words of eight uint4b8 codes along N), scales [groups, N], no zero points."""
    assert zeros is None and pack_factor == 8
    blocks, cols = q_weight.shape
    k = cols * pack_factor // 16
    words = q_weight.view(blocks, k, 16 // pack_factor).permute(1, 0, 2).reshape(k, -1)
    codes = unpack_quantized_values_into_int32(words, scalar_types.uint4b8, 1) - 8  # [K, N]
    group = k // scales.shape[0]
    w = codes.float() * scales.float().repeat_interleave(group, dim=0)
    out = input.float() @ w
    if bias is not None:
        out += bias.float()
    return out.to(input.dtype)


def convert_weight_packed(weight: torch.Tensor) -> torch.Tensor:
    """The AMX kernel's weight prepacking; the stand-in GEMM reads codes [N, K] as they
    are."""
    return weight.clone()


def int8_scaled_mm_with_quant(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                              bias: torch.Tensor | None, out_dtype: torch.dtype,
                              is_vnni: bool) -> torch.Tensor:
    """The AMX int8 GEMM: x quantized per token (symmetric, amax/127, round to nearest
    even), int32 products with the int8 codes w [N, K], times the per-channel scales."""
    if x.dtype not in (torch.bfloat16, torch.float16):  # as the real op refuses
        raise RuntimeError("int8_scaled_mm_with_quant: expect A to be bfloat16 or half.")
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 127.0
    x_q = torch.round(xf / s).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(x_q, w.t().contiguous()).float()
    out = acc * s * w_scale.float().reshape(1, -1)
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


@contextlib.contextmanager
def wna16_standin(monkeypatch) -> Iterator[None]:
    """vLLM's CPU W4A16 kernel runs ``cpu_gemm_wna16`` through ``vllm._custom_ops``."""
    import vllm._custom_ops as ops

    monkeypatch.setattr(ops, "cpu_gemm_wna16", cpu_gemm_wna16)
    yield


@contextlib.contextmanager
def amx_int8_standin(monkeypatch) -> Iterator[None]:
    """vLLM's CPU int8 kernel takes its AMX path (as on a CPU with AMX tiles) and runs
    the stand-in ops there."""
    import vllm.model_executor.kernels.linear.scaled_mm.cpu as cpu_mm

    def sgl_ok(n: int, k: int, dtype: torch.dtype) -> bool:
        return dtype == torch.int8 and k % 32 == 0 and n % 16 == 0

    monkeypatch.setattr(cpu_mm, "check_cpu_sgl_kernel", sgl_ok)
    monkeypatch.setattr(torch.ops._C, "convert_weight_packed", convert_weight_packed,
                        raising=False)
    monkeypatch.setattr(torch.ops._C, "int8_scaled_mm_with_quant",
                        int8_scaled_mm_with_quant, raising=False)
    yield
