"""``vllm-quarot import CT_CKPT OUT``: an llm-compressor (compressed-tensors) checkpoint
with online transforms — QuIP's input rotations on every linear, SpinQuant's R4 — as a
vllm-quarot checkpoint that the plugin serves on CPU (stock vLLM 0.32 applies transforms
with CUDA ops only) and, where the transform blocks lie within a shard, at tensor
parallelism.

What is read, and how it maps (anything else is refused with one line, ``ImportError_``):

* weights: one config group on ``Linear``, symmetric ``int`` weights — 4-bit per channel
  or group, ``pack-quantized`` (the int32 words are our layout already, scales become
  float32) or ``int-quantized`` (one int8 per weight, packed here; what llm-compressor
  0.14 writes when the inputs are quantized too) without input quantization (W4A16) or
  with dynamic per-token 4- or 8-bit inputs (W4A4, W4A8: quantized as
  compressed-tensors quantizes them, absmax / 7.5 and / 127.5, the model llm-compressor
  evaluates in memory; stock vLLM has no CPU kernel for 4-bit inputs and applies no
  online transform on CPU), or ``int-quantized`` 8-bit
  per channel with dynamic per-token 8-bit inputs (W8A8, absmax / 127 as stock vLLM
  serves it); act-order ``static``/``weight`` (no ``g_idx``); ``lm_head`` ignored;
* transforms (``transform_config``): ``weight_input`` / ``weight_output`` entries are
  fused into the stored weights already (nothing to do); ``input`` entries are online —
  each becomes a ``rotation.input_transforms`` record with the stored matrix (one per
  scheme and size, as llm-compressor saves them, transposed when ``inverse``) written to
  TRANSFORMS_FILE; ``head_dim`` makes the matrix one block of a block-diagonal
  transform. Online ``output``, ``q_attn`` / ``k_cache`` (R3) locations, ``randomize``
  (a permutation per module), and transforms that differ across the parts of a
  vLLM-merged linear (the format's rule) are refused.

The targets are resolved by compressed-tensors' own matcher on the model skeleton (meta
tensors), so ``Linear``, ``re:`` patterns and module names mean what they mean there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_quarot.errors import QuaRotError
from vllm_quarot.format import (
    ActivationSpec,
    CheckpointFormatError,
    InputTransform,
    QuaRotFormat,
    R1Spec,
    RotationSpec,
    WeightSpec,
)
from vllm_quarot.interop.compressed_tensors import COPY_FILES
from vllm_quarot.models import LINEARS, LM_HEAD, layer_index, layer_prefix
from vllm_quarot.offline.checkpoint import ShardedWriter, TensorSource, staged_dir
from vllm_quarot.quant import pack_weight, qmax
from vllm_quarot.stored_transforms import matrix_sha256, write_transforms

ONLINE, FUSED = ("input",), ("weight_input", "weight_output")


class ImportError_(QuaRotError):  # noqa: N801 (ImportError is a builtin)
    """A compressed-tensors checkpoint the import cannot serve (one line, exit 2)."""


@dataclasses.dataclass
class ImportSummary:
    out_dir: Path
    scheme: str
    transforms: list[str]
    fused: list[str]
    mib: float

    def format(self) -> str:
        return "\n".join([
            f"wrote {self.out_dir} ({self.scheme}, {self.mib:.1f} MiB of tensors)",
            "online transforms: " + ("; ".join(self.transforms) or "none"),
            "fused into the weights already: " + (", ".join(self.fused) or "none"),
            f"serve: vllm serve {self.out_dir} --quantization quarot"])


def _scheme(qc: dict[str, Any]) -> tuple[str, WeightSpec, ActivationSpec | None]:
    """Our scheme for the checkpoint's one config group."""
    if qc.get("quantization_status") not in (None, "compressed"):
        raise ImportError_(f"quantization_status {qc.get('quantization_status')!r}: only "
                           "compressed (saved) checkpoints are imported")
    if qc.get("kv_cache_scheme"):
        raise ImportError_("kv_cache_scheme is set: a quantized KV cache is not imported "
                           "(serve the 16-bit cache, or quantize with vllm-quarot for KV4)")
    if qc.get("sparsity_config"):
        raise ImportError_("sparsity_config is set: sparse checkpoints are not imported")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ImportError_(f"{len(groups)} config groups: the import reads one scheme "
                           "applied to every Linear")
    g = next(iter(groups.values()))
    if list(g.get("targets") or []) != ["Linear"]:
        raise ImportError_(f"config group targets {g.get('targets')}: the import reads one "
                           "group targeting Linear")
    w, a = g.get("weights") or {}, g.get("input_activations")
    fmt_name = g.get("format") or qc.get("format")
    if w.get("type") != "int" or not w.get("symmetric") or w.get("dynamic"):
        raise ImportError_(f"weights {w.get('type')} symmetric={w.get('symmetric')} "
                           f"dynamic={w.get('dynamic')}: the import reads static symmetric "
                           "int weights")
    if w.get("actorder") not in (None, "static", "weight"):
        raise ImportError_(f"weights actorder {w.get('actorder')!r} stores a g_idx "
                           "permutation, which the import does not read")
    strategy, bits = w.get("strategy"), w.get("num_bits")
    if strategy not in ("channel", "group") or w.get("block_structure"):
        raise ImportError_(f"weight strategy {strategy!r}: the import reads per-channel or "
                           "per-group scales")
    gs = int(w["group_size"]) if strategy == "group" else -1
    # 4-bit weights come pack-quantized (int32 words) or, as llm-compressor 0.14 writes
    # them whenever the inputs are quantized too, int-quantized (one int8 per weight)
    four = bits == 4 and fmt_name in ("pack-quantized", "int-quantized")
    if a is None and four:
        return "w4a16", WeightSpec(bits=4, group_size=gs, method="imported"), None
    dynamic_token = (a is not None and a.get("type") == "int" and a.get("symmetric")
                     and a.get("dynamic") is True and a.get("strategy") == "token")
    if dynamic_token and fmt_name == "int-quantized" and bits == 8 and gs == -1 \
            and a.get("num_bits") == 8:
        # stock vLLM serves these (CPU included) with absmax / 127: clip 1.0, as ours
        return ("w8a8", WeightSpec(bits=8, group_size=-1, method="imported"),
                ActivationSpec(bits=8, clip_ratio=1.0))
    if dynamic_token and four and a.get("num_bits") in (4, 8):
        ab = int(a["num_bits"])
        return (f"w4a{ab}", WeightSpec(bits=4, group_size=gs, method="imported"),
                ActivationSpec(bits=ab, clip_ratio=ct_activation_clip(ab)))
    acts = "none" if a is None else (f"{a.get('num_bits')}-bit {a.get('strategy')} "
                                     f"dynamic={a.get('dynamic')}")
    raise ImportError_(f"format {fmt_name!r}, {bits}-bit {strategy} weights, activations "
                       f"{acts}: the import reads 4-bit W4A16, W4A4 / W4A8 (pack- or "
                       "int-quantized; dynamic per-token 4- or 8-bit inputs) and W8A8 "
                       "(int-quantized, dynamic per-token inputs)")


def ct_activation_clip(bits: int) -> float:
    """Our activation clip_ratio that reproduces compressed-tensors' dynamic symmetric
    per-token quantization, scale absmax / ((qmax - qmin) / 2) — absmax / 7.5 at 4 bits,
    / 127.5 at 8 — where ours is absmax · r with r = float32(clip / qmax).

    r is the largest float32 below 2 / (qmax - qmin) rather than the nearest one: the
    token's largest |x| then lands at or just above 7.5 (127.5) steps, never just below,
    and rounds half-to-even to 8 (128) as exact arithmetic does — clamped to 7 when
    positive, kept at −8 when negative. With the nearest float32 (above 1 / 7.5) a
    negative maximum became −7 in about half the tokens (1.9 % of the logits on a test
    model, 0.06 % with this r). compressed-tensors' own float32 division sends a few
    maxima to −7 too (4 tokens of 64 in tests/test_interop_import.py); every other code
    agrees."""
    qmax = (1 << (bits - 1)) - 1
    exact = 2 / ((1 << bits) - 1)
    r = np.float32(exact)
    if float(r) >= exact:
        r = np.nextafter(r, np.float32(0))
    return qmax * float(r)  # exact in double: clip / qmax gives r back


def _skeleton(hf_cfg: Any) -> torch.nn.Module:
    """The model on meta tensors (compressed-tensors' matcher walks its modules)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(hf_cfg)  # built unquantized: only the module tree is wanted
    cfg.quantization_config = None
    del cfg.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _transforms(tc: dict[str, Any], model: torch.nn.Module, src: TensorSource,
                hf_cfg: Any) -> tuple[list[InputTransform], dict[str, torch.Tensor], list[str]]:
    """The online input transforms (records + matrices) and the names of the fused ones."""
    from compressed_tensors.utils import match_named_modules

    from vllm_quarot.models import linear_sizes

    sizes = linear_sizes(hf_cfg)
    n_layers = hf_cfg.num_hidden_layers
    records, matrices, fused = [], {}, []
    for scheme, t in (tc.get("config_groups") or {}).items():
        if t.get("randomize"):
            raise ImportError_(f"transform {scheme!r}: randomize=true (a permutation per "
                               "module) is not imported")
        head_dim = t.get("head_dim")
        by_size: dict[int, list[str]] = {}
        for ap in t.get("apply") or []:
            loc = ap.get("location")
            if loc in FUSED:
                fused.append(f"{scheme} ({loc})")
                continue
            if loc not in ONLINE:
                raise ImportError_(
                    f"transform {scheme!r} at location {loc!r} runs online where the "
                    "plugin has no hook (it serves online transforms at linear inputs)")
            names = [n for n, _ in match_named_modules(model, ap.get("targets") or [],
                                                       ap.get("ignore") or [])]
            per_layer: dict[int, set[str]] = {}
            for n in names:
                i = layer_index(n)
                lin = n[len(layer_prefix(i)):] if i is not None else n
                if i is None or lin not in LINEARS:
                    raise ImportError_(f"transform {scheme!r} targets {n}: the plugin "
                                       "applies online transforms to decoder linears only")
                per_layer.setdefault(i, set()).add(lin)
            kinds = {frozenset(v) for v in per_layer.values()}
            if len(kinds) != 1 or len(per_layer) != n_layers:
                raise ImportError_(f"transform {scheme!r} targets different linears in "
                                   "different layers: the import needs the same on every "
                                   "layer")
            for lin in sorted(kinds.pop()):
                size = int(head_dim) if head_dim else sizes[lin][1]
                by_size.setdefault(size, []).append(lin)
            inverse = bool(ap.get("inverse"))
            for size, lins in by_size.items():
                m = _stored_matrix(src, scheme, "input", size)
                key = f"{scheme}_input_{size}" + ("_inv" if inverse else "")
                matrices[key] = m.t().contiguous() if inverse else m
                records.append(InputTransform(name=key, size=size, linears=tuple(lins),
                                              sha256=matrix_sha256(matrices[key])))
            by_size.clear()
    return records, matrices, fused


def _stored_matrix(src: TensorSource, scheme: str, loc: str, size: int) -> torch.Tensor:
    """The one matrix of (scheme, size) in the checkpoint (llm-compressor saves a
    shared transform once, on the first module it applies to)."""
    suffix = f".{scheme}_{loc}.weight"
    found = [src.get(n) for n in src.keys() if n.endswith(suffix)]
    found = [m for m in found if tuple(m.shape) == (size, size)]
    if not found:
        raise ImportError_(f"transform {scheme!r} ({loc}, order {size}): no stored matrix "
                           f"(*{suffix} of {size}×{size}) in the checkpoint")
    if any(not torch.equal(found[0], m) for m in found[1:]):
        raise ImportError_(f"transform {scheme!r} ({loc}, order {size}): the checkpoint "
                           "stores different matrices per module; not imported")
    return found[0].to(torch.float32)


def import_checkpoint(ct_dir: str | Path, out_dir: str | Path,
                      overwrite: bool = False) -> ImportSummary:
    ct_dir, out_dir = Path(ct_dir), Path(out_dir)
    cfg_path = ct_dir / "config.json"
    if not cfg_path.is_file():
        raise ImportError_(f"{ct_dir} is not a model directory (no config.json)")
    raw = json.loads(cfg_path.read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise ImportError_(f"{ct_dir} is not a compressed-tensors checkpoint (quant_method "
                           f"{qc.get('quant_method')!r})")
    scheme, weight, act = _scheme(qc)
    ignore = list(qc.get("ignore") or [])
    if any(n != LM_HEAD for n in ignore) or not ignore:
        raise ImportError_(f"ignore {ignore}: the import reads checkpoints that quantize "
                           "every decoder linear and leave lm_head in 16 bits")
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(ct_dir)
    src = TensorSource(ct_dir)
    tc = qc.get("transform_config") or {}
    records, matrices, fused = _transforms(tc, _skeleton(hf_cfg), src, hf_cfg)
    transform_names = {f".{s}_{loc}.{leaf}" for s in (tc.get("config_groups") or {})
                       for loc in ("input", "output", "weight_input", "weight_output")
                       for leaf in ("weight", "perm")}
    try:  # the format's own rules (e.g. one transform per vLLM-merged linear)
        fmt = QuaRotFormat(
            scheme=scheme, weight=weight, activation=act,
            rotation=RotationSpec(r1=R1Spec(kind="none"), input_transforms=tuple(records)),
            ignore=(LM_HEAD,),
            quantizer={"source": str(ct_dir), "rotate": "imported",
                       "imported_from": "compressed-tensors " + str(qc.get("version")),
                       "scheme": scheme, "transform_config": tc or None})
        fmt = QuaRotFormat.from_dict(fmt.to_dict())
        fmt.check_model(hf_cfg)
    except CheckpointFormatError as e:
        raise ImportError_(f"not imported: {e}") from None
    with staged_dir(out_dir, overwrite) as stage:
        writer = ShardedWriter(stage)
        for name in sorted(src.keys()):
            if any(name.endswith(s) for s in transform_names):
                continue
            base, _, leaf = name.rpartition(".")
            if leaf in ("weight_zero_point", "weight_g_idx", "input_scale",
                        "input_zero_point"):
                raise ImportError_(f"{name}: the import reads symmetric, dynamic-input "
                                   "checkpoints without g_idx")
            if leaf == "weight_shape":
                continue
            t = src.get(name)
            if leaf == "weight_scale":
                writer.add(name, t.to(torch.float32).reshape(t.shape[0], -1))
            elif leaf == "weight_packed":
                writer.add(name, t)
            elif leaf == "weight" and layer_index(base) is not None and t.dtype == torch.int8:
                top = qmax(weight.bits)
                if t.numel() and not (-top - 1 <= int(t.min()) and int(t.max()) <= top):
                    raise ImportError_(f"{name}: int8 codes outside the {weight.bits}-bit "
                                       "range the config declares")
                writer.add(f"{base}.weight_packed", pack_weight(t, weight.bits))
            else:
                writer.add(name, t)
        files = writer.close()
        if matrices:
            write_transforms(stage, matrices)
        out_cfg = {k: v for k, v in raw.items() if k != "quantization_config"}
        out_cfg["quantization_config"] = fmt.to_dict()
        (stage / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True) + "\n")
        for f in COPY_FILES:
            if (ct_dir / f).is_file():
                shutil.copyfile(ct_dir / f, stage / f)
        mib = sum(f.stat().st_size for f in files) / 2**20
    return ImportSummary(
        out_dir, scheme,
        [f"{r.name}: order {r.size} before {', '.join(r.linears)}" for r in records],
        fused, mib)
