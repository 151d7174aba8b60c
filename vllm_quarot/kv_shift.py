"""The per-layer key/value shift vectors of a ``kv_cache.shift`` checkpoint.

A constant vector c subtracted from every key of a layer leaves attention unchanged:
each query's scores all move by q·c, which softmax ignores. Qwen2-class models put
massive, nearly token-independent components into their keys (k_proj biases of
hundreds); subtracted before the 4-bit quantization, they no longer set the range
that the content has to share. Values are shifted too and the shift is added back to
the attention output (the attention weights sum to 1). The quantizer calibrates the
vectors (``vllm_quarot.offline.kv_calibration``) and writes them to KV_SHIFT_FILE;
the runtime (vLLM backend and simulation) reads them with ``read_kv_shift``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vllm_quarot.format import KV_SHIFT_FILE, CheckpointFormatError

KVShift = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (k, v) [kv_heads, D]


def write_kv_shift(out_dir: Path, shift: KVShift) -> None:
    path = out_dir / KV_SHIFT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (k, v) in sorted(shift.items()):
        tensors[f"layers.{i}.k_shift"] = k.float().clone()
        tensors[f"layers.{i}.v_shift"] = v.float().clone()
    from vllm_quarot.offline.checkpoint import save_tensors

    save_tensors(tensors, path)


def read_kv_shift(model_dir: str | Path, hf_config: Any) -> KVShift:
    """Every layer's (k, v) shift, checked against the model's shapes; a missing or
    malformed file is a CheckpointFormatError (one line)."""
    path = Path(model_dir) / KV_SHIFT_FILE
    if not path.is_file():
        raise CheckpointFormatError(
            f"{model_dir}: kv_cache.shift is set but {KV_SHIFT_FILE} is missing: the keys "
            "were calibrated minus per-layer shifts that the checkpoint no longer has "
            "(copy the whole checkpoint directory, or quantize again)")
    try:
        tensors = load_file(path)
    except Exception as e:  # a damaged file: safetensors' own message, on one line
        raise CheckpointFormatError(f"{path}: unreadable ({e})") from e
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    out: KVShift = {}
    for i in range(hf_config.num_hidden_layers):
        pair = []
        for kind in ("k", "v"):
            t = tensors.get(f"layers.{i}.{kind}_shift")
            if t is None or tuple(t.shape) != (kv_heads, head_dim):
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise CheckpointFormatError(
                    f"{path}: layers.{i}.{kind}_shift is {got}, expected "
                    f"[{kv_heads}, {head_dim}] (num_key_value_heads × head_dim)")
            pair.append(t.float())
        out[i] = (pair[0], pair[1])
    return out


def local_kv_heads(shift: torch.Tensor, num_kv_heads: int, rank: int, tp: int) -> torch.Tensor:
    """The rows of a [total_kv_heads, D] shift that tensor-parallel rank ``rank`` holds:
    its slice when the KV heads divide by tp, else the head vLLM replicates to it."""
    total = shift.shape[0]
    if total >= tp:
        return shift[rank * num_kv_heads:(rank + 1) * num_kv_heads]
    return shift[rank * total // tp].unsqueeze(0).expand(num_kv_heads, -1)
