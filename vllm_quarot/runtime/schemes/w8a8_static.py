"""Activations with one calibrated per-tensor scale (``w8a8-static``, AMD Quark's
setting): the checkpoint stores ``input_scale`` per linear (q/k/v and gate/up share
their input and store equal values; the merged layer keeps their maximum)."""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import PerTensorScaleParameter

from vllm_quarot.format import CheckpointFormatError
from vllm_quarot.runtime.schemes.wnan_dynamic import QuaRotWnAnDynamic


class QuaRotW8A8Static(QuaRotWnAnDynamic):
    @property
    def static(self) -> bool:
        return True

    def create_weights(self, layer, prefix, in_features, output_partition_sizes,
                       weight_loader) -> None:
        super().create_weights(layer, prefix, in_features, output_partition_sizes,
                               weight_loader)
        # one scale per logical shard, NaN until loaded
        layer.register_parameter("input_scale", PerTensorScaleParameter(
            data=torch.full((len(output_partition_sizes),), float("nan")),
            weight_loader=weight_loader))

    def process_weights_after_loading(self, layer, prefix) -> None:
        scale = layer.input_scale.data
        if torch.isnan(scale).any():
            raise CheckpointFormatError(f"{prefix}: input_scale missing from checkpoint")
        layer.input_scale = torch.nn.Parameter(scale.max().reshape(1), requires_grad=False)
