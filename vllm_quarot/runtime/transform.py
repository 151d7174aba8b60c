"""Online transforms wrapped around any scheme's kernel (as compressed-tensors'
``transform/`` wraps its schemes): the R4 rotation — down_proj's input becomes
x @ (H_K ⊗ H_2^k)/√n before the kernel, unless the kernel fuses it into its own
quantizer (``QuaRotLinearKernel.fuses_hadamard``) — and the stored matrices of an
imported compressed-tensors checkpoint (``MatrixTransform``).
"""

from __future__ import annotations

import math

import torch

import vllm_quarot.runtime.ops.reference  # noqa: F401  (torch.ops.quarot.hadamard)
from vllm_quarot.format import OnlineHadamard
from vllm_quarot.hadamard import fwht, hadamard_factor
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
        return _hadamard_op(x, layer.quarot_had_k)


def _hadamard_op(x: torch.Tensor, had_k: torch.Tensor) -> torch.Tensor:
    """x @ (had_k ⊗ H_2^k)/√n: the native CPU op where it is built, else the reference."""
    if x.device.type == "cpu" and cpu_ops.AVAILABLE:
        return torch.ops.quarot_cpu.hadamard(x.contiguous(), had_k)
    return torch.ops.quarot.hadamard(x, had_k)


class MatrixTransform:
    """A stored online transform (``rotation.input_transforms``: an imported
    compressed-tensors checkpoint): x @ M / √n, block-diagonally over the input when M
    (n × n) is smaller than it, computed in float32. A random Hadamard of compressed-
    tensors (signs · A ⊗ H_P, ``stored_transforms.factor_hadamard``) runs as signs, a
    Walsh–Hadamard of P and one GEMM with the K×K factor A over all rows — on the
    online Hadamard op when P ≥ 32 (its vectorized case), in PyTorch when P ≥ 8 — and
    any other matrix as one float32 matmul (cheaper there: measured, benchmarks/results/
    README.md#beside-llm-compressor). No kernel fuses it (``fusable_size`` 0)."""

    fusable_size = 0

    def __init__(self, name: str, matrix: torch.Tensor,
                 factors: tuple[torch.Tensor, torch.Tensor] | None):
        self.name = name
        self.matrix = matrix  # normalised float32 [n, n]
        n = matrix.shape[0]
        p = n // factors[1].shape[0] if factors is not None else 1
        self.mode = "hadamard-op" if p >= 32 else "factored" if p >= 8 else "dense"
        self.factors = factors if self.mode != "dense" else None

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
        d, a = layer.quarot_signs, layer.quarot_had_k
        n, k = d.shape[0], a.shape[0]
        rows = x.numel() // n
        if self.mode == "hadamard-op":
            return _hadamard_op(x.reshape(rows, n) * d.to(x.dtype), a).reshape(x.shape)
        p = n // k  # "factored": the K part of every row in one (K × K) @ (K × rows·P)
        y = fwht((x.reshape(rows, n).float() * d).reshape(rows, k, p))
        y = (a.t() @ y.transpose(0, 1).reshape(k, rows * p)).reshape(k, rows, p)
        return (y.transpose(0, 1).reshape(x.shape) * (1.0 / math.sqrt(n))).to(x.dtype)
