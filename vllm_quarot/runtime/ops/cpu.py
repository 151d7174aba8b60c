"""The native CPU kernels (csrc/cpu, built into ``vllm_quarot/_C_cpu``), if present.

They register ``torch.ops.quarot_cpu.*``: a fused (online Hadamard +) per-token
quantize, an integer GEMM over weights repacked once at load, the two in one
``linear`` call, and the KV4 cache write and attention. Without the extension (no
compiler at install time, or VLLM_QUAROT_NO_EXT=1 at run time) the reference ops of
``vllm_quarot.ops`` and ``vllm_quarot.runtime.kv_attention`` serve.
"""

from __future__ import annotations

import glob
import os

import torch

from vllm_quarot import envs

_LIB = glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "_C_cpu*.so"))


def _load() -> bool:
    if envs.VLLM_QUAROT_NO_EXT or not _LIB:
        return False
    try:
        torch.ops.load_library(_LIB[0])
    except OSError as exc:
        raise ImportError(
            f"{_LIB[0]} does not load ({exc}); it was probably built against another torch. "
            "Rebuild it (`pip install --no-build-isolation -e .` or scripts/setup.sh) or run "
            "with VLLM_QUAROT_NO_EXT=1 to use the PyTorch reference ops."
        ) from exc
    return True


AVAILABLE = _load()

if AVAILABLE:

    @torch.library.register_fake("quarot_cpu::hadamard")
    def _(x, had_k):
        return torch.empty_like(x)

    @torch.library.register_fake("quarot_cpu::quantize")
    def _(x, had_k, bits, clip_ratio, static_scale, groups):
        m = x.shape[0]
        return (
            x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((m, 1), dtype=torch.float32),
            x.new_empty((m, groups), dtype=torch.int32),
        )

    @torch.library.register_fake("quarot_cpu::gemm")
    def _(codes, scales, asums, w_packed, w_scale_t, bias, n, bits, out_dtype):
        return codes.new_empty((codes.shape[0], n), dtype=out_dtype)

    @torch.library.register_fake("quarot_cpu::kv4_cache_update")
    def _(key, value, kv_cache, slot_mapping, had_k, clip_ratio, pivot_tail=None,
          query_start_loc=None, seq_lens=None):
        return None

    @torch.library.register_fake("quarot_cpu::kv4_attention")
    def _(query, kv_cache, block_table, seq_lens, query_start_loc, scale, causal, had_k, output,
          pivot_tail=None):
        return None

    @torch.library.register_fake("quarot_cpu::rrs_quantize")
    def _(x, had_k, perm, bits, clip_ratio, group_size, levels=0):
        m, groups = x.shape[0], 1 if levels else x.shape[1] // group_size
        return (
            x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((m, groups), dtype=torch.float32),
            x.new_empty((m, groups), dtype=torch.int32),
        )

    @torch.library.register_fake("quarot_cpu::rrs_gemm")
    def _(codes, scales, asums, w_packed, w_scale, bias, n, out_dtype):
        return codes.new_empty((codes.shape[0], n), dtype=out_dtype)

    @torch.library.register_fake("quarot_cpu::rrs_linear")
    def _(x, had_k, perm, w_packed, w_scale, bias, n, a_bits, clip_ratio, group_size, levels=0):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("quarot_cpu::linear")
    def _(x, had_k, w_packed, w_scale_t, bias, n, w_bits, a_bits, clip_ratio, static_scale):
        return x.new_empty((x.shape[0], n))


def isa() -> str:
    """The instruction set the kernels run on now ('none' without the extension)."""
    return torch.ops.quarot_cpu.isa() if AVAILABLE else "none"


def supported_isas() -> list[str]:
    return list(torch.ops.quarot_cpu.supported_isas()) if AVAILABLE else []


def set_isa(name: str) -> str:
    """Force a dispatch path (tests); returns the previous one."""
    return torch.ops.quarot_cpu.set_isa(name)


def can_run(w_bits: int, in_features: int, group_size: int) -> bool:
    """Whether the native GEMM handles this layer (4/8-bit weights, aligned K and groups)."""
    step = 8 if w_bits == 4 else 4
    gs = in_features if group_size == -1 else group_size
    return AVAILABLE and w_bits in (4, 8) and in_features % step == 0 and gs % step == 0


def can_run_rrs(w_bits: int, in_features: int, group_size: int, smooth_group: int) -> bool:
    """Whether the native runtime-smoothing GEMM (csrc/cpu/rrs.cpp) handles this layer:
    4-bit per-channel weights, smoothing groups of a multiple of 8 dividing K."""
    return (AVAILABLE and w_bits == 4 and group_size == -1 and smooth_group > 0
            and smooth_group % 8 == 0 and in_features % smooth_group == 0)
