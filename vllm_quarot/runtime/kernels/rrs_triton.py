"""The Triton kernels of runtime-smoothed layers (activation.smooth, Rotated Runtime
Smooth): GPUs, and CPU tensors under TRITON_INTERPRET=1 in CI.

``quarot_triton::smooth_quantize`` (gather into the smoothing order, group maxima,
per-token scale, codes) and ``quarot_triton::smooth_gemm`` (int8 × 4-bit tensor-core
dots, one K tile per smoothing group, its int32 partial sum scaled by the (token,
group) scale in float32), bit-exact to the reference ops on equal inputs. The online
R4 runs before them as the linear method's transform. Not yet run on a GPU (none was
lent to this project): correctness is checked under the interpreter only.
"""

from __future__ import annotations

import torch

from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel, register
from vllm_quarot.runtime.ops import triton as triton_ops


class TritonRRSKernel(QuaRotLinearKernel):
    smoothing = True

    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        if not triton_ops.usable(torch.device(c.device_type)):
            return False, "needs a CUDA device (or TRITON_INTERPRET=1) and triton"
        if c.a_bits is None or c.static:
            return False, "per-token activations only"
        if not triton_ops.can_run_smooth(c.w_bits, c.in_features, c.group_size,
                                         c.smooth_group):
            return False, (f"{c.w_bits}-bit weights, K={c.in_features}, group {c.group_size}, "
                           f"smoothing group {c.smooth_group}: 4-bit per-channel weights and "
                           f"smoothing groups of {triton_ops.SMOOTH_GROUP_SIZES} only")
        return True, None

    @classmethod
    def describe(cls) -> str:
        return "Triton RRS kernels" + (" (interpreted)" if triton_ops.INTERPRET else "")

    def process_weights_after_loading(self, layer, codes, scale) -> None:
        perm = layer.smooth_perm.data.long() if self.config.smooth_reorder else None
        ordered = codes if perm is None else codes[:, perm]
        register(layer, "weight_repacked", triton_ops.repack_weight(ordered, 4))
        # integer factors: the plain GEMM and its [G, N] scale layout
        register(layer, "weight_scale_rrs",
                 triton_ops.repack_scale(scale) if self.config.smooth_levels
                 else scale.reshape(-1).float().contiguous())

    def apply_weights(self, layer, x, bias):
        c = self.config
        x_q, x_s = torch.ops.quarot_triton.smooth_quantize(
            x, c.a_bits, c.clip_ratio, c.smooth_group,
            layer.smooth_perm if c.smooth_reorder else None, c.smooth_levels)
        if c.smooth_levels:  # the factors are in the codes: the per-token GEMM
            return torch.ops.quarot_triton.gemm(x_q, x_s, layer.weight_repacked,
                                                layer.weight_scale_rrs, bias, 4, x.dtype)
        return torch.ops.quarot_triton.smooth_gemm(x_q, x_s, layer.weight_repacked,
                                                   layer.weight_scale_rrs, bias, x.dtype)
