"""vLLM linear method for QuaRot layers: packed low-bit weights, optional online R4
Hadamard (down_proj), per-token activation quantization and integer GEMM."""

from __future__ import annotations

from fractions import Fraction

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)

import vllm_quarot.runtime.ops.reference  # noqa: F401  (registers torch.ops.quarot.*)
from vllm_quarot.format import CheckpointFormatError, QuaRotFormat
from vllm_quarot.hadamard import HadamardSizeError, hadamard_factor
from vllm_quarot.quant import unpack_weight
from vllm_quarot.runtime.kernels import vllm_wna16
from vllm_quarot.runtime.ops import cpu as cpu_ops
from vllm_quarot.runtime.ops import triton as triton_ops

logger = init_logger("vllm.quarot")  # under "vllm": printed with its log config


@register_weight_loader_v2_supported_method
class QuaRotLinearMethod(LinearMethodBase):
    """One instance per linear layer; ``online_hadamard`` is set for down_proj."""

    def __init__(self, fmt: QuaRotFormat, online_hadamard: bool, prefix: str):
        self.fmt = fmt
        self.online_hadamard = online_hadamard
        self.prefix = prefix
        act = fmt.activation
        self.static = act is not None and act.static

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        w = self.fmt.weight
        weight_loader = extra_weight_attrs["weight_loader"]
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        if self.online_hadamard and k != input_size:
            raise CheckpointFormatError(
                f"{self.prefix}: the online Hadamard before down_proj spans the whole "
                "intermediate size; tensor parallelism > 1 is not supported yet"
            )
        if (k * w.bits) % 32:
            raise CheckpointFormatError(
                f"{self.prefix}: input size {k} × {w.bits} bits is not a multiple of 32"
            )
        gs = k if w.group_size == -1 else w.group_size
        if k % gs:
            raise CheckpointFormatError(
                f"{self.prefix}: group size {gs} does not divide the input size {k}"
            )
        layer.register_parameter(
            "weight_packed",
            PackedvLLMParameter(
                data=torch.empty(n, k * w.bits // 32, dtype=torch.int32),
                input_dim=1,
                output_dim=0,
                packed_dim=1,
                packed_factor=Fraction(32, w.bits),
                weight_loader=weight_loader,
            ),
        )
        scale_data = torch.empty(n, k // gs, dtype=torch.float32)
        if w.group_size == -1:
            scale = ChannelQuantScaleParameter(
                data=scale_data, output_dim=0, weight_loader=weight_loader
            )
        else:
            scale = GroupQuantScaleParameter(
                data=scale_data, output_dim=0, input_dim=1, weight_loader=weight_loader
            )
        layer.register_parameter("weight_scale", scale)
        if self.static:
            # one scale per logical shard (q, k, v share their input: equal values)
            layer.register_parameter("input_scale", PerTensorScaleParameter(
                data=torch.full((len(output_partition_sizes),), float("nan")),
                weight_loader=weight_loader,
            ))
        layer.quarot_in_features = k
        layer.quarot_out_features = n
        layer.quarot_params_dtype = params_dtype

    def _backend(self, layer: torch.nn.Module, device: torch.device) -> str:
        """'native' (csrc/cpu), 'vllm_wna16' (vLLM's CPU W4A16 kernel), 'triton' (GPU, or
        CPU under TRITON_INTERPRET=1 when the native library is off) or 'reference'
        (the torch ops, anywhere)."""
        w = self.fmt.weight
        k = layer.quarot_in_features
        if (device.type == "cpu" and self.fmt.activation is not None
                and cpu_ops.can_run(w.bits, k, w.group_size)):
            return "native"
        if (device.type == "cpu" and self.fmt.activation is None and vllm_wna16.can_run(
                w.bits, k, layer.quarot_out_features, w.group_size,
                layer.quarot_params_dtype)):
            return "vllm_wna16"
        if triton_ops.usable(device) and triton_ops.can_run(w.bits, k, w.group_size):
            if not self.online_hadamard:
                return "triton"
            try:
                triton_ops.hadamard_plan(k)
                return "triton"
            except HadamardSizeError:
                pass
        return "reference"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack once into the layout of the kernels that serve this layer (4-bit stays
        4-bit for the native CPU and Triton kernels), else unpack to the int8 codes of
        the reference ops."""
        w = self.fmt.weight
        codes = unpack_weight(layer.weight_packed.data, w.bits, layer.quarot_in_features)
        del layer.weight_packed
        scale = layer.weight_scale.data.float().contiguous()
        layer.quarot_backend = self._backend(layer, codes.device)
        logger.info_once("QuaRot linear layers run on %s", {
            "native": f"native CPU kernels ({cpu_ops.isa()})",
            "vllm_wna16": "vLLM's CPU W4A16 kernel (cpu_gemm_wna16)",
            "triton": "Triton kernels" + (" (interpreted)" if triton_ops.INTERPRET else ""),
            "reference": "the reference torch ops",
        }[layer.quarot_backend])
        repack = {
            "native": lambda: (torch.ops.quarot_cpu.repack_weight(codes, w.bits),
                               torch.ops.quarot_cpu.repack_scale(scale)),
            "vllm_wna16": lambda: vllm_wna16.repack(codes, scale, layer.quarot_params_dtype),
            "triton": lambda: (triton_ops.repack_weight(codes, w.bits),
                               triton_ops.repack_scale(scale)),
        }.get(layer.quarot_backend)
        if repack is not None:
            w_rep, scale_rep = repack()
            layer.weight_repacked = torch.nn.Parameter(w_rep, requires_grad=False)
            layer.weight_scale_t = torch.nn.Parameter(scale_rep, requires_grad=False)
            del layer.weight_scale
        else:
            layer.weight_q = torch.nn.Parameter(codes, requires_grad=False)
            layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        if self.static:
            scale = layer.input_scale.data
            if torch.isnan(scale).any():
                raise CheckpointFormatError(f"{self.prefix}: input_scale missing from checkpoint")
            layer.input_scale = torch.nn.Parameter(scale.max().reshape(1), requires_grad=False)
        layer.quarot_fused_hadamard = False
        dynamic = self.fmt.activation is not None and not self.static
        if self.online_hadamard and dynamic and layer.quarot_backend == "triton":
            layer.quarot_fused_hadamard = triton_ops.fused_hadamard_fits(
                layer.quarot_in_features, codes.device, torch.get_default_dtype())
            if not layer.quarot_fused_hadamard:
                logger.warning_once(
                    "%s: the fused Hadamard + quantize kernel of order %d does not fit this "
                    "GPU; the Hadamard runs as a separate op", self.prefix,
                    layer.quarot_in_features)
        if self.online_hadamard:
            had = hadamard_factor(layer.quarot_in_features, torch.float32)
            layer.register_buffer("quarot_had_k", had, persistent=False)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self._apply_2d(layer, x.reshape(-1, x.shape[-1]), bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _apply_2d(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        act = self.fmt.activation
        if layer.quarot_backend == "native":
            # one native call: (R4 Hadamard +) quantize + integer GEMM + dequant
            return torch.ops.quarot_cpu.linear(
                x, layer.quarot_had_k if self.online_hadamard else None,
                layer.weight_repacked, layer.weight_scale_t, bias,
                layer.quarot_out_features, self.fmt.weight.bits, act.bits, act.clip_ratio,
                layer.input_scale if self.static else None,
            )
        if layer.quarot_backend == "triton":
            return self._apply_triton(layer, x, bias)
        if layer.quarot_backend == "vllm_wna16":
            if self.online_hadamard:
                had = torch.ops.quarot_cpu.hadamard if cpu_ops.AVAILABLE else (
                    torch.ops.quarot.hadamard)
                x = had(x.contiguous(), layer.quarot_had_k)
            return vllm_wna16.linear(x, layer.weight_repacked, layer.weight_scale_t, bias)
        if self.online_hadamard:
            x = torch.ops.quarot.hadamard(x, layer.quarot_had_k)
        if act is None:
            return torch.ops.quarot.wna16_linear(x, layer.weight_q, layer.weight_scale, bias)
        if self.static:
            x_q = torch.ops.quarot.quantize_static(x, layer.input_scale, act.bits)
            x_s = layer.input_scale.expand(x.shape[0], 1)
        else:
            x_q, x_s = torch.ops.quarot.quantize_per_token(x, act.bits, act.clip_ratio)
        return torch.ops.quarot.int_linear(
            x_q, x_s, layer.weight_q, layer.weight_scale, bias, x.dtype
        )

    def _apply_triton(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        act = self.fmt.activation
        gemm = torch.ops.quarot_triton.gemm
        bits = self.fmt.weight.bits
        fused = layer.quarot_fused_hadamard  # only set for dynamic per-token activations
        if self.online_hadamard and not fused:
            x = torch.ops.quarot.hadamard(x, layer.quarot_had_k)
        if act is None or self.static:
            if act is None:  # W4A16: codes dequantized inside the GEMM
                return gemm(x, None, layer.weight_repacked, layer.weight_scale_t, bias,
                            bits, x.dtype)
            x_q = torch.ops.quarot.quantize_static(x, layer.input_scale, act.bits)
            x_s = layer.input_scale.expand(x.shape[0], 1)
        else:  # (R4 Hadamard +) per-token quantize in one kernel
            x_q, x_s = torch.ops.quarot_triton.quantize(x, fused, act.bits, act.clip_ratio)
        return gemm(x_q, x_s, layer.weight_repacked, layer.weight_scale_t, bias, bits,
                    x.dtype)
