"""Online transforms wrapped around any scheme's kernel (as compressed-tensors'
``transform/`` wraps its schemes): the R4 rotation — down_proj's input becomes
x @ (H_K ⊗ H_2^k)/√n before the kernel, unless the kernel fuses it into its own
quantizer (``QuaRotLinearKernel.fuses_hadamard``) — and the stored matrices of an
imported compressed-tensors checkpoint (``MatrixTransform``).
"""

from __future__ import annotations

import torch

import vllm_quarot.runtime.ops.reference  # noqa: F401  (torch.ops.quarot.hadamard)
from vllm_quarot.format import OnlineHadamard
from vllm_quarot.hadamard import hadamard_factor
from vllm_quarot.runtime.ops import cpu as cpu_ops
from vllm_quarot.stored_transforms import apply_matrix


class HadamardTransform:
    """R4 of the checkpoint (its construction was verified against this version's when
    the format was read). A tensor-parallel checkpoint's R4 is block-diagonal: the
    linear method runs one block per part (``spec.block_size`` inputs each)."""

    def __init__(self, spec: OnlineHadamard):
        self.spec = spec

    @property
    def fusable_size(self) -> int:
        """The order of one block, for kernels that fuse R4 into their quantizer."""
        return self.spec.block_size

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


class MatrixTransform:
    """A stored online transform (``rotation.input_transforms``: an imported
    compressed-tensors checkpoint): x @ M / √n, block-diagonally over the input when M
    (n × n) is smaller than it. A random Hadamard (signs · A ⊗ H_P, as compressed-tensors
    builds them; ``stored_transforms.factor_hadamard``) runs as signs then the online
    Hadamard op with the K×K factor A; any other matrix as a float32 matmul. No kernel
    fuses it (``fusable_size`` 0)."""

    fusable_size = 0

    def __init__(self, name: str, matrix: torch.Tensor,
                 factors: tuple[torch.Tensor, torch.Tensor] | None):
        self.name = name
        self.matrix = matrix  # normalised float32 [n, n]
        self.factors = factors  # (signs d [n], K×K factor A) or None

    def process_weights_after_loading(self, layer: torch.nn.Module,
                                      device: torch.device) -> None:
        if self.factors is None:
            layer.register_buffer("quarot_transform", self.matrix.to(device),
                                  persistent=False)
            return
        d, a = self.factors
        layer.register_buffer("quarot_signs", d.to(device), persistent=False)
        layer.register_buffer("quarot_had_k", a.to(device), persistent=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.factors is None:
            return apply_matrix(x, layer.quarot_transform)
        n = layer.quarot_signs.shape[0]
        shape = x.shape
        xs = (x.reshape(-1, n) * layer.quarot_signs.to(x.dtype)).contiguous()
        if xs.device.type == "cpu" and cpu_ops.AVAILABLE:
            y = torch.ops.quarot_cpu.hadamard(xs, layer.quarot_had_k)
        else:
            y = torch.ops.quarot.hadamard(xs, layer.quarot_had_k)
        return y.reshape(shape)
