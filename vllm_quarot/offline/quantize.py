"""``vllm-quarot quantize``: rotate a Hugging Face checkpoint with QuaRot and quantize it.

Streams the model one decoder layer at a time (float64 maths; calibration activations
kept in float32), so peak memory is one layer plus the calibration activations plus
the (small) quantized output, never two copies of the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vllm_quarot import __version__
from vllm_quarot.format import (
    SUPPORTED_ARCHITECTURES,
    ActivationSpec,
    KVCacheSpec,
    OnlineHadamard,
    QuaRotFormat,
    RotationSpec,
    WeightSpec,
)
from vllm_quarot.hadamard import HadamardSizeError, factorize, hadamard_transform, random_signs
from vllm_quarot.offline.checkpoint import ShardedWriter, TensorSource
from vllm_quarot.offline.gptq import HessianAccumulator, gptq_quantize
from vllm_quarot.offline.rotation import LINEARS, fold_norms, rotate_layer, rotate_rows_in
from vllm_quarot.quant import dequantize_weight, pack_weight, qmax, quantize_weight_rtn

log = logging.getLogger("vllm_quarot.quantize")

# scheme -> (weight bits, activation bits or None, kv bits or None)
SCHEMES: dict[str, tuple[int, int | None, int | None]] = {
    "w4a4kv4": (4, 4, 4),
    "w4a4": (4, 4, None),
    "w8a8": (8, 8, None),
    "w8a8-static": (8, 8, None),
    "w4a16": (4, None, None),
    "kv4": (16, None, 4),
}
STATIC_SCHEMES = ("w8a8-static",)  # per-tensor activation scales calibrated offline
ROTATIONS = ("quarot", "r1r2", "none")
COPY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class QuantizeError(ValueError):
    """A bad option, model or calibration input for the quantizer."""


@dataclasses.dataclass
class QuantizeOptions:
    scheme: str = "w4a4"
    weight_method: str = "gptq"
    calib: str | None = None
    calib_self: int | None = None
    nsamples: int = 128
    seqlen: int = 2048
    group_size: int = -1
    w_clip: bool = False
    act_clip: float | None = None  # default: 0.9 at 4 bits, 1.0 at 8 bits
    kv_clip: float = 0.95
    seed: int = 0
    device: str = "cpu"
    online_hadamard: bool = True
    rotate: str = "quarot"
    act_order: bool = False
    damp: float = 0.01
    verify: bool = False


@dataclasses.dataclass
class QuantizeSummary:
    out_dir: Path
    seconds: float
    peak_rss_gib: float
    checkpoint_bytes: int
    layer_errors: dict[str, float]
    verify_max_rel_err: float | None

    def format(self) -> str:
        worst = sorted(self.layer_errors.items(), key=lambda kv: -kv[1])[:5]
        lines = [
            f"wrote {self.out_dir} ({self.checkpoint_bytes / 2**20:.1f} MiB of tensors)",
            f"time {self.seconds:.1f} s, peak RSS {self.peak_rss_gib:.2f} GiB",
            "largest relative output errors: "
            + ", ".join(f"{k} {v:.4f}" for k, v in worst),
        ]
        if self.verify_max_rel_err is not None:
            lines.append(f"verify: rotated fp64 model vs original, max rel err "
                         f"{self.verify_max_rel_err:.2e}")
        return "\n".join(lines)


def _check_options(o: QuantizeOptions) -> None:
    if o.scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {o.scheme!r}; choose one of {', '.join(SCHEMES)}")
    if o.weight_method not in ("gptq", "rtn"):
        raise QuantizeError(f"--weight-method must be gptq or rtn, got {o.weight_method!r}")
    if o.rotate not in ROTATIONS:
        raise QuantizeError(f"--rotate must be one of {ROTATIONS}, got {o.rotate!r}")
    if o.group_size != -1 and o.group_size <= 0:
        raise QuantizeError(f"--group-size must be -1 or positive, got {o.group_size}")
    for name, v in (("--act-clip", o.act_clip), ("--kv-clip", o.kv_clip)):
        if v is not None and not 0.0 < v <= 1.0:
            raise QuantizeError(f"{name} must be in (0, 1], got {v}")
    needs_calib = (o.weight_method == "gptq" and SCHEMES[o.scheme][0] < 16) or (
        o.scheme in STATIC_SCHEMES)
    if needs_calib and o.calib is None and not o.calib_self:
        raise QuantizeError(
            f"{'static activation scales' if o.scheme in STATIC_SCHEMES else 'GPTQ'} "
            "need calibration text: give --calib FILE or --calib-self N")
    if o.calib is not None and not Path(o.calib).is_file():
        raise QuantizeError(f"calibration file {o.calib} does not exist")
    if o.device != "cpu":
        raise QuantizeError(
            f"--device {o.device}: this version quantizes on the CPU only (--device cpu)"
        )


def _model_classes(cfg: Any) -> tuple[type, type]:
    """Decoder-layer and rotary-embedding classes of this architecture."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    inner = model.model
    return type(inner.layers[0]), type(inner.rotary_emb)


class RMSNorm64(torch.nn.Module):
    """RMSNorm computed in the input's dtype (transformers' upcasts only to float32,
    which would cap the invariance check at ~1e-7)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=torch.float64))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _use_exact_norms(module: torch.nn.Module) -> None:
    for name, child in list(module.named_modules()):
        if type(child).__name__.endswith("RMSNorm"):
            eps = getattr(child, "variance_epsilon", getattr(child, "eps", 1e-6))
            module.set_submodule(name, RMSNorm64(child.weight.shape[0], eps))


class _LayerRunner:
    """Runs one transformers decoder layer in float64 over batches of hidden states."""

    def __init__(self, cfg: Any, layer_cls: type, rotary: torch.nn.Module, idx: int):
        self.module = layer_cls(cfg, layer_idx=idx).double().eval()
        _use_exact_norms(self.module)
        self.rotary = rotary
        self.r4_hook = None

    def load(self, sd: dict[str, torch.Tensor], online_r4: bool) -> None:
        self.module.load_state_dict({k: v.double() for k, v in sd.items()}, strict=True)
        if online_r4 and self.r4_hook is None:
            self.r4_hook = self.module.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args: (hadamard_transform(args[0]),)
            )

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, batch: int = 8) -> torch.Tensor:
        out = torch.empty_like(h)
        t = h.shape[1]
        pos = torch.arange(t).unsqueeze(0)
        cos, sin = self.rotary(h[:1].double(), pos)
        pe = (cos.double(), sin.double())
        for i in range(0, h.shape[0], batch):
            x = h[i : i + batch].double()
            y = self.module(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
            out[i : i + batch] = (y[0] if isinstance(y, tuple) else y).to(h.dtype)
        return out


def _calibration_ids(model_dir: Path, tok: Any, o: QuantizeOptions) -> torch.Tensor:
    """[nsamples, seqlen] token windows: random windows of --calib, or self-generated."""
    g = torch.Generator().manual_seed(o.seed)
    if o.calib is not None:
        ids = tok(Path(o.calib).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        if ids.numel() <= o.seqlen:
            raise QuantizeError(
                f"calibration file {o.calib} has {ids.numel()} tokens, fewer than "
                f"--seqlen {o.seqlen}"
            )
        starts = torch.randint(0, ids.numel() - o.seqlen, (o.nsamples,), generator=g)
        return torch.stack([ids[s : s + o.seqlen] for s in starts.tolist()])
    log.info("generating %d calibration samples from the full-precision model", o.calib_self)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    torch.manual_seed(o.seed)
    samples = []
    for _ in tqdm(range(o.calib_self or 0), desc="self-calibration"):
        out = model.generate(
            torch.tensor([[bos]]), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            max_length=o.seqlen, min_length=o.seqlen, pad_token_id=bos,
        )
        samples.append(out[0, : o.seqlen])
    del model
    return torch.stack(samples)


def _output_dtype(cfg: Any) -> torch.dtype:
    return torch.float16 if getattr(cfg, "dtype", None) == torch.float16 else torch.bfloat16


def quantize(model_dir: str | Path, out_dir: str | Path, o: QuantizeOptions) -> QuantizeSummary:
    """Rotate and quantize model_dir into out_dir (checkpoint format v1)."""
    t0 = time.time()
    _check_options(o)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise QuantizeError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(model_dir)
    archs = list(getattr(cfg, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise QuantizeError(
            f"architecture {archs or cfg.model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if getattr(cfg, "quantization_config", None):
        raise QuantizeError(f"{model_dir} is already quantized; start from a 16/32-bit model")
    w_bits, a_bits, kv_bits = SCHEMES[o.scheme]
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    rotate = o.rotate != "none"
    online_r4 = o.rotate == "quarot" and o.online_hadamard and a_bits is not None
    r3 = o.rotate == "quarot" and o.online_hadamard and kv_bits is not None
    try:
        if rotate:
            factorize(hidden)
            factorize(head_dim)
        if online_r4:
            factorize(inter)
    except HadamardSizeError as e:
        raise QuantizeError(str(e)) from e
    act_clip = o.act_clip if o.act_clip is not None else (0.9 if a_bits == 4 else 1.0)
    static = o.scheme in STATIC_SCHEMES
    fmt = QuaRotFormat(
        scheme=o.scheme,
        weight=WeightSpec(w_bits, o.group_size, True, o.weight_method if w_bits < 16 else "none"),
        activation=None if a_bits is None else ActivationSpec(
            a_bits, act_clip, "static-per-tensor" if static else "per-token"),
        kv_cache=None if kv_bits is None else KVCacheSpec(kv_bits, -1, True, o.kv_clip),
        rotation=RotationSpec(
            r1_seed=o.seed,
            r1_kind="randomized-hadamard" if rotate else "none",
            r1_size=hidden if rotate else 0,
            r2_size=head_dim if rotate else 0,
            r3=OnlineHadamard.of_size(head_dim) if r3 else None,
            r4=OnlineHadamard.of_size(inter) if online_r4 else None,
        ),
        quantizer={
            "name": "vllm-quarot",
            "version": __version__,
            "weight_method": o.weight_method,
            "calibration": (
                f"file:{Path(o.calib).name}" if o.calib
                else f"self-generated:{o.calib_self}" if o.calib_self else "none"
            ),
            "nsamples": o.nsamples,
            "seqlen": o.seqlen,
            "w_clip": o.w_clip,
            "act_order": o.act_order,
            "rotate": o.rotate,
        },
    )
    fmt.validate()

    src = TensorSource(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    use_gptq = o.weight_method == "gptq" and w_bits < 16
    calib_ids = _calibration_ids(model_dir, tok, o) if use_gptq or static else None
    layer_cls, rotary_cls = _model_classes(cfg)
    cfg64 = copy.deepcopy(cfg)
    cfg64._attn_implementation = "sdpa"
    rotary = rotary_cls(config=cfg64)
    out_dtype = _output_dtype(cfg)
    signs = random_signs(hidden, o.seed) if rotate else None

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out_dir)
    embed = src.get("model.embed_tokens.weight").double()
    embed_rot = rotate_rows_in(embed, signs) if rotate else embed
    writer.add("model.embed_tokens.weight", embed_rot.to(out_dtype))

    h_cal = embed_rot[calib_ids].float() if calib_ids is not None else None
    verify_ids = None
    if o.verify:
        text = "The quick brown fox jumps over the lazy dog. " * 4
        verify_ids = tok(text, return_tensors="pt").input_ids[:, :32]
        h_orig, h_rot = embed[verify_ids], embed_rot[verify_ids]
    del embed

    layer_errors: dict[str, float] = {}
    verify_err = 0.0
    for i in tqdm(range(cfg.num_hidden_layers), desc=f"quantize {o.scheme}", unit="layer"):
        prefix = f"model.layers.{i}."
        sd = {k[len(prefix):]: src.get(k).double() for k in src.keys() if k.startswith(prefix)}
        if o.verify:
            runner = _LayerRunner(cfg64, layer_cls, rotary, i)
            runner.load(sd, online_r4=False)
            h_orig = runner(h_orig)
        fold_norms(sd)
        if rotate:
            rotate_layer(sd, signs, head_dim, r2=True, r4=online_r4)
        runner = _LayerRunner(cfg64, layer_cls, rotary, i)
        runner.load(sd, online_r4=online_r4)
        if o.verify:
            h_rot = runner(h_rot)
            ref = rotate_rows_in(h_orig, signs) if rotate else h_orig
            verify_err = max(verify_err, _rel_err(h_rot, ref))

        hessians = _collect_hessians(runner, h_cal) if h_cal is not None else {}
        for name in LINEARS:
            w = sd[f"{name}.weight"]
            key = f"{prefix}{name}"
            if w_bits >= 16:
                writer.add(f"{key}.weight", w.to(out_dtype))
            else:
                if use_gptq:
                    q, s = gptq_quantize(w, hessians[name].h, w_bits, o.group_size, o.w_clip,
                                         o.damp, act_order=o.act_order)
                else:
                    q, s = quantize_weight_rtn(w, w_bits, o.group_size, o.w_clip)
                deq = dequantize_weight(q, s, o.group_size, torch.float64)
                layer_errors[key] = _weight_error(w, deq, hessians.get(name))
                sd[f"{name}.weight"] = deq
                writer.add(f"{key}.weight_packed", pack_weight(q, w_bits))
                writer.add(f"{key}.weight_scale", s)
                if static:  # max calibration, as AMD Quark's per-tensor static W8A8
                    amax = torch.tensor([hessians[name].amax * act_clip], dtype=torch.float32)
                    writer.add(f"{key}.input_scale", (amax / qmax(a_bits)).clamp(
                        min=1e-12))
            if f"{name}.bias" in sd:
                writer.add(f"{key}.bias", sd[f"{name}.bias"].to(out_dtype))
        for k, v in sd.items():
            if not any(k.startswith(n + ".") for n in LINEARS):
                writer.add(prefix + k, v.to(out_dtype))
        if h_cal is not None:
            runner.load(sd, online_r4=online_r4)  # quantized weights feed the next layer
            h_cal = runner(h_cal)

    g_final = src.get("model.norm.weight").double()
    head = src.get("lm_head.weight") if "lm_head.weight" in src else src.get(
        "model.embed_tokens.weight")
    head = head.double()
    head_rot = head * g_final
    if rotate:
        head_rot = rotate_rows_in(head_rot, signs)
    writer.add("model.norm.weight", torch.ones_like(g_final).to(out_dtype))
    writer.add("lm_head.weight", head_rot.to(out_dtype))
    if o.verify:
        norm = RMSNorm64(hidden, cfg.rms_norm_eps)
        with torch.no_grad():
            norm.weight.copy_(g_final)
            logits_orig = norm(h_orig) @ head.t()
            norm.weight.fill_(1.0)
            logits_rot = norm(h_rot) @ head_rot.t()
        verify_err = max(verify_err, _rel_err(logits_rot, logits_orig))
        if verify_err > 1e-8:
            raise QuantizeError(
                f"--verify failed: the rotated full-precision model differs from the "
                f"original by a relative error of {verify_err:.3e} (> 1e-8)"
            )
    files = writer.close()
    _write_metadata(model_dir, out_dir, cfg, fmt, out_dtype, o)
    return QuantizeSummary(
        out_dir=out_dir,
        seconds=time.time() - t0,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        checkpoint_bytes=sum(f.stat().st_size for f in files),
        layer_errors=layer_errors,
        verify_max_rel_err=verify_err if o.verify else None,
    )


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _collect_hessians(runner: _LayerRunner, h: torch.Tensor) -> dict[str, HessianAccumulator]:
    """One forward pass over the calibration set, accumulating each linear's H."""
    acc: dict[str, HessianAccumulator] = {}
    hooks = []
    for name in LINEARS:
        mod = runner.module.get_submodule(name)
        acc[name] = HessianAccumulator(mod.in_features)
        hooks.append(mod.register_forward_pre_hook(
            lambda _m, args, a=acc[name]: a.add(args[0])))
    try:
        runner(h)
    finally:
        for hk in hooks:
            hk.remove()
    return acc


def _weight_error(w: torch.Tensor, deq: torch.Tensor, h: HessianAccumulator | None) -> float:
    """Relative output error ‖(W-Ŵ)X‖/‖WX‖ (via H), or relative weight error w/o data."""
    d = w - deq
    if h is None:
        return (d.norm() / w.norm()).item()
    num = torch.einsum("ij,jk,ik->", d, h.h, d)
    den = torch.einsum("ij,jk,ik->", w, h.h, w)
    return (num / den).clamp(min=0).sqrt().item()


def _write_metadata(
    model_dir: Path, out_dir: Path, cfg: Any, fmt: QuaRotFormat, dtype: torch.dtype,
    o: QuantizeOptions,
) -> None:
    cfg_dict = json.loads((model_dir / "config.json").read_text())
    cfg_dict["tie_word_embeddings"] = False
    cfg_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg_dict.pop("dtype", None)
    cfg_dict["quantization_config"] = fmt.to_dict()
    (out_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    for name in COPY_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    q = fmt.quantizer
    card = f"""# QuaRot {fmt.scheme} checkpoint

Made by vllm-quarot {__version__} from `{model_dir.name}`.

| | |
|---|---|
| scheme | `{fmt.scheme}` |
| weights | {fmt.weight.bits}-bit, {fmt.weight.method}, group size {fmt.weight.group_size} |
| activations | {fmt.activation or "16-bit"} |
| KV cache | {fmt.kv_cache or "16-bit"} |
| rotation | {o.rotate}, R1 seed {o.seed}, online R4 {fmt.rotation.r4_size or "off"} |
| calibration | {q["calibration"]} ({q["nsamples"]} × {q["seqlen"]} tokens) |

Serve it with `vllm serve THIS_DIR --quantization quarot` (vllm-quarot installed).
"""
    (out_dir / "README.md").write_text(card)
