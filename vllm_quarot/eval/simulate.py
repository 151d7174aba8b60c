"""Pure-PyTorch simulation of a QuaRot checkpoint with transformers.

The quantized weights are dequantized into an ordinary transformers model of the
checkpoint's own architecture, and ``vllm_quarot.transforms`` installs what the runtime
does online: the R4 Hadamard before down_proj, per-token activation fake quantization
before every quantized linear (per (token, block) on the row-parallel linears of a
tensor-parallel checkpoint; per (token, smoothing group) with Rotated Runtime Smooth)
and the 4-bit KV cache with R3 and the key/value shifts, using the same rounding code
as the vLLM ops. It is the reference that vLLM's outputs
are compared with (tests, ``vllm-quarot eval``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vllm_quarot.format import QuaRotFormat
from vllm_quarot.kv_shift import read_kv_shift
from vllm_quarot.models import LM_HEAD
from vllm_quarot.offline.checkpoint import TensorSource
from vllm_quarot.quant import dequantize_weight, unpack_weight
from vllm_quarot.stored_transforms import read_transforms
from vllm_quarot.transforms import (
    install_kv_attention,
    install_linear_inputs,
    kv_spec,
    linear_input_specs,
)


def load_simulated(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    act_bits_override: dict[str, int | None] | None = None,
    kv_keys: str | None = None,
) -> torch.nn.Module:
    """A transformers model that computes what the vLLM plugin computes.

    act_bits_override (analysis only) maps a module-name suffix (``down_proj``,
    ``layers.29.mlp.down_proj``) to other activation bits, None = 16-bit: it answers
    "which projections dominate the error" without re-quantizing. kv_keys (analysis
    only): the keys of the 4-bit cache as ``transforms.KVSpec.keys`` ("int8": K8V4;
    "channel": per channel over 16-token pages).
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
    if "lm_head.weight" not in state and LM_HEAD not in quantized and getattr(
            cfg, "tie_word_embeddings", False):  # a tied head stored once (imports)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    install_linear_inputs(model, linear_input_specs(
        fmt, sorted(quantized), input_scales, act_bits_override, perms,
        matrices=read_transforms(model_dir, fmt)))
    spec = kv_spec(fmt, read_kv_shift(model_dir, cfg) if fmt.kv_cache and fmt.kv_cache.shift
                   else None)
    if spec is not None:
        if kv_keys is not None:
            spec = dataclasses.replace(spec, keys=kv_keys)
        install_kv_attention(model, spec)
    return model
