"""Weights and activations quantized, activations per token at run time with a clip
ratio (``w4a4``, ``w4a4kv4``, ``w8a8``)."""

from __future__ import annotations

from vllm_quarot.runtime.schemes.base import QuaRotScheme


class QuaRotWnAnDynamic(QuaRotScheme):
    @property
    def a_bits(self) -> int | None:
        return self.fmt.activation.bits

    @property
    def clip_ratio(self) -> float:
        return self.fmt.activation.clip_ratio
