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
from vllm_quarot.hadamard import (
    HadamardSizeError,
    block_hadamard_transform,
    factorize,
    hadamard_factor,
    random_signs,
)
from vllm_quarot.offline.calibration import calibration_ids
from vllm_quarot.offline.checkpoint import (
    ShardedWriter,
    TensorSource,
    check_output_dir,
    staged_dir,
)
from vllm_quarot.offline.gptq import HessianAccumulator, gptq_quantize
from vllm_quarot.offline.options import (
    SCHEMES,
    QuantizeError,
    QuantizeOptions,
    check_model_fits,
    check_options,
    tp_serving_warning,
)
from vllm_quarot.offline.rotation import LINEARS, fold_norms, rotate_layer, rotate_rows_in
from vllm_quarot.quant import dequantize_weight, pack_weight, qmax, quantize_weight_rtn

log = logging.getLogger("vllm_quarot.quantize")

__all__ = ["SCHEMES", "QuantizeError", "QuantizeOptions", "QuantizeSummary", "quantize"]

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


def _check_tensors(src: TensorSource, cfg: Any) -> None:
    """Every tensor the architecture needs is in the checkpoint (names only: cheap).
    An untied model without lm_head falls back to the embedding, as transformers does."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    missing = sorted(set(model.state_dict()) - {"lm_head.weight"} - set(src.keys()))
    if missing:
        raise QuantizeError(
            f"{src.dir} lacks {len(missing)} tensor(s) of a {type(model).__name__}: "
            + ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else ""))


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

    def __init__(self, cfg: Any, layer_cls: type, rotary: torch.nn.Module, idx: int,
                 r4_blocks: int = 1):
        self.module = layer_cls(cfg, layer_idx=idx).double().eval()
        _use_exact_norms(self.module)
        self.rotary = rotary
        self.r4_blocks = r4_blocks
        self.r4_hook = None

    def load(self, sd: dict[str, torch.Tensor], online_r4: bool) -> None:
        self.module.load_state_dict({k: v.double() for k, v in sd.items()}, strict=True)
        if online_r4 and self.r4_hook is None:
            n = self.module.mlp.down_proj.in_features // self.r4_blocks
            had_k = hadamard_factor(n, torch.float64)
            self.r4_hook = self.module.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args: (block_hadamard_transform(args[0], self.r4_blocks, had_k),)
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


def _output_dtype(cfg: Any) -> torch.dtype:
    return torch.float16 if getattr(cfg, "dtype", None) == torch.float16 else torch.bfloat16


def _load_config(model_dir: Path) -> Any:
    """The model's config; refused unless it is a supported, not yet quantized model."""
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
    return cfg


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the quantizer derives from the config and the options before reading a
    tensor: the checkpoint's format section and the sizes and switches of the run."""

    fmt: QuaRotFormat
    w_bits: int
    a_bits: int | None
    hidden: int
    head_dim: int
    rotate: bool  # R1 (and R2) folded into the weights
    online_r4: bool  # R4 folded into down_proj's input and applied online
    act_clip: float
    out_dtype: torch.dtype


def _plan_format(cfg: Any, o: QuantizeOptions) -> _Plan:
    """The QuaRotFormat this run writes; impossible Hadamard orders are refused here."""
    w_bits, a_bits, kv_bits = o.bits
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    rotate = o.rotate != "none"
    online_r4 = o.online_r4
    r3 = o.rotate == "quarot" and o.online_hadamard and kv_bits is not None
    try:
        if rotate:
            factorize(hidden)
            factorize(head_dim)
        if online_r4:
            factorize(inter // o.tp)
    except HadamardSizeError as e:
        raise QuantizeError(str(e)) from e
    act_clip = o.act_clip if o.act_clip is not None else (0.9 if a_bits == 4 else 1.0)
    fmt = QuaRotFormat(
        scheme=o.scheme,
        weight=WeightSpec(w_bits, o.group_size, True, o.weight_method if w_bits < 16 else "none"),
        activation=None if a_bits is None else ActivationSpec(
            a_bits, act_clip, "static-per-tensor" if o.static else "per-token"),
        kv_cache=None if kv_bits is None else KVCacheSpec(kv_bits, -1, True, o.kv_clip),
        rotation=RotationSpec(
            r1_seed=o.seed,
            r1_kind="randomized-hadamard" if rotate else "none",
            r1_size=hidden if rotate else 0,
            r2_size=head_dim if rotate else 0,
            r3=OnlineHadamard.of_size(head_dim) if r3 else None,
            r4=OnlineHadamard.of_size(inter, o.tp) if online_r4 else None,
        ),
        tp_blocks=o.tp,
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
            "online_hadamard": o.online_hadamard,
        },
    )
    fmt.validate()
    return _Plan(fmt, w_bits, a_bits, hidden, head_dim, rotate, online_r4, act_clip,
                 _output_dtype(cfg))


class _Verifier:
    """--verify: the original and the rotated full-precision models run side by side,
    layer by layer in float64, on a short text; hidden states and logits must agree."""

    TOL = 1e-8
    TEXT = "The quick brown fox jumps over the lazy dog. " * 4

    def __init__(self, tok: Any, embed: torch.Tensor, embed_rot: torch.Tensor,
                 signs: torch.Tensor | None):
        ids = tok(self.TEXT, return_tensors="pt").input_ids[:, :32]
        self.h_orig, self.h_rot = embed[ids], embed_rot[ids]
        self.signs = signs
        self.max_err = 0.0

    def original_layer(self, runner: _LayerRunner) -> None:
        self.h_orig = runner(self.h_orig)

    def rotated_layer(self, runner: _LayerRunner) -> None:
        self.h_rot = runner(self.h_rot)
        ref = rotate_rows_in(self.h_orig, self.signs) if self.signs is not None else self.h_orig
        self.max_err = max(self.max_err, _rel_err(self.h_rot, ref))

    def finish(self, eps: float, g_final: torch.Tensor, head: torch.Tensor,
               head_rot: torch.Tensor) -> float:
        """Compare the logits (final norm + head); raise above TOL; the max error."""
        norm = RMSNorm64(g_final.shape[0], eps)
        with torch.no_grad():
            norm.weight.copy_(g_final)
            logits_orig = norm(self.h_orig) @ head.t()
            norm.weight.fill_(1.0)
            logits_rot = norm(self.h_rot) @ head_rot.t()
        self.max_err = max(self.max_err, _rel_err(logits_rot, logits_orig))
        if self.max_err > self.TOL:
            raise QuantizeError(
                f"--verify failed: the rotated full-precision model differs from the "
                f"original by a relative error of {self.max_err:.3e} (> {self.TOL:g})"
            )
        return self.max_err


class _Streamer:
    """Streams one checkpoint through rotation and quantization into a ShardedWriter:
    embedding, then each decoder layer (calibration activations carried from one layer
    to the next through the already quantized weights), then norm and head."""

    def __init__(self, cfg: Any, o: QuantizeOptions, plan: _Plan, src: TensorSource,
                 writer: ShardedWriter):
        self.cfg, self.o, self.plan, self.src, self.writer = cfg, o, plan, src, writer
        self.layer_cls, rotary_cls = _model_classes(cfg)
        self.cfg64 = copy.deepcopy(cfg)
        self.cfg64._attn_implementation = "sdpa"
        self.rotary = rotary_cls(config=self.cfg64)
        self.signs = random_signs(plan.hidden, o.seed) if plan.rotate else None
        self.verifier: _Verifier | None = None
        self.layer_errors: dict[str, float] = {}

    def run(self, tok: Any, calib_ids: torch.Tensor | None) -> None:
        h_cal = self.embedding(tok, calib_ids)
        for i in tqdm(range(self.cfg.num_hidden_layers), desc=f"quantize {self.o.scheme}",
                      unit="layer"):
            h_cal = self.layer(i, h_cal)
        self.head()

    def _runner(self, i: int, sd: dict[str, torch.Tensor], online_r4: bool) -> _LayerRunner:
        runner = _LayerRunner(self.cfg64, self.layer_cls, self.rotary, i, self.o.tp)
        runner.load(sd, online_r4=online_r4)
        return runner

    def embedding(self, tok: Any, calib_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Write the rotated embedding; return the calibration windows' hidden states
        (float32) and start the --verify models."""
        embed = self.src.get("model.embed_tokens.weight").double()
        embed_rot = rotate_rows_in(embed, self.signs) if self.plan.rotate else embed
        self.writer.add("model.embed_tokens.weight", embed_rot.to(self.plan.out_dtype))
        if self.o.verify:
            self.verifier = _Verifier(tok, embed, embed_rot, self.signs)
        return embed_rot[calib_ids].float() if calib_ids is not None else None

    def layer(self, i: int, h_cal: torch.Tensor | None) -> torch.Tensor | None:
        """Fold norms, rotate, quantize and write decoder layer i; return the calibration
        hidden states after it (computed with its quantized weights)."""
        prefix = f"model.layers.{i}."
        sd = {k[len(prefix):]: self.src.get(k).double()
              for k in self.src.keys() if k.startswith(prefix)}
        if self.verifier is not None:
            self.verifier.original_layer(self._runner(i, sd, online_r4=False))
        fold_norms(sd)
        if self.plan.rotate:
            rotate_layer(sd, self.signs, self.plan.head_dim, r2=True, r4=self.plan.online_r4,
                         r4_blocks=self.o.tp)
        runner = self._runner(i, sd, self.plan.online_r4)
        if self.verifier is not None:
            self.verifier.rotated_layer(runner)
        hessians = _collect_hessians(runner, h_cal) if h_cal is not None else {}
        for name in LINEARS:
            self.linear(sd, prefix, name, hessians.get(name))
        for k, v in sd.items():
            if not any(k.startswith(n + ".") for n in LINEARS):
                self.writer.add(prefix + k, v.to(self.plan.out_dtype))
        if h_cal is None:
            return None
        runner.load(sd, online_r4=self.plan.online_r4)  # quantized weights feed the next layer
        return runner(h_cal)

    def linear(self, sd: dict[str, torch.Tensor], prefix: str, name: str,
               hessian: HessianAccumulator | None) -> None:
        """Quantize one linear (GPTQ or RTN) and write its packed codes, scales, static
        input scale and bias; sd's weight becomes the dequantized one."""
        o, plan, key = self.o, self.plan, f"{prefix}{name}"
        w = sd[f"{name}.weight"]
        if plan.w_bits >= 16:
            self.writer.add(f"{key}.weight", w.to(plan.out_dtype))
        else:
            if o.uses_gptq:
                assert hessian is not None
                q, s = gptq_quantize(w, hessian.h, plan.w_bits, o.group_size, o.w_clip,
                                     o.damp, act_order=o.act_order)
            else:
                q, s = quantize_weight_rtn(w, plan.w_bits, o.group_size, o.w_clip)
            deq = dequantize_weight(q, s, o.group_size, torch.float64)
            self.layer_errors[key] = _weight_error(w, deq, hessian)
            sd[f"{name}.weight"] = deq
            self.writer.add(f"{key}.weight_packed", pack_weight(q, plan.w_bits))
            self.writer.add(f"{key}.weight_scale", s)
            if o.static:  # max calibration, as AMD Quark's per-tensor static W8A8
                assert hessian is not None and plan.a_bits is not None
                amax = torch.tensor([hessian.amax * plan.act_clip], dtype=torch.float32)
                self.writer.add(f"{key}.input_scale",
                                (amax / qmax(plan.a_bits)).clamp(min=1e-12))
        if f"{name}.bias" in sd:
            self.writer.add(f"{key}.bias", sd[f"{name}.bias"].to(plan.out_dtype))

    def head(self) -> None:
        """Fold the final norm's gain into the (untied, rotated) lm_head and write both;
        finish --verify on the logits."""
        g_final = self.src.get("model.norm.weight").double()
        name = "lm_head.weight" if "lm_head.weight" in self.src else "model.embed_tokens.weight"
        head = self.src.get(name).double()
        head_rot = head * g_final
        if self.plan.rotate:
            head_rot = rotate_rows_in(head_rot, self.signs)
        self.writer.add("model.norm.weight", torch.ones_like(g_final).to(self.plan.out_dtype))
        self.writer.add("lm_head.weight", head_rot.to(self.plan.out_dtype))
        if self.verifier is not None:
            self.verifier.finish(self.cfg.rms_norm_eps, g_final, head, head_rot)


def quantize(model_dir: str | Path, out_dir: str | Path, o: QuantizeOptions) -> QuantizeSummary:
    """Rotate and quantize model_dir into out_dir (checkpoint format v1).

    Options, model and OUT_DIR are checked before anything heavy; the checkpoint is
    written into a hidden stage beside OUT_DIR and renamed to OUT_DIR only once every
    file is complete, so an interrupted run never leaves a checkpoint-looking OUT_DIR.
    """
    t0 = time.time()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_options(o)
    cfg = _load_config(model_dir)
    check_model_fits(cfg, o)
    plan = _plan_format(cfg, o)
    warning = tp_serving_warning(cfg, o.tp)
    if warning:
        log.warning(warning)
    check_output_dir(out_dir, o.overwrite, model_dir)

    src = TensorSource(model_dir)
    _check_tensors(src, cfg)
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib_ids = calibration_ids(model_dir, tok, o) if o.needs_calibration else None
    with staged_dir(out_dir, o.overwrite) as stage:
        writer = ShardedWriter(stage)
        streamer = _Streamer(cfg, o, plan, src, writer)
        streamer.run(tok, calib_ids)
        files = writer.close()
        checkpoint_bytes = sum(f.stat().st_size for f in files)
        _write_metadata(model_dir, stage, cfg, plan.fmt, plan.out_dtype, o)
    return QuantizeSummary(
        out_dir=out_dir,
        seconds=time.time() - t0,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        checkpoint_bytes=checkpoint_bytes,
        layer_errors=streamer.layer_errors,
        verify_max_rel_err=streamer.verifier.max_err if streamer.verifier else None,
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


def _r4_text(fmt: QuaRotFormat) -> str:
    r4 = fmt.rotation.r4
    if r4 is None:
        return "off"
    return str(r4.size) if r4.blocks == 1 else f"{r4.blocks} blocks of {r4.block_size}"


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
| rotation | {o.rotate}, R1 seed {o.seed}, online R4 {_r4_text(fmt)} |
| tensor-parallel blocks | {fmt.tp_blocks} (same numbers at every TP size dividing it) |
| calibration | {q["calibration"]} ({q["nsamples"]} × {q["seqlen"]} tokens) |

Serve it with `vllm serve THIS_DIR --quantization quarot` (vllm-quarot installed).
"""
    (out_dir / "README.md").write_text(card)
