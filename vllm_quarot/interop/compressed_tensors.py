"""``vllm-quarot export CKPT OUT --to compressed-tensors``: a QuaRot checkpoint as a
compressed-tensors one that stock vLLM (and compressed-tensors in PyTorch) reads
without the plugin.

What carries over exactly: R1 and R2 are fused into the weights already (offline), so
the rotated, quantized linears are ordinary quantized linears:

* W4A16 (weight-only, per channel or per group): compressed-tensors ``pack-quantized``
  — our ``weight_packed`` codes are already in its ``pack_to_int32`` layout (codes +
  8 in int32 words, little end first), ``weight_scale`` as is, plus ``weight_shape``;
* W8A8 with dynamic per-token activations at clip 1.0: ``int-quantized`` — int8
  ``weight``, per-channel ``weight_scale``, dynamic symmetric per-token input;
* the online R4 (before down_proj) as a ``transform_config`` scheme ``R4`` of type
  ``random-hadamard`` applied at down_proj's input, with the ±1 matrix H_K ⊗ H_2^k
  of our ``hadamard_transform`` stored once (``model.layers.0.mlp.down_proj.R4_input
  .weight``, shared by every layer as llm-compressor stores its transforms):
  compressed-tensors computes ``x @ M / √n``, exactly our R4. Stock vLLM 0.32 serves a
  transform only through CUDA kernels (its CPU path fails): export with
  ``--no-online-hadamard`` checkpoints for stock vLLM on CPU.

A quantized lm_head (our ``--lm-head``, default w8a8) is written dequantized in 16
bits: vLLM's compressed-tensors method quantizes only linear layers (one note line
says so). What compressed-tensors or stock vLLM cannot express is refused with one
line (``ExportError``): a 4-bit KV cache (R3, key/value shifts), 4-bit activations
(stock vLLM has no W4A4 kernel on CPU), activations with a clip ratio below 1 or with
per-layer bits, static activation scales, tensor-parallel blocks (per-slice activation
scales), 16-bit-weight schemes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from vllm_quarot.errors import QuaRotError
from vllm_quarot.format import QuaRotFormat
from vllm_quarot.hadamard import hadamard_matrix
from vllm_quarot.models import (
    DOWN_PROJ,
    LM_HEAD,
    canonical_parts,
    layer_index,
    layer_prefix,
    linear_sizes,
)
from vllm_quarot.offline.checkpoint import ShardedWriter, TensorSource, staged_dir
from vllm_quarot.quant import dequantize_weight, unpack_weight

TARGETS = ("compressed-tensors",)
R4_SCHEME = "R4"  # transform_config group name; tensors ...down_proj.R4_input.weight
# where the R4 matrix is stored once (llm-compressor stores a shared transform on the
# first module it applies to)
R4_TENSOR = f"{layer_prefix(0)}{DOWN_PROJ}.{R4_SCHEME}_input.weight"
COPY_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
              "vocab.json", "merges.txt")
# compressed-tensors' on-disk version we write (the main venv's library reads it)
CT_VERSION = "0.17.0"


class ExportError(QuaRotError):
    """A checkpoint (or option) the export cannot express (one line, exit 2)."""


@dataclasses.dataclass
class ExportSummary:
    out_dir: Path
    fmt: str
    scheme: str
    transforms: list[str]
    notes: list[str]
    mib: float

    def format(self) -> str:
        lines = [f"wrote {self.out_dir} ({self.fmt}, {self.scheme}, {self.mib:.1f} MiB of "
                 "tensors)",
                 "online transforms: " + (", ".join(self.transforms) or "none")
                 + (" (stock vLLM serves transforms on CUDA only; compressed-tensors "
                    "applies them in PyTorch)" if self.transforms else
                    " (stock vLLM serves it on CPU and GPU)")]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def check_exportable(fmt: QuaRotFormat) -> None:
    """Raise ExportError (one line) for what compressed-tensors / stock vLLM cannot
    express."""
    if fmt.kv_cache is not None:
        raise ExportError(
            f"scheme {fmt.scheme}: a 4-bit KV cache (online R3, key/value shifts, "
            "SmoothAttention) has no compressed-tensors form that stock vLLM serves; serve "
            "it with the plugin")
    if fmt.weight.bits >= 16:
        raise ExportError(f"scheme {fmt.scheme} keeps 16-bit weights: nothing to export")
    if fmt.tp_blocks != 1:
        raise ExportError(
            f"tensor_parallel_blocks {fmt.tp_blocks}: per-(token, 1/N slice) activation "
            "scales and a block-diagonal R4 have no compressed-tensors form; quantize "
            "with --tp 1 to export")
    act = fmt.activation
    if act is not None:
        if act.bits == 4:
            raise ExportError(
                f"scheme {fmt.scheme}: 4-bit activations have no stock vLLM kernel on CPU "
                "(compressed-tensors' W4A4 is served on GPUs only); serve it with the "
                "plugin")
        if act.static:
            raise ExportError(f"scheme {fmt.scheme}: static per-tensor activation scales "
                              "are not exported (use w8a8: dynamic per token)")
        if act.clip_ratio != 1.0:
            raise ExportError(
                f"activation clip ratio {act.clip_ratio}: compressed-tensors' dynamic "
                "per-token quantization has no clip; quantize with --act-clip 1.0")
        if act.layer_bits:
            raise ExportError("activation.layer_bits (--a8-layers): compressed-tensors "
                              "has one activation scheme per config group here")
        if fmt.weight.bits != 8:
            raise ExportError(
                f"scheme {fmt.scheme}: {fmt.weight.bits}-bit weights with "
                f"{act.bits}-bit activations are not exported (W4A16 and W8A8 are)")
    if fmt.rotation.input_transforms:
        raise ExportError(
            "rotation.input_transforms (quantize --r1 online, or an imported checkpoint): "
            "the export writes R4 as compressed-tensors' only transform; quantize with "
            "--r1 fused to export")
    if fmt.rotation.r3 is not None:  # (only with a KV cache; kept for completeness)
        raise ExportError("rotation.r3 (online, on queries and keys) cannot be expressed")


def quantization_config(fmt: QuaRotFormat) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` for fmt (checked exportable)."""
    w = fmt.weight
    group = w.group_size != -1
    weights = {"num_bits": w.bits, "type": "int", "symmetric": True,
               "strategy": "group" if group else "channel",
               "group_size": w.group_size if group else None, "dynamic": False,
               "actorder": None, "observer": "minmax", "observer_kwargs": {},
               "block_structure": None}
    fmt_name = "pack-quantized" if fmt.activation is None else "int-quantized"
    acts = None
    if fmt.activation is not None:
        acts = {"num_bits": fmt.activation.bits, "type": "int", "symmetric": True,
                "strategy": "token", "dynamic": True, "group_size": None,
                "actorder": None, "observer": None, "observer_kwargs": {},
                "block_structure": None}
    cfg: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": fmt_name,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": acts,
                                      "output_activations": None, "format": fmt_name}},
        "ignore": [LM_HEAD],
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "global_compression_ratio": None,
        "version": CT_VERSION,
    }
    if fmt.rotation.r4 is not None:
        cfg["transform_config"] = {"config_groups": {R4_SCHEME: {
            "type": "random-hadamard",
            "apply": [{"targets": [f"re:.*{DOWN_PROJ}$"], "location": "input",
                       "inverse": False, "ignore": []}],
            "randomize": False, "requires_grad": False, "head_dim": None,
            "precision": "torch.float32"}}}
    return cfg


def r4_matrix(fmt: QuaRotFormat, dtype: torch.dtype) -> torch.Tensor:
    """The unnormalised ±1 matrix M of our R4 (hadamard_transform(x) == x @ M / √n)."""
    assert fmt.rotation.r4 is not None
    return hadamard_matrix(fmt.rotation.r4.size, torch.float64, normalized=False).to(dtype)


def export_checkpoint(src_dir: str | Path, out_dir: str | Path, to: str = "compressed-tensors",
                      overwrite: bool = False) -> ExportSummary:
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if to not in TARGETS:
        raise ExportError(f"--to {to!r}: the export writes {', '.join(TARGETS)}")
    cfg_path = src_dir / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{src_dir} is not a model directory (no config.json)")
    raw = json.loads(cfg_path.read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "quarot":
        raise ExportError(f"{src_dir} is not a QuaRot checkpoint (quant_method "
                          f"{qc.get('quant_method')!r})")
    fmt = QuaRotFormat.from_dict(qc)  # CheckpointFormatError: a QuaRotError too
    check_exportable(fmt)
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(src_dir)
    fmt.check_model(hf_cfg)
    src = TensorSource(src_dir)
    dtype_name = str(raw.get("dtype") or raw.get("torch_dtype"))
    out_dtype = {"float16": torch.float16}.get(dtype_name, torch.bfloat16)
    notes: list[str] = []
    with staged_dir(out_dir, overwrite) as stage:
        writer = ShardedWriter(stage)
        for name in sorted(src.keys()):
            t = src.get(name)
            base, _, leaf = name.rpartition(".")
            if base == LM_HEAD and leaf in ("weight_packed", "weight_scale"):
                if leaf == "weight_packed":
                    assert fmt.lm_head is not None
                    scale = src.get(f"{LM_HEAD}.weight_scale")
                    codes = unpack_weight(t, fmt.lm_head.bits, hf_cfg.hidden_size)
                    gs = -1 if scale.shape[1] == 1 else codes.shape[1] // scale.shape[1]
                    writer.add(f"{LM_HEAD}.weight",
                               dequantize_weight(codes, scale, gs, torch.float32).to(out_dtype))
                    notes.append(f"lm_head ({fmt.lm_head.name}) written dequantized in "
                                 f"{str(out_dtype).removeprefix('torch.')}: vLLM's "
                                 "compressed-tensors method quantizes linear layers only")
                continue
            if leaf == "weight_packed":
                k = _in_features(hf_cfg, base)
                if fmt.activation is None:  # pack-quantized: the same int32 words
                    writer.add(name, t)
                    writer.add(f"{base}.weight_shape",
                               torch.tensor([t.shape[0], k], dtype=torch.int64))
                else:  # int-quantized: plain int8 codes
                    writer.add(f"{base}.weight", unpack_weight(t, fmt.weight.bits, k))
                continue
            writer.add(name, t)  # weight_scale, biases, norms, embeddings, 16-bit head
        transforms = []
        if fmt.rotation.r4 is not None:
            writer.add(R4_TENSOR, r4_matrix(fmt, out_dtype))
            r4 = fmt.rotation.r4
            transforms.append(f"R4 (down_proj input, {r4.construction} "
                              f"{r4.factors[0]}×{r4.factors[1]}, order {r4.size})")
        files = writer.close()
        out_cfg = {k: v for k, v in raw.items() if k != "quantization_config"}
        out_cfg["quantization_config"] = quantization_config(fmt)
        (stage / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True) + "\n")
        for f in COPY_FILES:
            if (src_dir / f).is_file():
                shutil.copyfile(src_dir / f, stage / f)
        (stage / "README.md").write_text(
            f"# {fmt.scheme} exported from a vllm-quarot checkpoint\n\n"
            f"compressed-tensors format (`vllm-quarot export {src_dir.name} ... --to "
            f"compressed-tensors`). R1/R2 are fused into the weights"
            + (", R4 is a transform_config scheme applied online at down_proj's input"
               if transforms else "") + ".\n")
        mib = sum(f.stat().st_size for f in files) / 2**20
    return ExportSummary(out_dir, quantization_config(fmt)["format"], fmt.scheme, transforms,
                         notes, mib)


def _in_features(cfg: Any, base: str) -> int:
    """A decoder linear's input size (a fused one's: its parts share their input)."""
    i = layer_index(base)
    if i is None:
        raise ExportError(f"{base}.weight_packed: a quantized linear outside the decoder "
                          "layers (only lm_head has one)")
    part = canonical_parts(base)[0]
    return linear_sizes(cfg)[part[len(layer_prefix(i)):]][1]


def load_with_transforms(ct_dir: str | Path, dtype: torch.dtype = torch.float32,
                         ) -> torch.nn.Module:
    """A compressed-tensors checkpoint in PyTorch with its online transforms: the model
    as transformers loads it (compressed-tensors decompresses the weights; transformers
    ignores ``transform_config``), then compressed-tensors' own
    ``apply_transform_config`` attaches the online transforms (the offline ones are
    fused into the stored weights already) and every transform module gets
    the matrix stored in the checkpoint (``<module>.<scheme>_<location>.weight``; a
    matrix stored once is shared by every module of its scheme and size, as
    llm-compressor saves them)."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase
    from transformers import AutoModelForCausalLM

    ct_dir = Path(ct_dir)
    model = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=dtype).eval()
    _quantize_inputs(model)
    qc = json.loads((ct_dir / "config.json").read_text()).get("quantization_config") or {}
    tc = qc.get("transform_config")
    if not tc:
        return model
    # offline entries (weight_input / weight_output) are in the stored weights already
    online = {k: {**g, "apply": [a for a in g.get("apply") or []
                                 if a.get("location") not in ("weight_input", "weight_output")]}
              for k, g in tc["config_groups"].items()}
    apply_transform_config(model, TransformConfig.model_validate({"config_groups": online}))
    src = TensorSource(ct_dir)
    stored: dict[tuple[str, int], torch.Tensor] = {}  # (scheme, size) -> matrix
    for name in src.keys():
        stem, _, leaf = name.rpartition(".")
        scheme = stem.rpartition(".")[2].rsplit("_", 1)[0]
        if leaf == "weight" and scheme in tc["config_groups"]:
            t = src.get(name)
            stored[(scheme, t.shape[0])] = t
    for name, mod in model.named_modules():
        if not isinstance(mod, TransformBase):
            continue
        scheme = name.rpartition(".")[2].rsplit("_", 1)[0]
        key = (scheme, mod.weight.shape[0])
        if key not in stored:
            raise ExportError(f"{ct_dir}: no stored matrix for transform {name} "
                              f"(scheme {scheme}, size {key[1]})")
        with torch.no_grad():
            mod.weight.data = stored[key].to(mod.weight.dtype)
    return model


def _quantize_inputs(model: torch.nn.Module) -> None:
    """Input activation quantization (W4A4 / W4A8 / W8A8 schemes) as compressed-tensors
    runs it in PyTorch: transformers decompresses the weights but leaves each Linear's
    plain forward, so the modules whose scheme quantizes inputs get compressed-tensors'
    own quantized forward (its dynamic per-token scales; the stored weights are used as
    they are). It runs inside forward, after the transforms' pre-hooks."""
    from compressed_tensors.quantization.lifecycle.forward import set_forward_quantized

    for mod in model.modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if isinstance(mod, torch.nn.Linear) and scheme is not None and scheme.input_activations:
            set_forward_quantized(mod)
