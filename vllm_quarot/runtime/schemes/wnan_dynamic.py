"""Weights and activations quantized, activations per token at run time with a clip
ratio (``w4a4``, ``w4a4kv4``, ``w4a8``, ``w4a8kv4``, ``w8a8``); the activation bits and
clip of one layer may differ from the checkpoint's (``activation.layer_bits``)."""

from __future__ import annotations

from vllm_quarot.format import QuaRotFormat
from vllm_quarot.runtime.schemes.base import QuaRotScheme


class QuaRotWnAnDynamic(QuaRotScheme):
    def __init__(self, fmt: QuaRotFormat, a_bits: int | None = None,
                 clip_ratio: float | None = None, weight: tuple[int, int] | None = None):
        super().__init__(fmt, weight)
        act = fmt.activation
        self._a_bits = act.bits if a_bits is None else a_bits
        self._clip = act.clip_ratio if clip_ratio is None else clip_ratio

    @property
    def a_bits(self) -> int | None:
        return self._a_bits

    @property
    def clip_ratio(self) -> float:
        return self._clip
