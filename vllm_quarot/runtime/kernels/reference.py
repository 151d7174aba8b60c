"""The reference kernel: the plain PyTorch ops of ``runtime/ops/reference.py``.

Runs anywhere (CPU, GPU, any size); every faster kernel is tested against it.
"""

from __future__ import annotations

import torch

import vllm_quarot.runtime.ops.reference  # noqa: F401  (registers torch.ops.quarot.*)
from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel, register


class ReferenceLinearKernel(QuaRotLinearKernel):
    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        return True, None

    @classmethod
    def describe(cls) -> str:
        return "the reference torch ops"

    def process_weights_after_loading(self, layer, codes, scale) -> None:
        register(layer, "weight_q", codes)
        register(layer, "weight_scale", scale)

    def apply_weights(self, layer, x, bias):
        c = self.config
        if c.a_bits is None:
            return torch.ops.quarot.wna16_linear(x, layer.weight_q, layer.weight_scale, bias)
        if c.static:
            x_q = torch.ops.quarot.quantize_static(x, layer.input_scale, c.a_bits)
            x_s = layer.input_scale.expand(x.shape[0], 1)
        else:
            x_q, x_s = torch.ops.quarot.quantize_per_token(x, c.a_bits, c.clip_ratio)
        return torch.ops.quarot.int_linear(x_q, x_s, layer.weight_q, layer.weight_scale, bias,
                                           x.dtype)
