"""KV4: a 4-bit paged KV cache with the online R3 rotation, for vLLM's CPU backend.

Installed by overriding the CPU_ATTN backend (vLLM's CPU platform ignores CUSTOM).
Caches in 16-bit (or fp8) are handed to the stock implementation untouched; with
``--kv-cache-dtype int4_per_token_head`` (or a checkpoint whose quantization_config
has a ``kv_cache`` section) keys and values are stored per token and per KV head as
asymmetric 4-bit codes with a float16 scale and zero point, in vLLM's own paged
blocks, so the scheduler, block manager, prefix caching and chunked prefill work
unchanged. Per (block, kv head, slot) the bytes are
``[K codes D/2 | K scale, zero (2×fp16) | V codes D/2 | V scale, zero]``: 72 bytes
at head_dim 64 instead of 256 for bf16.

R3 (a Hadamard of size head_dim on queries and keys after RoPE, on the layers where
the checkpoint asks for it) is applied here: keys before quantization, queries before
attention. A ``kv_cache.shift`` checkpoint has keys and values stored minus per-layer
constant vectors (``vllm_quarot.kv_shift``): subtracted before R3 and quantization,
the value shift added back to the attention output.
A ``kv_cache.pivots`` = P checkpoint (IntactKV) keeps the first P tokens of every
sequence exact: their keys (after the shift and R3) and values are also stored in
float16 in a tail of the page of the sequence's first block ([kv heads, P, K | V]: P·256
bytes per KV head at head_dim 64; vLLM pads every page by that, so the capacity counts
it), and attention reads them there instead of their 4-bit codes. The first block is
what prefix caching shares, recompute after preemption rewrites, and what chunked
prefill fills first, so the pivots travel with it.
Writing and attending run on the native kernels of csrc/cpu/kv4_attention.cpp
(``torch.ops.quarot_cpu.kv4_*``: no dequantized copy of the cache, online softmax)
when the extension is built; the plain PyTorch code below (dequantize the sequence's
blocks, then softmax attention) is their reference and the fallback.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import replace

import torch
import vllm.v1.attention.backends.cpu_attn as cpu_attn
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import KVQuantMode

from vllm_quarot.format import OnlineHadamard
from vllm_quarot.hadamard import hadamard_factor, hadamard_transform
from vllm_quarot.kv_shift import KVShift, local_kv_heads
from vllm_quarot.quant import pack_kv, slot_bytes, unpack_kv
from vllm_quarot.runtime.ops import cpu as cpu_ops

KV4_DTYPE = "int4_per_token_head"


def _quarot_kv_settings(vllm_config=None
                        ) -> tuple[float, OnlineHadamard | None, KVShift | None, int]:
    """(clip ratio, R3, per-layer shifts, pivots) of a QuaRot checkpoint; (1.0, None,
    None, 0) for other models."""
    config = vllm_config if vllm_config is not None else get_current_vllm_config()
    quant_config = config.quant_config
    fmt = getattr(quant_config, "fmt", None)
    if fmt is None or fmt.kv_cache is None:
        return 1.0, None, None, 0
    return (fmt.kv_cache.clip_ratio, fmt.rotation.r3, getattr(quant_config, "kv_shift", None),
            fmt.kv_cache.pivots)


# kv_cache.pivots of the checkpoint this process serves, as the attention layers found it
# (customize_spec, a classmethod without a config, sizes the page tail from it)
_SERVED_PIVOTS: int | None = None


def _served_pivots() -> int:
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is not None and config.model_config is not None:
        return _quarot_kv_settings(config)[3]
    return _SERVED_PIVOTS or 0


def pivot_tail_bytes(num_kv_heads: int, head_dim: int, pivots: int) -> int:
    """Bytes a page gains for the pivots: float16 K and V per pivot and KV head."""
    return num_kv_heads * pivots * 2 * head_dim * 2


def pivot_tail(kv_cache: torch.Tensor, pivots: int) -> torch.Tensor | None:
    """The float16 view [blocks, kv heads, P, 2 (K, V), D] of the pivots at the end of
    every page of a KV4 cache [blocks, kv heads, block, bytes] (pages padded by
    ``pivot_tail_bytes``); None without pivots."""
    if not pivots:
        return None
    blocks, hkv, bs, row = kv_cache.shape
    d = row - 8  # slot_bytes(D) = D + 8
    page = hkv * bs * row
    if kv_cache.stride(0) < page + pivot_tail_bytes(hkv, d, pivots):
        raise ValueError(f"KV4 cache pages of {kv_cache.stride(0)} bytes have no room for "
                         f"{pivots} pivots after {page} bytes of codes")
    raw = torch.as_strided(kv_cache, (blocks, pivot_tail_bytes(hkv, d, pivots)),
                           (kv_cache.stride(0), 1), kv_cache.storage_offset() + page)
    return raw.view(torch.float16).view(blocks, hkv, pivots, 2, d)


def _layer_index(layer_name: str) -> int:
    m = re.search(r"layers\.(\d+)\.", layer_name)
    if m is None:
        raise ValueError(f"KV4: cannot tell the decoder layer of attention {layer_name!r}")
    return int(m.group(1))


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, n: int
                    ) -> torch.Tensor:
    """Each of the step's n query tokens' position in its sequence (-1 for padding)."""
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    seq = torch.repeat_interleave(torch.arange(q_lens.numel()), q_lens)
    pos = torch.full((n,), -1, dtype=torch.long)
    m = min(n, seq.numel())
    start = (seq_lens.long() - q_lens)[seq[:m]]
    pos[:m] = start + torch.arange(m) - qsl[seq[:m]]
    return pos


class QuaRotCPUAttentionBackend(CPUAttentionBackend):
    supported_kv_cache_dtypes = [*CPUAttentionBackend.supported_kv_cache_dtypes, KV4_DTYPE]

    @classmethod
    def customize_spec(cls, spec):
        if spec.kv_quant_mode != KVQuantMode.INT4_PER_TOKEN_HEAD:
            return spec
        if spec.head_size % 2 or spec.head_size_v != spec.head_size:
            raise ValueError(f"KV4 needs an even head_dim shared by K and V, got {spec}")
        if spec.state_content_bytes is not None:
            return spec
        spec = replace(spec, state_content_bytes=slot_bytes(spec.head_size))
        pivots = _served_pivots()
        if pivots:  # IntactKV: every page ends in the float16 pivots of its KV heads
            spec = replace(spec, page_size_padded=spec.unpadded_page_size_bytes
                           + pivot_tail_bytes(spec.num_heads, spec.head_size, pivots))
        return spec

    @staticmethod
    def get_impl_cls():
        return QuaRotCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return QuaRotCPUAttentionMetadataBuilder


@contextlib.contextmanager
def _isa_probe_as_16bit() -> Iterator[None]:
    """vLLM's CPU ISA probe (``_get_attn_isa``) refuses every quantized cache dtype on
    CPUs without AVX-512 or AMX (its fp8 kernels need them); the 4-bit cache runs this
    backend's own kernels, so the probe is asked about a 16-bit cache instead."""
    probe = cpu_attn._get_attn_isa

    def as_16bit(dtype, block_size, head_size=None, kv_cache_dtype=None):
        return probe(dtype, block_size, head_size, None)

    cpu_attn._get_attn_isa = as_16bit
    try:
        yield
    finally:
        cpu_attn._get_attn_isa = probe


class QuaRotCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """The stock builder, minus the C++ scheduler metadata that KV4 does not use."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        kv4 = vllm_config.cache_config.cache_dtype == KV4_DTYPE
        with _isa_probe_as_16bit() if kv4 else contextlib.nullcontext():
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if self.kv_cache_dtype != KV4_DTYPE:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        m = common_attn_metadata
        if not isinstance(m.causal, bool) or self.is_cross_attention:
            raise NotImplementedError("KV4 supports causal decoder self-attention only")
        return CPUAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            query_start_loc=m.query_start_loc,
            max_seq_len=m.max_seq_len,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            scheduler_metadata=None,
            causal=m.causal,
        )


class QuaRotCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        supported = QuaRotCPUAttentionBackend.supported_kv_cache_dtypes
        if self.kv_cache_dtype not in supported:
            # vLLM's CPU backend does not check, and computes garbage for these
            raise ValueError(
                f"--kv-cache-dtype {self.kv_cache_dtype} is not supported on CPU; "
                f"use one of {', '.join(supported)}"
            )
        self.kv4 = self.kv_cache_dtype == KV4_DTYPE
        if not self.kv4:
            return
        if self.alibi_slopes is not None or self.sinks is not None or self.logits_soft_cap:
            raise NotImplementedError("KV4 does not support ALiBi, sinks or soft-capping")
        if self.sliding_window != -1:
            raise NotImplementedError("KV4 does not support sliding-window attention yet")
        self.clip_ratio, self.r3, self.shifts, self.pivots = _quarot_kv_settings()
        global _SERVED_PIVOTS
        _SERVED_PIVOTS = self.pivots
        if self.r3 and self.r3.size != self.head_size:
            raise ValueError(f"checkpoint R3 size {self.r3.size} != head_dim {self.head_size}")
        if self.shifts is not None:
            from vllm.distributed import (
                get_tensor_model_parallel_rank,
                get_tensor_model_parallel_world_size,
            )
            self.tp = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
        self.had: torch.Tensor | None = None
        # this layer's shifts [kv_heads, D] (None: not shifted); set on the first call,
        # when the layer (and so its index) is known
        self.k_shift: torch.Tensor | None = None
        self.v_shift: torch.Tensor | None = None
        self.v_shift_heads: torch.Tensor | None = None  # per query head [H, D]
        self.layer_ready = False
        self.native = cpu_ops.AVAILABLE

    def _setup_layer(self, layer: torch.nn.Module) -> None:
        """R3 and the shifts of this layer (the checkpoint may set them per layer)."""
        self.layer_ready = True
        if self.r3 is None and self.shifts is None:
            return
        i = _layer_index(layer.layer_name)
        if self.r3 is not None and self.r3.applies_to(i):
            self.had = hadamard_factor(self.head_size, torch.float32)
        if self.shifts is not None:
            k, v = self.shifts[i]
            self.k_shift = local_kv_heads(k, self.num_kv_heads, *self.tp).contiguous()
            self.v_shift = local_kv_heads(v, self.num_kv_heads, *self.tp).contiguous()
            group = self.num_heads // self.num_kv_heads
            self.v_shift_heads = self.v_shift.repeat_interleave(group, dim=0)

    def _r3(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.had is None else hadamard_transform(x.float(), self.had)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if not self.kv4:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if not self.layer_ready:
            self._setup_layer(layer)
        if self.k_shift is not None:  # in float32: the residual is what gets quantized
            n = slot_mapping.shape[0]
            key = key[:n].view(n, self.num_kv_heads, self.head_size).float() - self.k_shift
            value = value[:n].view(n, self.num_kv_heads, self.head_size).float() - self.v_shift
        tail, meta = None, None
        if self.pivots:
            tail = pivot_tail(kv_cache, self.pivots)
            meta = self._metadata(layer)
        if self.native:
            torch.ops.quarot_cpu.kv4_cache_update(
                key, value, kv_cache, slot_mapping.long(), self.had, self.clip_ratio, tail,
                None if meta is None else meta.query_start_loc.int(),
                None if meta is None else meta.seq_lens.int())
            return
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        valid = slots >= 0
        k = self._r3(key[:n])
        rows = torch.cat([pack_kv(k, self.clip_ratio), pack_kv(value[:n], self.clip_ratio)],
                         dim=-1)
        block_size = kv_cache.shape[2]
        kv_cache[slots[valid] // block_size, :, slots[valid] % block_size] = rows[valid]
        if tail is not None:  # the pivots' exact keys and values, in float16
            assert meta is not None
            pos = token_positions(meta.query_start_loc, meta.seq_lens, n)
            piv = valid & (pos >= 0) & (pos < self.pivots)
            blk = slots[piv] // block_size
            tail[blk, :, pos[piv], 0] = k[piv].to(torch.float16)
            tail[blk, :, pos[piv], 1] = value[:n][piv].to(torch.float16)

    @staticmethod
    def _metadata(layer) -> CPUAttentionMetadata:
        """This step's metadata of the layer (vLLM hands the cache update none)."""
        from vllm.model_executor.layers.attention.attention import get_attention_context

        meta = get_attention_context(layer.layer_name)[0]
        if meta is None:
            raise RuntimeError(f"KV4 pivots: no attention metadata for {layer.layer_name}")
        return meta

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not self.kv4 or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if not self.layer_ready:
            self._setup_layer(layer)
        self._attend(query, kv_cache, attn_metadata, output)
        if self.v_shift_heads is not None:  # attention weights sum to 1: add the shift back
            n = attn_metadata.num_actual_tokens
            output[:n].view(n, self.num_heads, self.head_size).add_(self.v_shift_heads)
        return output

    def _attend(self, query, kv_cache, attn_metadata, output) -> None:
        tail = pivot_tail(kv_cache, self.pivots) if self.pivots else None
        if self.native:
            m = attn_metadata
            torch.ops.quarot_cpu.kv4_attention(
                query, kv_cache, m.block_table.int(), m.seq_lens.int(), m.query_start_loc.int(),
                self.scale, bool(m.causal), self.had, output, tail)
            return
        d = self.head_size
        half = d // 2 + 4
        block_size = kv_cache.shape[2]
        qsl = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        group = self.num_heads // self.num_kv_heads
        for r, seq_len in enumerate(seq_lens):
            start, end = qsl[r], qsl[r + 1]
            if end == start:
                continue
            n_blocks = -(-seq_len // block_size)
            blocks = attn_metadata.block_table[r, :n_blocks].long()
            cache = kv_cache[blocks].permute(1, 0, 2, 3).reshape(self.num_kv_heads, -1,
                                                                  2 * half)[:, :seq_len]
            k = unpack_kv(cache[..., :half], d)
            v = unpack_kv(cache[..., half:], d)
            if tail is not None:  # the first tokens' exact keys and values
                p = min(self.pivots, seq_len)
                k[:, :p] = tail[blocks[0], :, :p, 0].float()
                v[:, :p] = tail[blocks[0], :, :p, 1].float()
            k = k.repeat_interleave(group, dim=0)
            v = v.repeat_interleave(group, dim=0)
            q = self._r3(query[start:end]).float().transpose(0, 1)  # [H, Tq, D]
            tq = end - start
            pos_q = torch.arange(seq_len - tq, seq_len).unsqueeze(1)
            mask = torch.arange(seq_len).unsqueeze(0) <= pos_q if attn_metadata.causal else None
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale)
            output[start:end] = o.transpose(0, 1).to(output.dtype)
