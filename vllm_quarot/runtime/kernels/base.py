"""The interface every QuaRot linear kernel implements (as vLLM's ``MPLinearKernel``).

A kernel is chosen per layer at load (``choose_kernel``): the first class of the
platform's priority list whose ``can_implement`` accepts the layer's ``LinearConfig``.
It receives the checkpoint's integer codes once, repacks them into its own layout in
``process_weights_after_loading``, and computes ``y = x Ŵᵀ + b`` in ``apply_weights``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearConfig:
    """What one linear layer (this rank's partition) computes."""

    w_bits: int  # 4 or 8: symmetric integer codes
    group_size: int  # -1: one scale per output channel, else per group of inputs
    a_bits: int | None  # None: 16-bit activations (weight-only)
    clip_ratio: float  # activation clip ratio of the per-token quantizer
    static: bool  # activations use a calibrated per-tensor scale (``input_scale``)
    in_features: int
    out_features: int
    params_dtype: torch.dtype  # the model's activation dtype
    online_hadamard: int  # order of the online R4 applied to the input first; 0: none
    device_type: str  # "cpu" or "cuda"
    # Rotated Runtime Smooth (activation.smooth): activation scales per (token, group of
    # smooth_group input channels), channels in the layer's ``smooth_perm`` order when
    # smooth_reorder; 0: per-token activations
    smooth_group: int = 0
    smooth_reorder: bool = False
    # integer smoothing factors 1..L (quant.smooth_factor_levels; 0: float factors): the
    # codes carry them, the GEMM is the plain per-token one
    smooth_levels: int = 0

    def describe(self) -> str:
        """E.g. 'W4A4 per-channel + R4' (the engine log names layers by it)."""
        act = "16" if self.a_bits is None else f"{self.a_bits}"
        mode = " static" if self.static else ""
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        r4 = " + R4" if self.online_hadamard else ""
        rrs = ""
        if self.smooth_group:
            rrs = (f" + RRS g{self.smooth_group}" + (" reordered" if self.smooth_reorder else "")
                   + (f" int factors 1..{self.smooth_levels}" if self.smooth_levels else ""))
        return f"W{self.w_bits}A{act}{mode} {group}{r4}{rrs}"


class QuaRotLinearKernel(ABC):
    """One way to compute a QuaRot linear layer.

    ``fuses_hadamard`` is a capability: True when ``apply_weights`` applies the online R4
    itself (the input arrives unrotated, ``layer.quarot_had_k`` holds the K×K factor);
    otherwise the linear method's Hadamard transform runs before the kernel.
    """

    fuses_hadamard: bool = False
    # the kernel computes runtime-smoothed layers (LinearConfig.smooth_group > 0) and only
    # those; choose_kernel offers each layer the kernels of its kind
    smoothing: bool = False

    def __init__(self, config: LinearConfig):
        self.config = config

    @classmethod
    @abstractmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        """(True, None), or (False, why not) for the engine log."""

    @classmethod
    def describe(cls) -> str:
        """What the engine log says the layers run on."""
        return cls.__name__

    @abstractmethod
    def process_weights_after_loading(
        self, layer: torch.nn.Module, codes: torch.Tensor, scale: torch.Tensor
    ) -> None:
        """Take the codes (int8 [N, K]) and float32 scales ([N, G]) into this kernel's
        layout, as parameters of ``layer``. A static activation scale is already in
        ``layer.input_scale`` (float32 [1])."""

    @abstractmethod
    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [M, K] in the model dtype -> [M, N] in the same dtype."""


def request_amx() -> None:
    """Ask Linux for this process's permission to use AMX tiles (arch_prctl
    XCOMP_PERM; idempotent) before a vLLM kernel runs AMX code: without it the first
    tile instruction is SIGILL. vLLM 0.32's CPU W4A16 / int8 kernels assume the
    permission, which a bf16 oneDNN matmul happens to request, so a model whose every
    linear is quantized used to kill its worker (exit -4) at the first forward."""
    if torch.cpu._is_amx_tile_supported():
        torch._C._cpu._init_amx()


def register(layer: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    """Replace or add a frozen parameter (kernels keep their repacked tensors on the layer
    so that vLLM moves and accounts for them like any weight)."""
    if hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
