"""Pure-PyTorch simulation of a QuaRot checkpoint with transformers.

The quantized weights are dequantized into an ordinary transformers model, and
forward pre-hooks reproduce the runtime exactly: the online R4 Hadamard before
down_proj and per-token activation fake-quantization before every quantized linear,
using the same rounding code as the vLLM ops. A tensor_parallel_blocks N checkpoint
gets the block-diagonal R4 (I_N ⊗ H_{n/N}) and per-(token, block of in_features/N)
activation scales on the row-parallel o_proj and down_proj, as every TP rank computes.
It is the reference that vLLM's outputs are compared with (tests, ``vllm-quarot eval``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vllm_quarot.format import CheckpointFormatError, QuaRotFormat
from vllm_quarot.hadamard import block_hadamard_transform, hadamard_factor, hadamard_transform
from vllm_quarot.kv_shift import KVShift, read_kv_shift
from vllm_quarot.offline.checkpoint import TensorSource
from vllm_quarot.quant import (
    dequantize_weight,
    fake_quantize_asym,
    fake_quantize_per_token_blocks,
    fake_smooth_quantize,
    quantize_static,
    unpack_weight,
)

ROW_PARALLEL = ("o_proj", "down_proj")  # input dimension split across TP ranks


def load_simulated(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    act_bits_override: dict[str, int | None] | None = None,
) -> torch.nn.Module:
    """A transformers model that computes what the vLLM plugin computes.

    act_bits_override (analysis only) maps a module-name suffix (``down_proj``,
    ``layers.29.mlp.down_proj``) to other activation bits, None = 16-bit: it answers
    "which projections dominate the error" without re-quantizing.
    """
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    fmt = QuaRotFormat.from_dict(raw.get("quantization_config"))
    cfg = AutoConfig.from_pretrained(model_dir)
    fmt.check_model(cfg)
    cfg.quantization_config = None
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    src = TensorSource(model_dir)
    state: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    input_scales: dict[str, torch.Tensor] = {}
    perms: dict[str, torch.Tensor] = {}  # activation.smooth.reorder: channel orders
    for name in src.keys():
        if name.endswith(".weight_packed"):
            base = name.removesuffix(".weight_packed")
            packed = src.get(name)
            scale = src.get(f"{base}.weight_scale")
            in_features = model.get_submodule(base).in_features
            bits = fmt.lm_head.bits if base == "lm_head" and fmt.lm_head else fmt.weight.bits
            codes = unpack_weight(packed, bits, in_features)
            gs = -1 if scale.shape[1] == 1 else in_features // scale.shape[1]
            state[f"{base}.weight"] = dequantize_weight(codes, scale, gs, torch.float32).to(dtype)
            quantized.add(base)
        elif name.endswith(".input_scale"):
            input_scales[name.removesuffix(".input_scale")] = src.get(name).float()
        elif name.endswith(".smooth_perm"):
            perms[name.removesuffix(".smooth_perm")] = src.get(name).long()
        elif not name.endswith(".weight_scale"):
            state[name] = src.get(name).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    _install_hooks(model, fmt, quantized, input_scales, act_bits_override or {}, perms)
    if fmt.kv_cache is not None:
        shifts = read_kv_shift(model_dir, cfg) if fmt.kv_cache.shift else None
        model.set_attn_implementation(_kv_attention(fmt, shifts))
    return model


_KV_ATTENTION_COUNT = itertools.count()


def _kv_attention(fmt: QuaRotFormat, shifts: KVShift | None) -> str:
    """Register an attention function that, after RoPE, subtracts the layer's key and
    value shifts (kv_cache.shift), rotates queries and keys by R3 (on the layers it
    applies to), fake-quantizes keys and values per token and head, runs SDPA and adds
    the value shift back."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv, r3 = fmt.kv_cache, fmt.rotation.r3
    name = f"quarot_kv{kv.bits}_{next(_KV_ATTENTION_COUNT)}"  # one per loaded model

    def attention(module, query, key, value, attention_mask, **kwargs):
        i = module.layer_idx
        dtype = key.dtype
        k, v = key.float(), value.float()  # [B, kv_heads, T, D]
        if shifts is not None:
            k = k - shifts[i][0][:, None, :]
            v = v - shifts[i][1][:, None, :]
        if r3 is not None and r3.applies_to(i):
            query = hadamard_transform(query.float()).to(query.dtype)
            k = hadamard_transform(k)
        key = fake_quantize_asym(k, kv.bits, kv.clip_ratio).to(dtype)
        value = fake_quantize_asym(v, kv.bits, kv.clip_ratio)
        if shifts is None:
            value = value.to(dtype)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        out, weights = sdpa_attention_forward(module, query, key, value.to(dtype),
                                              attention_mask, **kwargs)
        # out: [B, T, heads, D]; query head h reads KV head h // group
        group = query.shape[1] // value.shape[1]
        vs = shifts[i][1].repeat_interleave(group, dim=0)
        return (out.float() + vs).to(out.dtype), weights

    AttentionInterface.register(name, attention)
    return name


def _install_hooks(model: torch.nn.Module, fmt: QuaRotFormat, quantized: set[str],
                   input_scales: dict[str, torch.Tensor],
                   override: dict[str, int | None],
                   perms: dict[str, torch.Tensor] | None = None) -> None:
    act = fmt.activation
    static = act is not None and act.static
    smooth = act.smooth if act is not None else None
    for name in sorted(quantized):
        mod = model.get_submodule(name)
        r4 = fmt.rotation.r4 if name.endswith("down_proj") else None
        r4_blocks = r4.blocks if r4 is not None else 1
        had_k = (hadamard_factor(mod.in_features // r4_blocks, torch.float32)
                 if r4 is not None else None)
        # the row-parallel linears: each TP rank quantizes its slice of the input
        blocks = fmt.tp_blocks if name.endswith(ROW_PARALLEL) else 1
        head = name == "lm_head"  # its own activation bits, per token, no clip
        if static and not head and name not in input_scales:
            raise CheckpointFormatError(f"{name}.input_scale is missing from the checkpoint")
        scale = input_scales[name] if static and not head else None  # None: per token
        bits, clip = act.for_layer(name) if act is not None else (None, 1.0)
        if head:
            assert fmt.lm_head is not None
            bits, clip = fmt.lm_head.activation_bits, 1.0
        for suffix, b in override.items():
            if name.endswith(suffix):
                bits = b
        # Rotated Runtime Smooth on the decoder layers' linears (not the lm_head)
        group = smooth.group_size if smooth is not None and not head else 0
        perm = (perms or {}).get(name) if group and smooth.reorder else None
        if group and smooth.reorder and perm is None:
            raise CheckpointFormatError(f"{name}.smooth_perm is missing from the checkpoint")

        def hook(_m, args, had_k=had_k, r4_blocks=r4_blocks, scale=scale, bits=bits,
                 blocks=blocks, clip=clip, group=group, perm=perm):
            x = args[0]
            if had_k is not None:
                x = block_hadamard_transform(x.float(), r4_blocks, had_k).to(x.dtype)
            if bits is None:
                pass
            elif group:
                x = fake_smooth_quantize(x, bits, clip, group, perm)
            elif scale is not None:
                x = (quantize_static(x, scale, bits).float() * scale).to(x.dtype)
            else:
                x = fake_quantize_per_token_blocks(x, bits, clip, blocks)
            return (x,)

        mod.register_forward_pre_hook(hook)
