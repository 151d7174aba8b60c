"""QuaRot schemes: what a checkpoint's linear layers store and compute, one file each.

A scheme declares its parameters (``create_weights``) and turns them, after loading,
into the ``LinearConfig`` a kernel is chosen for. Adding a scheme: one file here and
one line in ``scheme_for``.
"""

from __future__ import annotations

from vllm_quarot.format import QuaRotFormat
from vllm_quarot.runtime.schemes.base import QuaRotScheme
from vllm_quarot.runtime.schemes.w8a8_static import QuaRotW8A8Static
from vllm_quarot.runtime.schemes.wna16 import QuaRotWnA16
from vllm_quarot.runtime.schemes.wnan_dynamic import QuaRotWnAnDynamic

__all__ = ["QuaRotScheme", "lm_head_scheme", "scheme_for"]


def scheme_for(fmt: QuaRotFormat, prefix: str = "") -> QuaRotScheme:
    """The scheme of the checkpoint's quantized linear layer ``prefix`` (vLLM's name; a
    merged layer's canonical parts come from the model map): activation bits may differ
    per layer (layer_bits)."""
    act = fmt.activation
    if act is None:
        return QuaRotWnA16(fmt)
    if act.static:
        return QuaRotW8A8Static(fmt)
    bits, clip = act.for_module(prefix) if prefix else (act.bits, act.clip_ratio)
    return QuaRotWnAnDynamic(fmt, bits, clip)


def lm_head_scheme(fmt: QuaRotFormat) -> QuaRotScheme:
    """The scheme of a quantized lm_head (format v5 ``lm_head``): its own weight bits
    and group size; 8-bit per-token activations without clipping, or 16-bit."""
    spec = fmt.lm_head
    assert spec is not None
    weight = (spec.bits, spec.group_size)
    if spec.activation_bits is None:
        return QuaRotWnA16(fmt, weight=weight)
    return QuaRotWnAnDynamic(fmt, spec.activation_bits, 1.0, weight=weight)
