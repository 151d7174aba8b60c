"""Load-time check of a QuaRot checkpoint's tensors against its quantization_config.

vLLM checks for missing weights only on unquantized models and loads whatever it finds
into its parameters (a float32 tensor holding packed codes, a stale shard, ...), so a
damaged checkpoint would be served silently wrong. ``validate_checkpoint`` reads only
the safetensors headers (8-byte length + JSON: no tensor data) and refuses, with one
line naming the tensor or file, anything the format (docs/checkpoint-format.md) does
not promise for this model: missing, unexpected, mistyped or misshapen tensors, and
safetensors files vLLM would load that do not belong to the checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_quarot.format import QUANT_METHOD, CheckpointFormatError, QuaRotFormat

INDEX_FILE = "model.safetensors.index.json"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FLOAT_DTYPES = ("BF16", "F16", "F32")  # the quantizer writes BF16 or F16; vLLM casts F32
# stored by some exporters, skipped by vLLM's model loaders
TOLERATED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class _Want:
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]
    what: str  # what the tensor is, for the message


@dataclass(frozen=True)
class _Have:
    dtype: str
    shape: tuple[int, ...]
    file: str


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (name -> dtype, shape, offsets)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path.name} is not a readable safetensors file: {e}") \
            from e
    header.pop("__metadata__", None)
    return header


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _weight_files(model_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """The *.safetensors files vLLM would consider (its glob: no hidden files) and the
    index's weight map, checked to describe exactly those files."""
    files = sorted(os.path.basename(f)
                   for f in glob.glob(os.path.join(glob.escape(str(model_dir)), "*.safetensors")))
    index = model_dir / INDEX_FILE
    if not index.exists():
        if len(files) > 1:
            raise CheckpointFormatError(
                f"{model_dir} holds {len(files)} safetensors files ({', '.join(files)}) and "
                f"no {INDEX_FILE}: vLLM would load all of them; keep the one checkpoint "
                "that belongs to this config.json")
        return files, None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{INDEX_FILE} is unreadable: {e}") from e
    listed = sorted(set(weight_map.values()))
    for name in listed:
        if name not in files:
            raise CheckpointFormatError(
                f"{INDEX_FILE} lists {name}, which is not in {model_dir}: incomplete "
                "download or copy")
    stray = [f for f in files if f not in listed]
    if stray:
        raise CheckpointFormatError(
            f"{stray[0]} is not listed in {INDEX_FILE} (which names {', '.join(listed)}): "
            "two checkpoints share this directory and vLLM would load only the indexed "
            f"shards; delete the stale one ({stray[0]}, or the index and its shards)")
    return listed, weight_map


def _read_tensors(model_dir: Path, files: list[str], weight_map: dict[str, str] | None
                  ) -> dict[str, _Have]:
    have: dict[str, _Have] = {}
    for fname in files:
        for name, info in read_header(model_dir / fname).items():
            if name in have:
                raise CheckpointFormatError(
                    f"tensor {name} is stored twice, in {have[name].file} and {fname}")
            if weight_map is not None and weight_map.get(name) != fname:
                raise CheckpointFormatError(
                    f"tensor {name} is in {fname} but {INDEX_FILE} puts it in "
                    f"{weight_map.get(name) or 'no file'}: stale index")
            try:
                have[name] = _Have(str(info["dtype"]), tuple(int(d) for d in info["shape"]),
                                   fname)
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointFormatError(
                    f"{fname}: malformed header entry for {name}: {e}") from e
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(have))
        if lost:
            raise CheckpointFormatError(
                f"tensor {lost[0]} is listed in {INDEX_FILE} under {weight_map[lost[0]]} "
                "but that file does not hold it: stale index")
    return have


def _biases(hf_config: Any) -> dict[str, bool]:
    """Which linears carry a bias, as vLLM's (and transformers') model classes decide."""
    model_type = getattr(hf_config, "model_type", "")
    if model_type == "qwen2":
        qkv, o, mlp = True, False, False
    else:  # llama, mistral, qwen3
        attn = bool(getattr(hf_config, "attention_bias", False)
                    or getattr(hf_config, "bias", False))
        qkv = bool(getattr(hf_config, "qkv_bias", attn))
        o, mlp = attn, bool(getattr(hf_config, "mlp_bias", False))
    return {"self_attn.q_proj": qkv, "self_attn.k_proj": qkv, "self_attn.v_proj": qkv,
            "self_attn.o_proj": o, "mlp.gate_proj": mlp, "mlp.up_proj": mlp,
            "mlp.down_proj": mlp}


def expected_tensors(fmt: QuaRotFormat, hf_config: Any) -> dict[str, _Want]:
    """Every tensor a checkpoint in this format holds for this model, in model order."""
    c = hf_config
    hidden, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    sizes = {  # (N outputs, K inputs)
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    w, act = fmt.weight, fmt.activation
    static = act is not None and act.static
    biases = _biases(c)
    qk_norm = getattr(c, "model_type", "") == "qwen3"
    want: dict[str, _Want] = {
        "model.embed_tokens.weight": _Want(FLOAT_DTYPES, (vocab, hidden), "embedding")}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            want[f"{p}{norm}.weight"] = _Want(FLOAT_DTYPES, (hidden,), "RMSNorm gain")
        if qk_norm:
            for norm in ("self_attn.q_norm", "self_attn.k_norm"):
                want[f"{p}{norm}.weight"] = _Want(FLOAT_DTYPES, (head_dim,), "RMSNorm gain")
        for lin in LINEARS:
            n, k = sizes[lin]
            key = p + lin
            if w.bits >= 16:
                want[f"{key}.weight"] = _Want(FLOAT_DTYPES, (n, k), "16-bit weight")
            else:
                want[f"{key}.weight_packed"] = _Want(
                    ("I32",), (n, k * w.bits // 32), f"{w.bits}-bit codes packed in int32")
                groups = 1 if w.group_size == -1 else k // w.group_size
                want[f"{key}.weight_scale"] = _Want(
                    ("F32",), (n, groups),
                    "per-channel scale" if w.group_size == -1
                    else f"scale per group of {w.group_size}")
                if static:
                    want[f"{key}.input_scale"] = _Want(("F32",), (1,),
                                                       "static activation scale")
                if act is not None and act.smooth is not None and act.smooth.reorder:
                    want[f"{key}.smooth_perm"] = _Want(("I32",), (k,),
                                                       "runtime smoothing channel order")
            if biases[lin]:
                want[f"{key}.bias"] = _Want(FLOAT_DTYPES, (n,), "bias")
    want["model.norm.weight"] = _Want(FLOAT_DTYPES, (hidden,), "RMSNorm gain")
    head = fmt.lm_head
    if head is None:
        want["lm_head.weight"] = _Want(FLOAT_DTYPES, (vocab, hidden),
                                       "untied lm_head, final norm folded in")
    else:
        want["lm_head.weight_packed"] = _Want(
            ("I32",), (vocab, hidden * head.bits // 32),
            f"lm_head {head.bits}-bit codes packed in int32")
        want["lm_head.weight_scale"] = _Want(
            ("F32",), (vocab, 1 if head.group_size == -1 else hidden // head.group_size),
            "lm_head scale")
    return want


def _unexpected(name: str, want: dict[str, _Want], fmt: QuaRotFormat, hf_config: Any
                ) -> str:
    stem, _, leaf = name.rpartition(".")
    scheme = f"a {fmt.scheme!r} checkpoint"
    if leaf == "weight" and f"{stem}.weight_packed" in want:
        return (f"unexpected tensor {name}: 16-bit weights of another scheme next to "
                f"{stem}.weight_packed; {scheme} stores packed codes")
    if leaf in ("weight_packed", "weight_scale") and f"{stem}.weight" in want:
        return (f"unexpected tensor {name}: packed codes of another scheme; {scheme} "
                f"(weight bits {fmt.weight.bits}) stores {stem}.weight")
    if leaf == "input_scale":
        return (f"unexpected tensor {name}: static activation scales belong to "
                f"static-per-tensor schemes, not {scheme}")
    if leaf == "smooth_perm":
        return (f"unexpected tensor {name}: channel orders belong to checkpoints with "
                "activation.smooth.reorder, this one has none")
    if leaf == "bias":
        return (f"unexpected tensor {name}: config.json ({hf_config.model_type}) gives this "
                "layer no bias, so vLLM would not load it")
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit() and (
            int(parts[2]) >= hf_config.num_hidden_layers):
        return (f"unexpected tensor {name}: config.json has num_hidden_layers "
                f"{hf_config.num_hidden_layers}")
    return f"unexpected tensor {name}: not part of {scheme} of this model"


def validate_checkpoint(model_dir: str | Path, fmt: QuaRotFormat, hf_config: Any) -> None:
    """Raise CheckpointFormatError (one line) unless the safetensors in model_dir hold
    exactly the tensors ``fmt`` promises for ``hf_config``, with their dtypes and shapes.

    A directory with no safetensors at all is left to vLLM (it reports missing weights
    itself; ``--load-format dummy`` needs none)."""
    model_dir = Path(model_dir)
    files, weight_map = _weight_files(model_dir)
    if not files:
        return
    have = _read_tensors(model_dir, files, weight_map)
    want = expected_tensors(fmt, hf_config)
    problems: list[str] = []
    for name, wt in want.items():
        h = have.get(name)
        if h is None:
            problems.append(
                f"tensor {name} is missing ({wt.what}, {wt.dtypes[0]} "
                f"{_fmt_shape(wt.shape)})")
        elif h.dtype not in wt.dtypes:
            problems.append(
                f"tensor {name} in {h.file} is {h.dtype}, expected "
                f"{' or '.join(wt.dtypes)} ({wt.what})")
        elif h.shape != wt.shape:
            problems.append(
                f"tensor {name} in {h.file} has shape {_fmt_shape(h.shape)}, expected "
                f"{_fmt_shape(wt.shape)} ({wt.what}; scheme {fmt.scheme!r}, weight bits "
                f"{fmt.weight.bits}, group_size {fmt.weight.group_size})")
    for name in have:
        if name not in want and not name.endswith(TOLERATED_SUFFIXES):
            problems.append(_unexpected(name, want, fmt, hf_config))
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointFormatError(
            f"{model_dir}: {problems[0]}{more}; the checkpoint does not match its "
            "quantization_config (damaged, edited or mixed with another checkpoint)")


def validate_model(model: str, hf_config: Any, fmt: QuaRotFormat) -> None:
    """``validate_checkpoint`` for vLLM's model argument: a local directory is checked;
    a Hub id is skipped (its weights are fetched later, by the engine)."""
    if os.path.isdir(model):
        validate_checkpoint(model, fmt, hf_config)


def check_quant_method(hf_quant_cfg: dict[str, Any]) -> None:
    """A quantization_config that is ours but lost its quant_method: vLLM would load it
    as an unquantized model and fail on the first packed tensor; say so instead."""
    if hf_quant_cfg.get("quant_method"):
        return
    quantizer = hf_quant_cfg.get("quantizer")
    ours = isinstance(quantizer, dict) and quantizer.get("name") == "vllm-quarot"
    if ours or {"format_version", "rotation", "weight"} <= set(hf_quant_cfg):
        raise CheckpointFormatError(
            "config.json's quantization_config is a QuaRot section without quant_method; "
            f"add \"quant_method\": \"{QUANT_METHOD}\" (the checkpoint would otherwise be "
            "loaded as an unquantized model)")
