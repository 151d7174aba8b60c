"""llm-compressor-style compressed-tensors checkpoints with online transforms, made
without llm-compressor (it pins its own transformers): compressed-tensors' own
``apply_transform_config`` rotates the model (QuIP's ``v``: a random Hadamard at the
input of every linear, its inverse fused into the weight), then the weights are
quantized round-to-nearest and saved as llm-compressor saves them — ``pack-quantized``
int32 words with ``weight_shape`` (or, as llm-compressor 0.14 writes W4A4 / W4A8,
``int-quantized``: one int8 per weight), bfloat16 scales, each transform matrix once (on the first
module it applies to, bfloat16) and the same ``transform_config`` (see the real one in
benchmarks/results/README.md#beside-llm-compressor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vllm_quarot.quant import pack_weight


def make_ct_quip(src: Path, out: Path, group_size: int = 64,
                 head_dim: int | None = None, input_bits: int | None = None,
                 weight_format: str = "pack-quantized") -> Path:
    from compressed_tensors.transform import (
        TransformArgs,
        TransformConfig,
        TransformScheme,
        apply_transform_config,
    )
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = TransformScheme(type="random-hadamard", head_dim=head_dim, precision=torch.float64,
                             apply=[TransformArgs(targets=["Linear"], location="input",
                                                  ignore=["lm_head"]),
                                    TransformArgs(targets=["Linear"], location="weight_input",
                                                  inverse=True, ignore=["lm_head"])])
    tc = TransformConfig(config_groups={"v": scheme})
    apply_transform_config(model, tc)
    tensors: dict[str, torch.Tensor] = {}
    seen_sizes: set[int] = set()
    for name, t in model.state_dict().items():
        base, _, leaf = name.rpartition(".")
        if base.endswith(".v_input"):  # stored once per size, as llm-compressor does
            if t.shape[0] not in seen_sizes:
                seen_sizes.add(t.shape[0])
                tensors[name] = t.to(torch.bfloat16)
            continue
        if ".layers." in name and leaf == "weight" and t.dim() == 2:
            n, k = t.shape
            g = t.float().reshape(n, k // group_size, group_size)
            scale = (g.abs().amax(-1) / 7).clamp(min=1e-8).to(torch.bfloat16)
            codes = torch.clamp(torch.round(g / scale.float()[..., None]), -8, 7)
            codes = codes.reshape(n, k).to(torch.int8)
            if weight_format == "int-quantized":  # one int8 per weight, no shape
                tensors[f"{base}.weight"] = codes
            else:
                tensors[f"{base}.weight_packed"] = pack_weight(codes, 4)
                tensors[f"{base}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
            tensors[f"{base}.weight_scale"] = scale
            continue
        tensors[name] = t.to(torch.bfloat16)
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group_size,
               "strategy": "group", "block_structure": None, "dynamic": False,
               "actorder": "static", "observer": "memoryless_minmax", "observer_kwargs": {},
               "scale_dtype": None, "zp_dtype": None}
    cfg["quantization_config"] = {
        "config_groups": {"group_0": {"format": weight_format, "targets": ["Linear"],
                                      "weights": weights,
                                      "input_activations": None if input_bits is None else {
                                          "num_bits": input_bits, "type": "int",
                                          "symmetric": True, "dynamic": True,
                                          "strategy": "token", "group_size": None,
                                          "block_structure": None, "actorder": None,
                                          "observer": None, "observer_kwargs": {}},
                                      "output_activations": None}},
        "format": weight_format, "global_compression_ratio": None, "ignore": ["lm_head"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors",
        "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": tc.model_dump(mode="json"), "version": "0.19.0"}
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copyfile(f, out / f.name)
    return out
