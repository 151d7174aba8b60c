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
from vllm_quarot.models import (
    EMBED,
    FINAL_NORM,
    INPUT_NORM,
    LM_HEAD,
    POST_NORM,
    QK_NORMS,
    biases,
    family_of,
    head_dim,
    layer_prefix,
    linear_sizes,
)

INDEX_FILE = "model.safetensors.index.json"
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


def expected_tensors(fmt: QuaRotFormat, hf_config: Any) -> dict[str, _Want]:
    """Every tensor a checkpoint in this format holds for this model, in model order
    (the model map names them: fused linears, e.g. Phi-3's qkv_proj, as one tensor)."""
    c = hf_config
    hidden, vocab = c.hidden_size, c.vocab_size
    fam = family_of(c)
    sizes = linear_sizes(c)
    has_bias = biases(c)
    w, act = fmt.weight, fmt.activation
    static = act is not None and act.static
    want: dict[str, _Want] = {
        f"{EMBED}.weight": _Want(FLOAT_DTYPES, (vocab, hidden), "embedding")}
    for i in range(c.num_hidden_layers):
        p = layer_prefix(i)
        for norm in (INPUT_NORM, POST_NORM):
            want[f"{p}{norm}.weight"] = _Want(FLOAT_DTYPES, (hidden,), "RMSNorm gain")
        if fam.qk_norm:
            for norm in QK_NORMS:
                want[f"{p}{norm}.weight"] = _Want(FLOAT_DTYPES, (head_dim(c),), "RMSNorm gain")
        for name, parts in fam.checkpoint_linears():
            n, k = sum(sizes[q][0] for q in parts), sizes[parts[0]][1]
            key = p + name
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
            if has_bias[parts[0]]:
                want[f"{key}.bias"] = _Want(FLOAT_DTYPES, (n,), "bias")
    want[f"{FINAL_NORM}.weight"] = _Want(FLOAT_DTYPES, (hidden,), "RMSNorm gain")
    head = fmt.lm_head
    if head is None and not getattr(c, "tie_word_embeddings", False):
        want[f"{LM_HEAD}.weight"] = _Want(FLOAT_DTYPES, (vocab, hidden),
                                          "untied lm_head, final norm folded in")
    # (tied: the head is the embedding, as in an imported checkpoint; our quantizer
    # unties it, folding the final norm in)
    elif head is not None:
        want[f"{LM_HEAD}.weight_packed"] = _Want(
            ("I32",), (vocab, hidden * head.bits // 32),
            f"lm_head {head.bits}-bit codes packed in int32")
        want[f"{LM_HEAD}.weight_scale"] = _Want(
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
