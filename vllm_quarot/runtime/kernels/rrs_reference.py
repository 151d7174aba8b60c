"""The reference kernel of runtime-smoothed layers (activation.smooth, Rotated Runtime
Smooth): the plain PyTorch ops ``quarot::smooth_quantize`` + ``quarot::smooth_int_linear``,
the definition the native kernel is tested against. CPU only: ``torch._int_mm`` on CUDA
refuses the small M of decoding, and no GPU kernel serves smoothing yet."""

from __future__ import annotations

import torch

import vllm_quarot.runtime.ops.reference  # noqa: F401  (registers torch.ops.quarot.*)
from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel, register


class ReferenceRRSKernel(QuaRotLinearKernel):
    smoothing = True

    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        if c.device_type != "cpu":
            return False, "CPU only"
        if c.a_bits is None or c.static or c.group_size != -1:
            return False, "per-token activations and per-channel weights only"
        return True, None

    @classmethod
    def describe(cls) -> str:
        return "the reference torch ops"

    def process_weights_after_loading(self, layer, codes, scale) -> None:
        perm = layer.smooth_perm.data.long() if self.config.smooth_reorder else None
        # weight columns in the smoothing order, as the activation codes come
        register(layer, "weight_q", codes if perm is None else codes[:, perm].contiguous())
        register(layer, "weight_scale", scale)

    def apply_weights(self, layer, x, bias):
        c = self.config
        perm = layer.smooth_perm if c.smooth_reorder else None
        x_q, x_s = torch.ops.quarot.smooth_quantize(x, c.a_bits, c.clip_ratio, c.smooth_group,
                                                    perm, c.smooth_levels)
        if c.smooth_levels:  # integer factors are in the codes: the per-token GEMM
            return torch.ops.quarot.int_linear(x_q, x_s, layer.weight_q, layer.weight_scale,
                                               bias, x.dtype)
        return torch.ops.quarot.smooth_int_linear(x_q, x_s, layer.weight_q, layer.weight_scale,
                                                  bias, x.dtype)
