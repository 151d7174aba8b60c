"""W8A8 on vLLM's own int8 kernels (``init_int8_linear_kernel``: oneDNN on CPU,
CUTLASS on GPUs), for 8-bit per-channel weights with activations quantized per token
at clip 1.0 (vLLM's dynamic quantizer has no clip ratio) or with a calibrated
per-tensor scale (the clip is inside the scale). Clipped dynamic activations keep
QuaRot's kernels.

On CPU vLLM has two int8 paths, chosen per layer by ``check_cpu_sgl_kernel``: on CPUs
with AMX, symmetric activations and K % 32 == N % 16 == 0, its AMX kernel (which
quantizes the activations per token itself, so it cannot take a static input scale,
and takes bf16/fp16 activations only: static or float32 layers of that shape keep
QuaRot's kernels); otherwise oneDNN. The kernel is used
only where it is exact: vLLM's oneDNN int8 GEMM saturates int16 sums on CPUs without
VNNI (measured on an AVX2 EPYC: 5–30 % relative error with full-range int8 weight
codes), so the first use of each path runs a small probe against the exact integer
product and falls back to QuaRot's kernels when it disagrees.
"""

from __future__ import annotations

import functools

import torch
from vllm.model_executor.kernels.linear import init_int8_linear_kernel
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
)

import vllm_quarot.runtime.ops.reference  # noqa: F401  (torch.ops.quarot.*)
from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel, request_amx


def _no_loader(*_args, **_kwargs) -> None:  # parameters built after loading
    return None


def _build(layer: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor,
           input_scale: torch.Tensor | None, dtype: torch.dtype, name: str):
    """Register vLLM's W8A8 parameters on layer and return its processed kernel."""
    for attr in ("weight", "weight_scale", "input_scale", "input_zero_point", "azp_adj"):
        if hasattr(layer, attr):
            delattr(layer, attr)
    layer.register_parameter("weight", ModelWeightParameter(
        data=codes.contiguous(), input_dim=1, output_dim=0, weight_loader=_no_loader))
    layer.register_parameter("weight_scale", ChannelQuantScaleParameter(
        data=scale.float().contiguous(), output_dim=0, weight_loader=_no_loader))
    layer.register_parameter("input_scale", None if input_scale is None else BasevLLMParameter(
        data=input_scale.float().reshape(1).clone(), weight_loader=_no_loader))
    layer.register_parameter("input_zero_point", None)
    layer.register_parameter("azp_adj", None)
    if not hasattr(layer, "bias"):  # the AMX path reads layer.bias (TP parts have none)
        layer.register_parameter("bias", None)
    layer.logical_widths = [codes.shape[0]]
    if codes.device.type == "cpu":
        request_amx()
    kernel = init_int8_linear_kernel(is_channelwise=True,
                                     is_static_input_scheme=input_scale is not None,
                                     input_symmetric=True, module_name=name)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the oneDNN handler's output dtype
    try:
        kernel.process_weights_after_loading(layer)
    finally:
        torch.set_default_dtype(prev)
    return kernel


def amx_path(n: int, k: int) -> bool:
    """vLLM picks its AMX int8 kernel for a symmetric N×K layer (else oneDNN)."""
    import vllm.model_executor.kernels.linear.scaled_mm.cpu as cpu_mm
    from vllm.platforms import CpuArchEnum, current_platform

    # the very function vLLM's kernel asks, through its module
    return (current_platform.get_cpu_architecture() == CpuArchEnum.X86
            and cpu_mm.check_cpu_sgl_kernel(n, k, torch.int8))


@functools.cache
def cpu_probe_error(amx: bool) -> float:
    """Relative error of vLLM's CPU int8 GEMM on full-range codes (float32, K = 512)
    against the exact integer product of the same activation codes, on its oneDNN path
    (N = 24, a shape the AMX kernel does not take) or its AMX one (N = 64, bf16: the
    exact result rounded to bf16 is the reference, and a rounding tie in the kernel's
    own activation quantizer may move one code, so its error floor is ~1e-3)."""
    g = torch.Generator().manual_seed(0)
    n, k = (64 if amx else 24), 512
    dtype = torch.bfloat16 if amx else torch.float32
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=g) * 0.01 + 0.001
    x = torch.randn(4, k, generator=g).to(dtype)
    layer = torch.nn.Module()
    kernel = _build(layer, codes, scale, None, dtype, "quarot-probe")
    out = kernel.apply_weights(layer, x, None).float()
    x_q, x_s = torch.ops.quarot.quantize_per_token(x, 8, 1.0)
    ref = torch.ops.quarot.int_linear(x_q, x_s, codes, scale, None, dtype).float()
    return ((out - ref).abs().max() / ref.abs().max()).item()


# the largest probe error accepted: float32 outputs are exact to rounding; bf16 ones
# carry the output rounding (2^-9) and a possible tie-broken activation code
PROBE_TOL = {False: 1e-4, True: 1e-2}


class VLLMInt8LinearKernel(QuaRotLinearKernel):
    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        if c.w_bits != 8 or c.a_bits != 8 or c.group_size != -1:
            return False, "8-bit per-channel weights with 8-bit activations only"
        if not c.static and c.clip_ratio != 1.0:
            return False, f"activation clip ratio {c.clip_ratio} (vLLM's quantizer has none)"
        if c.device_type == "cuda" and c.params_dtype not in (torch.bfloat16, torch.float16):
            return False, "CUTLASS int8 takes bf16/fp16 outputs"
        if c.device_type == "cpu":
            amx = amx_path(c.out_features, c.in_features)
            if amx and c.static:
                return False, ("vLLM's AMX int8 kernel quantizes activations per token: it "
                               "cannot apply the checkpoint's static input scale")
            if amx and c.params_dtype not in (torch.bfloat16, torch.float16):
                return False, (f"vLLM's AMX int8 kernel takes bf16/fp16 activations, not "
                               f"{c.params_dtype}")
            err = cpu_probe_error(amx)
            if err > PROBE_TOL[amx]:
                path = "AMX" if amx else "oneDNN"
                return False, (f"vLLM's {path} int8 GEMM is inexact on this CPU ({err:.1%} "
                               "error on a full-range probe: int16 saturation without VNNI)")
        return True, None

    @classmethod
    def describe(cls) -> str:
        return "vLLM's int8 kernels"

    def process_weights_after_loading(self, layer, codes, scale) -> None:
        c = self.config
        self.vllm_kernel = _build(layer, codes, scale,
                                  layer.input_scale.data if c.static else None,
                                  c.params_dtype, "QuaRotW8A8")

    def apply_weights(self, layer, x, bias):
        if bias is not None and getattr(layer, "bias", None) is None and getattr(
                self.vllm_kernel, "linear_method", None) == self.vllm_kernel._apply_weights_sgl:
            # the AMX path adds layer.bias_fp32 (made from layer.bias at load), not the
            # bias it is given: a TP part holds no bias of its own
            out = self.vllm_kernel.apply_weights(layer, x, None)
            return (out.float() + bias.float()).to(out.dtype)
        return self.vllm_kernel.apply_weights(layer, x, bias)
