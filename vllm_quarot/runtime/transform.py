"""The online R4 rotation as a transform wrapped around any scheme's kernel (as
compressed-tensors' ``transform/`` wraps its schemes): down_proj's input becomes
x @ (H_K ⊗ H_2^k)/√n before the kernel, unless the kernel fuses it into its own
quantizer (``QuaRotLinearKernel.fuses_hadamard``).
"""

from __future__ import annotations

import torch

import vllm_quarot.runtime.ops.reference  # noqa: F401  (torch.ops.quarot.hadamard)
from vllm_quarot.format import OnlineHadamard
from vllm_quarot.hadamard import hadamard_factor
from vllm_quarot.runtime.ops import cpu as cpu_ops


class HadamardTransform:
    """R4 of the checkpoint (its construction was verified against this version's when
    the format was read). A tensor-parallel checkpoint's R4 is block-diagonal: the
    linear method runs one block per part (``spec.block_size`` inputs each)."""

    def __init__(self, spec: OnlineHadamard):
        self.spec = spec

    def process_weights_after_loading(self, layer: torch.nn.Module,
                                      device: torch.device) -> None:
        """Keep the dense K×K factor of one block on the (part of the) layer: the fused
        kernels read it there."""
        had = hadamard_factor(self.spec.block_size, torch.float32).to(device)
        layer.register_buffer("quarot_had_k", had, persistent=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and cpu_ops.AVAILABLE:
            return torch.ops.quarot_cpu.hadamard(x.contiguous(), layer.quarot_had_k)
        return torch.ops.quarot.hadamard(x, layer.quarot_had_k)
