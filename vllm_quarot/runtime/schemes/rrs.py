"""Rotated Runtime Smooth (``activation.smooth``, the quantizer's ``--smooth runtime``):
4-bit per-channel weights and per-token activations whose (rotated) input channels are
smoothed at run time in groups, each group's partial sum scaled in the GEMM's epilogue.

With ``smooth.reorder`` every linear stores ``smooth_perm`` (int32 [K]: the channel
order whose consecutive groups share a smoothing factor); the linears vLLM merges
(q/k/v_proj, gate/up_proj) share one input and must store the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from vllm_quarot.format import CheckpointFormatError, QuaRotFormat
from vllm_quarot.quant import smooth_factor_levels
from vllm_quarot.runtime.kernels.base import LinearConfig
from vllm_quarot.runtime.schemes.wnan_dynamic import QuaRotWnAnDynamic


def _perm_loader(prefix: str) -> Callable:
    """Loads a shard's channel order; the shards of a merged layer must agree."""

    def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        loaded = loaded.reshape(-1)
        if loaded.shape != param.shape:
            raise CheckpointFormatError(
                f"{prefix}.smooth_perm: shape {list(loaded.shape)}, expected {list(param.shape)}")
        if getattr(param, "quarot_loads", 0) and not torch.equal(param.data, loaded.to(
                param.dtype)):
            raise CheckpointFormatError(
                f"{prefix}.smooth_perm: the linears merged into {prefix} share one input but "
                "store different channel orders")
        param.data.copy_(loaded)
        param.quarot_loads = getattr(param, "quarot_loads", 0) + 1

    return load


class QuaRotRRS(QuaRotWnAnDynamic):
    def __init__(self, fmt: QuaRotFormat, a_bits: int | None = None,
                 clip_ratio: float | None = None):
        super().__init__(fmt, a_bits, clip_ratio)
        assert fmt.activation is not None and fmt.activation.smooth is not None
        self.smooth = fmt.activation.smooth

    def create_weights(self, layer, prefix, in_features, output_partition_sizes,
                       weight_loader) -> None:
        super().create_weights(layer, prefix, in_features, output_partition_sizes,
                               weight_loader)
        if in_features % self.smooth.group_size:
            raise CheckpointFormatError(
                f"{prefix}: smoothing group size {self.smooth.group_size} does not divide "
                f"the input size {in_features}")
        if self.smooth.reorder:
            perm = torch.nn.Parameter(torch.full((in_features,), -1, dtype=torch.int32),
                                      requires_grad=False)
            perm.weight_loader = _perm_loader(prefix)
            layer.register_parameter("smooth_perm", perm)
        layer.quarot_smooth_shards = len(output_partition_sizes)

    def process_weights_after_loading(self, layer, prefix) -> None:
        if not self.smooth.reorder:
            return
        perm = layer.smooth_perm
        loads = getattr(perm, "quarot_loads", 0)
        if loads < layer.quarot_smooth_shards:
            raise CheckpointFormatError(
                f"{prefix}.smooth_perm: missing from the checkpoint ({loads} of "
                f"{layer.quarot_smooth_shards} shards loaded)")
        k = perm.numel()
        if not torch.equal(torch.sort(perm.data.long()).values, torch.arange(k)):
            raise CheckpointFormatError(
                f"{prefix}.smooth_perm is not a permutation of the {k} input channels")

    def linear_config(self, in_features: int, out_features: int, params_dtype: torch.dtype,
                      online_hadamard: int, device_type: str) -> LinearConfig:
        c = super().linear_config(in_features, out_features, params_dtype, online_hadamard,
                                  device_type)
        return dataclasses.replace(
            c, smooth_group=self.smooth.group_size, smooth_reorder=self.smooth.reorder,
            smooth_levels=smooth_factor_levels(self.smooth.factor_levels, c.a_bits))
