"""Pure-PyTorch simulation of a QuaRot checkpoint with transformers.

The quantized weights are dequantized into an ordinary transformers model, and
forward pre-hooks reproduce the runtime exactly: the online R4 Hadamard before
down_proj and per-token activation fake-quantization before every quantized linear,
using the same rounding code as the vLLM ops. It is the reference that vLLM's
outputs are compared with (tests, ``vllm-quarot eval``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vllm_quarot.checkpoint import TensorSource
from vllm_quarot.format import QuaRotFormat
from vllm_quarot.hadamard import hadamard_factor, hadamard_transform
from vllm_quarot.quant import dequantize_weight, fake_quantize_per_token, unpack_weight


def load_simulated(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers model that computes what the vLLM plugin computes."""
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
    for name in src.keys():
        if name.endswith(".weight_packed"):
            base = name.removesuffix(".weight_packed")
            packed = src.get(name)
            scale = src.get(f"{base}.weight_scale")
            in_features = model.get_submodule(base).in_features
            codes = unpack_weight(packed, fmt.weight.bits, in_features)
            gs = -1 if scale.shape[1] == 1 else in_features // scale.shape[1]
            state[f"{base}.weight"] = dequantize_weight(codes, scale, gs, torch.float32).to(dtype)
            quantized.add(base)
        elif not name.endswith(".weight_scale"):
            state[name] = src.get(name).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    _install_hooks(model, fmt, quantized)
    return model


def _install_hooks(model: torch.nn.Module, fmt: QuaRotFormat, quantized: set[str]) -> None:
    act = fmt.activation
    for name in sorted(quantized):
        mod = model.get_submodule(name)
        online = name.endswith("down_proj") and fmt.rotation.r4_size > 0
        had_k = hadamard_factor(mod.in_features, torch.float32) if online else None

        def hook(_m, args, had_k=had_k):
            x = args[0]
            if had_k is not None:
                x = hadamard_transform(x.float(), had_k).to(x.dtype)
            if act is not None:
                x = fake_quantize_per_token(x, act.bits, act.clip_ratio)
            return (x,)

        mod.register_forward_pre_hook(hook)
