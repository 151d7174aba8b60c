"""The native CPU kernel (csrc/cpu: AVX512-VNNI, AVX2 or scalar, chosen at run time).

One call per layer: (online R4 Hadamard +) per-token or static quantization, the
integer GEMM over weights repacked once into 16-channel × 8-k blocks (4-bit stays
4-bit), and the dequantizing epilogue — bit-exact to ``quarot::int_linear`` on equal
codes.
"""

from __future__ import annotations

import torch

from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel, register
from vllm_quarot.runtime.ops import cpu as cpu_ops


def native_cpu_unavailable(c: LinearConfig) -> str | None:
    """Why the native CPU library cannot run any layer of c here (None: it can)."""
    if c.device_type != "cpu":
        return "CPU only"
    if not cpu_ops.AVAILABLE:
        return "the native library is not built or VLLM_QUAROT_NO_EXT=1"
    return None


class NativeCPULinearKernel(QuaRotLinearKernel):
    fuses_hadamard = True

    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        if (why := native_cpu_unavailable(c)) is not None:
            return False, why
        if c.a_bits is None:
            return False, "no weight-only GEMM (16-bit activations)"
        if not cpu_ops.can_run(c.w_bits, c.in_features, c.group_size):
            return False, (f"{c.w_bits}-bit weights with K={c.in_features}, group "
                           f"{c.group_size} are not aligned for it")
        return True, None

    @classmethod
    def describe(cls) -> str:
        return f"native CPU kernels ({cpu_ops.isa()})"

    def process_weights_after_loading(self, layer, codes, scale) -> None:
        register(layer, "weight_repacked",
                 torch.ops.quarot_cpu.repack_weight(codes, self.config.w_bits))
        register(layer, "weight_scale_t", torch.ops.quarot_cpu.repack_scale(scale))

    def apply_weights(self, layer, x, bias):
        c = self.config
        return torch.ops.quarot_cpu.linear(
            x, layer.quarot_had_k if c.online_hadamard else None,
            layer.weight_repacked, layer.weight_scale_t, bias, c.out_features, c.w_bits,
            c.a_bits, c.clip_ratio, layer.input_scale if c.static else None)
