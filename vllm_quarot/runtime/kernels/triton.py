"""The Triton kernels (GPUs; CPU tensors under TRITON_INTERPRET=1 in CI).

Integer GEMM on the tensor cores over weights repacked once to [N, K/2] nibble pairs
(W4A16: the codes dequantized inside the GEMM); per-token quantization fused with
the online R4 Hadamard where the GPU has the resources for its order (checked once
at load; otherwise the linear method's Hadamard transform runs first).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger

import vllm_quarot.runtime.ops.reference  # noqa: F401  (torch.ops.quarot.quantize_static)
from vllm_quarot.hadamard import HadamardSizeError
from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel, register
from vllm_quarot.runtime.ops import triton as triton_ops

logger = init_logger("vllm.quarot")


class TritonLinearKernel(QuaRotLinearKernel):
    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        if not triton_ops.usable(torch.device(c.device_type)):
            return False, "needs a CUDA device (or TRITON_INTERPRET=1) and triton"
        if not triton_ops.can_run(c.w_bits, c.in_features, c.group_size):
            return False, (f"{c.w_bits}-bit weights, K={c.in_features}, group "
                           f"{c.group_size}: groups of {triton_ops.GROUP_SIZES} only")
        return True, None

    @classmethod
    def describe(cls) -> str:
        return "Triton kernels" + (" (interpreted)" if triton_ops.INTERPRET else "")

    def process_weights_after_loading(self, layer, codes, scale) -> None:
        c = self.config
        register(layer, "weight_repacked", triton_ops.repack_weight(codes, c.w_bits))
        register(layer, "weight_scale_t", triton_ops.repack_scale(scale))
        self.fuses_hadamard = False
        if c.online_hadamard and c.a_bits is not None and not c.static:
            try:
                triton_ops.hadamard_plan(c.in_features)
                self.fuses_hadamard = triton_ops.fused_hadamard_fits(
                    c.in_features, codes.device, torch.get_default_dtype())
            except HadamardSizeError:
                pass
            if not self.fuses_hadamard:
                logger.warning_once(
                    "the fused Hadamard + quantize kernel of order %d does not fit this GPU; "
                    "the Hadamard runs as a separate op", c.in_features)

    def apply_weights(self, layer, x, bias):
        c = self.config
        gemm = torch.ops.quarot_triton.gemm
        if c.a_bits is None:  # W4A16: codes dequantized inside the GEMM
            return gemm(x, None, layer.weight_repacked, layer.weight_scale_t, bias, c.w_bits,
                        x.dtype)
        if c.static:
            x_q = torch.ops.quarot.quantize_static(x, layer.input_scale, c.a_bits)
            x_s = layer.input_scale.expand(x.shape[0], 1)
        else:  # (R4 Hadamard +) per-token quantize in one kernel
            x_q, x_s = torch.ops.quarot_triton.quantize(x, self.fuses_hadamard, c.a_bits,
                                                        c.clip_ratio)
        return gemm(x_q, x_s, layer.weight_repacked, layer.weight_scale_t, bias, c.w_bits,
                    x.dtype)
