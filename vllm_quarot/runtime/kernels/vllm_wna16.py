"""W4A16 on vLLM's own mixed-precision kernels (``choose_mp_linear_kernel``: Machete /
Marlin on GPUs, ``CPUWNA16LinearKernel`` on CPU).

QuaRot's symmetric int4 codes are exactly GPTQ's ``uint4b8`` codes minus 8, so the
checkpoint's tensors become compressed-tensors' WNA16 layout (int32 words of eight
codes + 8 along the input dimension, scales in the activation dtype) and vLLM's kernel
takes it from there (its own repacking, ISA choice and GEMM).

On CPUs with AMX, vLLM 0.32's CPU kernel quantizes bf16 activations to 8 bits when
``VLLM_CPU_INT4_W4A8`` is on (its default): a W4A16 checkpoint would then be served as
W4A8, which is another model. The glue turns that switch off for QuaRot's layers only
(``_exact_w4a16``) and checks afterwards that the layer took the 16-bit path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import vllm.envs
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    pack_quantized_values_into_int32,
)
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)
from vllm.scalar_type import scalar_types

from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel, request_amx


def _no_loader(*_args, **_kwargs) -> None:  # parameters built after loading
    return None


def _mp_config(c: LinearConfig) -> MPLinearLayerConfig:
    return MPLinearLayerConfig(
        full_weight_shape=(c.in_features, c.out_features),
        partition_weight_shape=(c.in_features, c.out_features),
        weight_type=scalar_types.uint4b8, act_type=c.params_dtype,
        group_size=c.group_size, zero_points=False)


@functools.cache
def _vllm_kernel(c: LinearConfig) -> type:
    """vLLM's choice for this layer (raises ValueError with its reasons if none)."""
    return choose_mp_linear_kernel(_mp_config(c))


@contextlib.contextmanager
def _exact_w4a16() -> Iterator[None]:
    """vLLM's CPU kernel reads ``envs.VLLM_CPU_INT4_W4A8`` when it processes a layer: an
    attribute set on the module wins over its lazy lookup, for this call only."""
    had = "VLLM_CPU_INT4_W4A8" in vars(vllm.envs)
    old = vars(vllm.envs).get("VLLM_CPU_INT4_W4A8")
    vllm.envs.VLLM_CPU_INT4_W4A8 = False
    try:
        yield
    finally:
        if had:
            vllm.envs.VLLM_CPU_INT4_W4A8 = old
        else:
            delattr(vllm.envs, "VLLM_CPU_INT4_W4A8")


class VLLMWNA16LinearKernel(QuaRotLinearKernel):
    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        if c.a_bits is not None or c.w_bits != 4:
            return False, "4-bit weight-only layers only"
        if c.params_dtype not in (torch.bfloat16, torch.float16):
            return False, f"vLLM's WNA16 kernels take bf16/fp16 activations, not {c.params_dtype}"
        try:
            kernel = _vllm_kernel(c)
        except ValueError as e:
            return False, f"vLLM has no kernel: {e}"
        if kernel.__name__ == "CPUWNA16LinearKernel" and not hasattr(
                torch.ops._C, "cpu_gemm_wna16"):
            # vLLM selects it without checking: its AVX2 build lacks the op
            return False, "this vLLM CPU build (no AVX-512) lacks cpu_gemm_wna16"
        return True, None

    @classmethod
    def describe(cls) -> str:
        return "vLLM's W4A16 kernels"

    def process_weights_after_loading(self, layer, codes, scale) -> None:
        c = self.config
        self.vllm_kernel_cls = _vllm_kernel(c)
        packed = pack_quantized_values_into_int32(codes.to(torch.int32) + 8,
                                                  scalar_types.uint4b8, packed_dim=1)
        for name in ("weight_packed", "weight_scale"):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            data=packed.contiguous(), input_dim=1, output_dim=0, packed_dim=1,
            packed_factor=8, weight_loader=_no_loader))
        s = scale.to(c.params_dtype).contiguous()
        layer.register_parameter("weight_scale", (
            ChannelQuantScaleParameter(data=s, output_dim=0, weight_loader=_no_loader)
            if s.shape[1] == 1 else
            GroupQuantScaleParameter(data=s, output_dim=0, input_dim=1,
                                     weight_loader=_no_loader)))
        self.vllm_kernel = self.vllm_kernel_cls(
            _mp_config(c), w_q_param_name="weight_packed", w_s_param_name="weight_scale",
            w_zp_param_name=None)
        if c.device_type == "cpu":
            request_amx()
        with _exact_w4a16():
            self.vllm_kernel.process_weights_after_loading(layer)
        if getattr(layer, "use_w4a8", False):
            raise RuntimeError(f"{self.vllm_kernel_cls.__name__} switched to 8-bit "
                               "activations: not a W4A16 layer")

    def apply_weights(self, layer, x, bias):
        return self.vllm_kernel.apply_weights(layer, x, bias)
