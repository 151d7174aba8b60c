"""The native CPU kernel of runtime-smoothed layers (activation.smooth, Rotated Runtime
Smooth; csrc/cpu/rrs.cpp: AVX512-VNNI, AVX2 or scalar, chosen at run time).

One call per layer: (online R4 Hadamard +) gather into the smoothing order + smoothing
+ per-token quantization, then the integer GEMM whose epilogue scales each K group's
partial sum by its (token, group) scale — bit-exact to ``quarot::smooth_quantize`` +
``quarot::smooth_int_linear`` on the same input; with integer factors the codes carry
them and the plain per-token GEMM runs (= ``quarot::int_linear``).
"""

from __future__ import annotations

import torch

from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel, register
from vllm_quarot.runtime.kernels.native_cpu import native_cpu_unavailable
from vllm_quarot.runtime.ops import cpu as cpu_ops


class NativeCPURRSKernel(QuaRotLinearKernel):
    fuses_hadamard = True
    smoothing = True

    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        if (why := native_cpu_unavailable(c)) is not None:
            return False, why
        if not cpu_ops.can_run_rrs(c.w_bits, c.in_features, c.group_size, c.smooth_group):
            return False, (f"{c.w_bits}-bit weights with K={c.in_features}, group "
                           f"{c.group_size}, smoothing group {c.smooth_group}: 4-bit "
                           "per-channel weights and groups of a multiple of 8 only")
        if c.a_bits is None or c.static:
            return False, "per-token activations only"
        return True, None

    @classmethod
    def describe(cls) -> str:
        return f"native CPU RRS kernels ({cpu_ops.isa()})"

    def process_weights_after_loading(self, layer, codes, scale) -> None:
        perm = layer.smooth_perm.data if self.config.smooth_reorder else None
        register(layer, "weight_repacked", torch.ops.quarot_cpu.rrs_repack_weight(codes, perm))
        # integer factors run the plain GEMM, which takes its scales as repack_scale lays
        # them out; float factors the RRS GEMM's per-channel vector
        register(layer, "weight_scale_rrs",
                 torch.ops.quarot_cpu.repack_scale(scale) if self.config.smooth_levels
                 else scale.reshape(-1).contiguous())

    def apply_weights(self, layer, x, bias):
        c = self.config
        return torch.ops.quarot_cpu.rrs_linear(
            x, layer.quarot_had_k if c.online_hadamard else None,
            layer.smooth_perm if c.smooth_reorder else None, layer.weight_repacked,
            layer.weight_scale_rrs, bias, c.out_features, c.a_bits, c.clip_ratio,
            c.smooth_group, c.smooth_levels)
