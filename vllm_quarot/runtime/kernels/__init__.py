"""QuaRot linear kernels and the per-platform choice among them.

Adding a kernel: one file here with a ``QuaRotLinearKernel`` subclass, and one line in
``_POSSIBLE_KERNELS``. ``VLLM_QUAROT_DISABLED_KERNELS`` (comma-separated class names)
switches kernels off; ``VLLM_QUAROT_NO_EXT=1`` is the short form for the native one.
"""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_quarot import envs
from vllm_quarot.runtime.kernels.base import LinearConfig, QuaRotLinearKernel
from vllm_quarot.runtime.kernels.native_cpu import NativeCPULinearKernel
from vllm_quarot.runtime.kernels.reference import ReferenceLinearKernel
from vllm_quarot.runtime.kernels.rrs_native_cpu import NativeCPURRSKernel
from vllm_quarot.runtime.kernels.rrs_reference import ReferenceRRSKernel
from vllm_quarot.runtime.kernels.rrs_triton import TritonRRSKernel
from vllm_quarot.runtime.kernels.triton import TritonLinearKernel
from vllm_quarot.runtime.kernels.vllm_int8 import VLLMInt8LinearKernel
from vllm_quarot.runtime.kernels.vllm_wna16 import VLLMWNA16LinearKernel

__all__ = [
    "LinearConfig",
    "NativeCPULinearKernel",
    "NativeCPURRSKernel",
    "QuaRotLinearKernel",
    "ReferenceLinearKernel",
    "ReferenceRRSKernel",
    "TritonLinearKernel",
    "TritonRRSKernel",
    "VLLMInt8LinearKernel",
    "VLLMWNA16LinearKernel",
    "choose_kernel",
]

logger = init_logger("vllm.quarot")

# First match wins: vLLM's own kernels where vLLM has one for the layer (W8A8 with clip
# 1.0, W4A16), ours where it has none (W4A4, clipped 8-bit activations), the reference
# ops anywhere.
# Runtime-smoothed layers (activation.smooth) have kernels of their own (``smoothing``):
# a layer is offered only the kernels of its kind.
_POSSIBLE_KERNELS: dict[str, list[type[QuaRotLinearKernel]]] = {
    "cpu": [VLLMInt8LinearKernel, NativeCPULinearKernel, NativeCPURRSKernel,
            VLLMWNA16LinearKernel, TritonLinearKernel, TritonRRSKernel,
            ReferenceLinearKernel, ReferenceRRSKernel],
    "cuda": [VLLMInt8LinearKernel, VLLMWNA16LinearKernel, TritonLinearKernel,
             TritonRRSKernel, ReferenceLinearKernel],
}


def choose_kernel(c: LinearConfig) -> type[QuaRotLinearKernel]:
    """The first kernel of the platform's list that can implement c; logs (once per
    kind of layer) the choice and why each kernel before it was skipped."""
    disabled = set(envs.VLLM_QUAROT_DISABLED_KERNELS)
    skipped: list[str] = []
    for cls in _POSSIBLE_KERNELS.get(c.device_type, [ReferenceLinearKernel]):
        if cls.smoothing != bool(c.smooth_group):
            continue
        if cls.__name__ in disabled:
            skipped.append(f"{cls.__name__}: in VLLM_QUAROT_DISABLED_KERNELS")
            continue
        ok, why = cls.can_implement(c)
        if ok:
            logger.info_once(
                "QuaRot %s layers run on %s [%s]%s", c.describe(), cls.describe(),
                cls.__name__, "; skipped: " + "; ".join(skipped) if skipped else "")
            return cls
        skipped.append(f"{cls.__name__}: {why}")
    raise ValueError(f"no QuaRot kernel can run {c.describe()} layers on "
                     f"{c.device_type}: " + "; ".join(skipped))
