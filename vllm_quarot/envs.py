"""Every environment variable vllm-quarot reads, in one place (as vLLM's ``envs.py``).

Read lazily (``envs.NAME`` re-reads the environment) so that tests can set them per
process. All share the ``VLLM_QUAROT_`` prefix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    VLLM_QUAROT_DISABLED_KERNELS: list[str]
    VLLM_QUAROT_NO_EXT: bool
    VLLM_QUAROT_CPU_ISA: str | None
    VLLM_QUAROT_CUDA_EXT: bool
    VLLM_QUAROT_PATCHES: bool


def _csv(name: str) -> list[str]:
    return [s.strip() for s in os.environ.get(name, "").split(",") if s.strip()]


ENVIRONMENT_VARIABLES: dict[str, Callable[[], Any]] = {
    # Comma-separated kernel class names the kernel chooser skips (like vLLM's
    # VLLM_DISABLED_KERNELS), e.g. "NativeCPULinearKernel,VLLMWNA16LinearKernel".
    "VLLM_QUAROT_DISABLED_KERNELS": lambda: _csv("VLLM_QUAROT_DISABLED_KERNELS"),
    # 1: do not build (setup.py) or load the native CPU library; the reference torch ops
    # serve instead. Kept as the short form of disabling every native kernel.
    "VLLM_QUAROT_NO_EXT": lambda: os.environ.get("VLLM_QUAROT_NO_EXT") == "1",
    # amx | avx512_vnni | avx2 | scalar: force the native CPU kernels' instruction set (read
    # by csrc/cpu itself at load; listed here so that every variable is in one place).
    "VLLM_QUAROT_CPU_ISA": lambda: os.environ.get("VLLM_QUAROT_CPU_ISA"),
    # 1: build the experimental csrc/cuda extension at install time (nothing calls it yet).
    "VLLM_QUAROT_CUDA_EXT": lambda: os.environ.get("VLLM_QUAROT_CUDA_EXT") == "1",
    # 0: apply none of the fixes to vLLM (runtime/vllm_patches.py) in any process.
    "VLLM_QUAROT_PATCHES": lambda: os.environ.get("VLLM_QUAROT_PATCHES", "1") != "0",
}


def __getattr__(name: str) -> Any:
    if name in ENVIRONMENT_VARIABLES:
        return ENVIRONMENT_VARIABLES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(ENVIRONMENT_VARIABLES)
