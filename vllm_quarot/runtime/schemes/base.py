"""What every QuaRot scheme stores: integer weight codes packed into int32 along the
input dimension (compressed-tensors' layout) and float32 scales per output channel or
per group of inputs."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from vllm_quarot.format import CheckpointFormatError, QuaRotFormat
from vllm_quarot.runtime.kernels.base import LinearConfig


class QuaRotScheme:
    def __init__(self, fmt: QuaRotFormat, weight: tuple[int, int] | None = None):
        """weight: (bits, group size) when they are not the checkpoint's (lm_head)."""
        self.fmt = fmt
        self.w_bits, self.group_size = weight or (fmt.weight.bits, fmt.weight.group_size)

    @property
    def a_bits(self) -> int | None:
        return None

    @property
    def static(self) -> bool:
        return False

    @property
    def clip_ratio(self) -> float:
        return 1.0

    def create_weights(self, layer: torch.nn.Module, prefix: str, in_features: int,
                       output_partition_sizes: list[int], weight_loader: Callable) -> None:
        n, k, bits = sum(output_partition_sizes), in_features, self.w_bits
        if (k * bits) % 32:
            raise CheckpointFormatError(
                f"{prefix}: input size {k} × {bits} bits is not a multiple of 32")
        gs = k if self.group_size == -1 else self.group_size
        if k % gs:
            raise CheckpointFormatError(
                f"{prefix}: group size {gs} does not divide the input size {k}")
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            data=torch.empty(n, k * bits // 32, dtype=torch.int32), input_dim=1,
            output_dim=0, packed_dim=1, packed_factor=Fraction(32, bits),
            weight_loader=weight_loader))
        scale = torch.empty(n, k // gs, dtype=torch.float32)
        layer.register_parameter("weight_scale", (
            ChannelQuantScaleParameter(data=scale, output_dim=0, weight_loader=weight_loader)
            if self.group_size == -1 else
            GroupQuantScaleParameter(data=scale, output_dim=0, input_dim=1,
                                     weight_loader=weight_loader)))

    def process_weights_after_loading(self, layer: torch.nn.Module, prefix: str) -> None:
        """Scheme-specific parameters after loading (e.g. a static input scale)."""

    def linear_config(self, in_features: int, out_features: int, params_dtype: torch.dtype,
                      online_hadamard: int, device_type: str) -> LinearConfig:
        return LinearConfig(
            w_bits=self.w_bits, group_size=self.group_size, a_bits=self.a_bits,
            clip_ratio=self.clip_ratio, static=self.static, in_features=in_features,
            out_features=out_features, params_dtype=params_dtype,
            online_hadamard=online_hadamard, device_type=device_type)
