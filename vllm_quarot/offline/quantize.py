"""``vllm-quarot quantize``: rotate a Hugging Face checkpoint with QuaRot and quantize it.

Streams the model one decoder layer at a time (float64 maths; calibration activations
kept in float32), so peak memory is one layer plus the calibration activations plus
the (small) quantized output, never two copies of the model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vllm_quarot import __version__
from vllm_quarot.format import (
    SUPPORTED_ARCHITECTURES,
    ActivationSpec,
    KVCacheSpec,
    LMHeadSpec,
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
from vllm_quarot.kv_shift import write_kv_shift
from vllm_quarot.offline import kv_calibration
from vllm_quarot.offline.calibration import calibration_ids, spinquant_ids
from vllm_quarot.offline.checkpoint import (
    RunProgress,
    ShardedWriter,
    TensorSource,
    activation_buffer,
    check_output_dir,
    staged_dir,
)
from vllm_quarot.offline.gptq import HessianAccumulator, gptq_quantize
from vllm_quarot.offline.hub import resolve_model
from vllm_quarot.offline.options import (
    LM_HEADS,
    PRECISIONS,
    SCHEMES,
    QuantizeError,
    QuantizeOptions,
    check_model_fits,
    check_options,
    parse_a8_layers,
    resolve_device,
    shard_bytes,
    tp_serving_warning,
)
from vllm_quarot.offline.rotation import (
    ATTN_IN,
    LINEARS,
    MLP_IN,
    RESIDUAL_OUT,
    fold_norms,
    rotate_layer,
    rotate_rows_in,
)
from vllm_quarot.quant import (
    dequantize_weight,
    fake_quantize_per_token_blocks,
    pack_weight,
    qmax,
    quantize_weight_rtn,
)

if TYPE_CHECKING:
    from vllm_quarot.offline.spinquant import LearnedRotations

log = logging.getLogger("vllm_quarot.quantize")

__all__ = ["SCHEMES", "QuantizeError", "QuantizeOptions", "QuantizeSummary", "quantize"]

# GPTQ's order inside a decoder layer: each group's Hessian is taken behind the groups
# quantized before it (the linears of one group share their input)
SEQUENTIAL_GROUPS = (ATTN_IN, ("self_attn.o_proj",), MLP_IN, ("mlp.down_proj",))

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


class _StopForward(Exception):
    """Raised by a capture hook once the input it waits for has been seen."""


class _LayerRunner:
    """Runs one transformers decoder layer over batches of hidden states: in float64 for
    --verify, in the calibration precision (float32 by default) on the quantizer's
    device for the calibration forward passes."""

    def __init__(self, cfg: Any, layer_cls: type, rotary: torch.nn.Module, idx: int,
                 r4_blocks: int = 1, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu"):
        self.dtype, self.device = dtype, torch.device(device)
        self.module = layer_cls(cfg, layer_idx=idx).eval()
        _use_exact_norms(self.module)
        self.module.to(self.device, dtype)
        self.rotary = rotary
        self.r4_blocks = r4_blocks
        self.r4_hook = None

    def load(self, sd: dict[str, torch.Tensor], online_r4: bool) -> None:
        self.module.load_state_dict({k: v.to(self.dtype) for k, v in sd.items()}, strict=True)
        if online_r4 and self.r4_hook is None:
            n = self.module.mlp.down_proj.in_features // self.r4_blocks
            had_k = hadamard_factor(n, self.dtype).to(self.device)
            blocks = self.r4_blocks  # not self: a hook holding the runner is a reference
            # cycle, which would keep the layer's weights (on the device) until a gc pass
            self.r4_hook = self.module.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args: (block_hadamard_transform(args[0], blocks, had_k),)
            )

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        """Replace one linear's weight (its quantized version) in place."""
        with torch.no_grad():
            self.module.get_submodule(name).weight.copy_(w.to(self.dtype))

    def _batches(self, h: torch.Tensor, batch: int):
        t = h.shape[1]
        pos = torch.arange(t, device=self.device).unsqueeze(0)
        cos, sin = self.rotary(h[:1].to(self.device, self.dtype), pos)
        pe = (cos.to(self.dtype), sin.to(self.dtype))
        for i in range(0, h.shape[0], batch):
            x = h[i : i + batch].to(self.device, self.dtype)
            yield i, lambda x=x: self.module(x, attention_mask=None, position_ids=pos,
                                              position_embeddings=pe)

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, batch: int = 8) -> torch.Tensor:
        out = torch.empty_like(h)
        for i, fwd in self._batches(h, batch):
            y = fwd()
            out[i : i + batch] = (y[0] if isinstance(y, tuple) else y).to(h.dtype).cpu()
        return out

    @torch.no_grad()
    def sequential(self, h: torch.Tensor, quantize_group: GroupQuantizer,
                   a_bits: int | None = None, act_clip: float = 1.0, tp_blocks: int = 1,
                   batch: int = 8, spill_dir: Path | None = None,
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """GPTQ's pass over one decoder layer, sub-block by sub-block (SEQUENTIAL_GROUPS):
        the Hessian of each group's input is accumulated over all calibration windows,
        ``quantize_group(names, hessian)`` quantizes the group and returns its
        dequantized weights, which replace the float ones before the next group's
        input is computed. Intermediate activations (o_proj's input, the residual after
        attention) are kept, so the whole pass costs about one forward of the layer
        plus one of gate/up. Returns the quantized layer's output and, with a_bits, each
        group's relative output error ‖(X − Q(X))Wᵀ‖/‖XWᵀ‖ from quantizing its input
        (keyed by the group's first linear). Kept activations above the memory budget
        live in disk-backed memory under spill_dir (``activation_buffer``).

        The layer is h1 = h + self_attn(input_layernorm(h)); out = h1 +
        mlp(post_attention_layernorm(h1)): Llama, Mistral, Qwen2 and Qwen3 alike."""
        layer, store = self.module, self.dtype
        attn, mlp = layer.self_attn, layer.mlp
        n, t = h.shape[:2]
        pos = torch.arange(t, device=self.device).unsqueeze(0)
        cos, sin = self.rotary(h[:1].to(self.device, self.dtype), pos)
        pe = (cos.to(self.dtype), sin.to(self.dtype))
        spans = [slice(i, i + batch) for i in range(0, n, batch)]
        errors: dict[str, float] = {}

        def on(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.device, self.dtype)

        def run_group(group: tuple[str, ...], inputs) -> None:
            """Accumulate the group's Hessian over ``inputs`` (an iterator of its input
            batches), quantize it, load the quantized weights."""
            first = layer.get_submodule(group[0])
            acc = HessianAccumulator(first.in_features, self.device)
            meter = _ActErrorMeter(a_bits, act_clip,
                                   tp_blocks if group[0] in RESIDUAL_OUT else 1)
            for x in inputs:
                acc.add(x)
                meter.observe(x, first.weight)
            if a_bits is not None:
                errors[group[0]] = meter.value
            for name, w in quantize_group(group, acc).items():
                layer.get_submodule(name).weight.copy_(w.to(self.dtype))

        def stop_at(mod: torch.nn.Module, sink: list[torch.Tensor]):
            def hook(_m: torch.nn.Module, args: tuple) -> None:
                sink.append(args[0])
                raise _StopForward
            return mod.register_forward_pre_hook(hook)

        def inputs_of(mod: torch.nn.Module, run: Callable[[slice], Any]):
            """Each batch's input of ``mod`` (after its other pre-hooks, e.g. R4)."""
            sink: list[torch.Tensor] = []
            handle = stop_at(mod, sink)
            try:
                for sp in spans:
                    try:
                        run(sp)
                    except _StopForward:
                        pass
                    yield sp, sink.pop()
            finally:
                handle.remove()

        # q/k/v: the normalised layer input
        run_group(ATTN_IN, (layer.input_layernorm(on(h[sp])) for sp in spans))
        # o_proj: the attention output behind the quantized q/k/v (kept)
        kept = {"o_in": activation_buffer((n, t, attn.o_proj.in_features), store, spill_dir)}

        def o_inputs():
            for sp, x in inputs_of(attn.o_proj, lambda sp: attn(
                    hidden_states=layer.input_layernorm(on(h[sp])), position_embeddings=pe,
                    attention_mask=None)):
                kept["o_in"][sp] = x.to("cpu", store)
                yield x

        run_group(("self_attn.o_proj",), o_inputs())
        # gate/up: the normalised residual after the quantized attention (kept)
        h1 = activation_buffer((n, t, h.shape[2]), store, spill_dir)

        def mlp_inputs():
            for sp in spans:
                r = on(h[sp]) + attn.o_proj(on(kept["o_in"][sp]))
                h1[sp] = r.to("cpu", store)
                yield layer.post_attention_layernorm(r)

        run_group(MLP_IN, mlp_inputs())
        del kept["o_in"]
        # down_proj: its input behind the quantized gate/up (and the online R4)
        run_group(("mlp.down_proj",), (x for _sp, x in inputs_of(
            mlp.down_proj, lambda sp: mlp(layer.post_attention_layernorm(on(h1[sp]))))))
        out = activation_buffer(tuple(h.shape), h.dtype, spill_dir)
        for sp in spans:
            r = on(h1[sp])
            out[sp] = (r + mlp(layer.post_attention_layernorm(r))).to("cpu", h.dtype)
        return out, errors


GroupQuantizer = Callable[[tuple[str, ...], HessianAccumulator], dict[str, torch.Tensor]]


class _ActErrorMeter:
    """Relative output error ‖(X − Q(X))Wᵀ‖/‖XWᵀ‖ of quantizing a linear's input per
    token at a_bits (nothing when a_bits is None)."""

    def __init__(self, a_bits: int | None, clip: float, blocks: int):
        self.a_bits, self.clip, self.blocks = a_bits, clip, blocks
        self.num = self.den = 0.0

    def observe(self, x: torch.Tensor, w: torch.Tensor) -> None:
        if self.a_bits is None:
            return
        xq = fake_quantize_per_token_blocks(x, self.a_bits, self.clip, self.blocks)
        self.num += ((x - xq) @ w.t()).double().pow(2).sum().item()
        self.den += (x @ w.t()).double().pow(2).sum().item()

    @property
    def value(self) -> float:
        return (self.num / max(self.den, 1e-30)) ** 0.5


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
    r3 = o.online_rotations and kv_bits is not None
    try:
        if rotate:
            factorize(hidden)
            factorize(head_dim)
        if online_r4:
            factorize(inter // o.tp)
    except HadamardSizeError as e:
        raise QuantizeError(str(e)) from e
    act_clip = o.activation_clip
    fmt = QuaRotFormat(
        scheme=o.scheme,
        weight=WeightSpec(w_bits, o.group_size, True, o.weight_method if w_bits < 16 else "none"),
        activation=None if a_bits is None else ActivationSpec(
            a_bits, act_clip, "static-per-tensor" if o.static else "per-token"),
        kv_cache=None if kv_bits is None else KVCacheSpec(kv_bits, -1, True, o.kv_clip),
        rotation=RotationSpec(
            r1_seed=o.seed,
            r1_kind=("cayley-learned" if o.rotate == "spinquant"
                     else "randomized-hadamard" if rotate else "none"),
            r1_size=hidden if rotate else 0,
            r2_size=head_dim if rotate else 0,
            r3=OnlineHadamard.of_size(head_dim) if r3 else None,
            r4=OnlineHadamard.of_size(inter, o.tp) if online_r4 else None,
        ),
        tp_blocks=o.tp,
        lm_head=_lm_head_spec(o),
        ignore=("lm_head",) if o.lm_head_scheme == "none" else (),
        quantizer={
            "name": "vllm-quarot",
            "version": __version__,
            "scheme": o.scheme,
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
            "a8_layers": o.a8_layers,
            "precision": o.precision,
            "online_hadamard": o.online_hadamard,
            "kv_calibrate": o.calibrates_kv,
            "lm_head": o.lm_head_scheme,
        },
    )
    fmt.validate()
    return _Plan(fmt, w_bits, a_bits, hidden, head_dim, rotate, online_r4, act_clip,
                 _output_dtype(cfg))


def _lm_head_spec(o: QuantizeOptions) -> LMHeadSpec | None:
    bits = LM_HEADS[o.lm_head_scheme]
    if bits is None:
        return None
    return LMHeadSpec(bits[0], o.group_size, bits[1], o.weight_method)


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

    @classmethod
    def restored(cls, h_orig: torch.Tensor, h_rot: torch.Tensor, signs: torch.Tensor | None,
                 max_err: float) -> _Verifier:
        """The verifier of a resumed run, from the state its last finished part saved."""
        v = cls.__new__(cls)
        v.h_orig, v.h_rot, v.signs, v.max_err = h_orig, h_rot, signs, max_err
        return v

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
                 writer: ShardedWriter, progress: RunProgress,
                 rotations: LearnedRotations | None = None):
        self.cfg, self.o, self.plan, self.src, self.writer = cfg, o, plan, src, writer
        self.progress = progress
        self.spill_dir = progress.dir / "spill"
        self.part: dict[str, torch.Tensor] = {}  # the tensors of the part being made
        self.layer_cls, rotary_cls = _model_classes(cfg)
        self.cfg64 = copy.deepcopy(cfg)
        self.cfg64._attn_implementation = "sdpa"
        self.device = resolve_device(o.device)
        self.dtype = PRECISIONS[o.precision]
        self.rotary = rotary_cls(config=self.cfg64).to(self.device)
        # R1: the ±1 diagonal of the randomized Hadamard, or a learned dense matrix;
        # R2: None (the per-head Hadamard) or one learned matrix per layer
        self.r1: torch.Tensor | None = None
        self.r2: list[torch.Tensor] | None = None
        if rotations is not None:
            self.r1, self.r2 = rotations.r1, rotations.r2
        elif plan.rotate:
            self.r1 = random_signs(plan.hidden, o.seed)
        self.verifier: _Verifier | None = None
        self.layer_errors: dict[str, float] = {}
        # relative output error of each sub-block's first linear from quantizing its
        # input at the scheme's activation bits (--a8-layers auto picks from these)
        self.act_errors: dict[str, float] = {}
        # --kv-calibrate: each layer's choice and its (k, v) shift vectors
        self.kv_choices: dict[int, dict[str, Any]] = {}
        self.kv_shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(self, tok: Any, calib_ids: Callable[[], torch.Tensor | None]) -> None:
        """Embedding, layers, head; parts a previous run finished (--resume) are read
        back from the run's progress instead of being made again."""
        p, h_cal = self.progress, None
        if p.has("embed"):
            self._publish_part("embed")
        else:
            h_cal = self.embedding(tok, calib_ids())
            self._finish_part("embed", h_cal)
        n = self.cfg.num_hidden_layers
        parts = [f"layer-{i:05d}" for i in range(n)]
        first = next((i for i, part in enumerate(parts) if not p.has(part)), n)
        for part in parts[:first]:
            self._publish_part(part)
        if p.has("embed") and h_cal is None:
            h_cal = self._restore()
        for i in tqdm(range(first, n), desc=f"quantize {self.o.scheme}", unit="layer",
                      initial=first, total=n):
            h_cal = self.layer(i, h_cal)
            self._finish_part(parts[i], h_cal)
        self.head(h_cal)
        self._publish(self.part)

    def _emit(self, name: str, t: torch.Tensor) -> None:
        self.part[name] = t

    def _finish_part(self, name: str, h_cal: torch.Tensor | None) -> None:
        """Persist the part just made with the state the next one starts from, then
        hand its tensors to the writer (as read back, as a resumed run would)."""
        state_tensors = {} if h_cal is None else {"h_cal": h_cal}
        for i, (k, v) in self.kv_shifts.items():
            state_tensors.update({f"kv.{i}.k_shift": k, f"kv.{i}.v_shift": v})
        if self.verifier is not None:
            state_tensors.update({"verify.h_orig": self.verifier.h_orig,
                                  "verify.h_rot": self.verifier.h_rot})
        state = {"layer_errors": self.layer_errors, "act_errors": self.act_errors,
                 "kv_choices": {str(i): c for i, c in self.kv_choices.items()},
                 "verify_max_err": self.verifier.max_err if self.verifier else None}
        self.progress.save(name, self.part, state, state_tensors)
        self.part = {}
        self._publish_part(name)

    def _publish_part(self, name: str) -> None:
        self._publish(self.progress.load(name))

    def _publish(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in sorted(tensors):  # one order whether made now or read back
            self.writer.add(k, tensors[k])

    def _restore(self) -> torch.Tensor | None:
        """The state after the last finished part: calibration hidden states, errors
        so far and the --verify models' hidden states."""
        st, t = self.progress.state, self.progress.state_tensors()
        self.layer_errors = dict(st.get("layer_errors") or {})
        self.act_errors = dict(st.get("act_errors") or {})
        self.kv_choices = {int(i): c for i, c in (st.get("kv_choices") or {}).items()}
        self.kv_shifts = {i: (t[f"kv.{i}.k_shift"], t[f"kv.{i}.v_shift"])
                          for i in self.kv_choices}
        if self.o.verify:
            self.verifier = _Verifier.restored(
                t["verify.h_orig"], t["verify.h_rot"], self.r1, st.get("verify_max_err") or 0.0)
        if "h_cal" not in t:
            return None
        h = activation_buffer(tuple(t["h_cal"].shape), t["h_cal"].dtype, self.spill_dir)
        h.copy_(t["h_cal"])
        return h

    def _runner(self, i: int, sd: dict[str, torch.Tensor], online_r4: bool,
                verify: bool = False) -> _LayerRunner:
        """Layer i with sd's weights: float64 on the CPU for --verify, else in the
        calibration precision on the quantizer's device."""
        runner = _LayerRunner(self.cfg64, self.layer_cls, self.rotary, i, self.o.tp,
                              torch.float64 if verify else self.dtype,
                              "cpu" if verify else self.device)
        runner.load(sd, online_r4=online_r4)
        return runner

    def embedding(self, tok: Any, calib_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Write the rotated embedding; return the calibration windows' hidden states
        (float32) and start the --verify models."""
        embed = self.src.get("model.embed_tokens.weight").double()
        embed_rot = rotate_rows_in(embed, self.r1) if self.plan.rotate else embed
        self._emit("model.embed_tokens.weight", embed_rot.to(self.plan.out_dtype))
        if self.o.verify:
            self.verifier = _Verifier(tok, embed, embed_rot, self.r1)
        if calib_ids is None:
            return None
        h = activation_buffer((*calib_ids.shape, embed_rot.shape[1]), torch.float32,
                              self.spill_dir)
        for i in range(calib_ids.shape[0]):
            h[i] = embed_rot[calib_ids[i]]
        return h

    def layer(self, i: int, h_cal: torch.Tensor | None) -> torch.Tensor | None:
        """Fold norms, rotate, quantize and write decoder layer i; return the calibration
        hidden states after it (computed with its quantized weights).

        With calibration data the linears are quantized sequentially, as GPTQ and
        QuaRot do: q/k/v from the layer's input, then o_proj from the attention output
        of the already quantized q/k/v, then gate/up, then down_proj, each Hessian taken
        behind the sub-blocks quantized before it."""
        prefix = f"model.layers.{i}."
        sd = {k[len(prefix):]: self.src.get(k).double()
              for k in self.src.keys() if k.startswith(prefix)}
        if self.verifier is not None:
            self.verifier.original_layer(self._runner(i, sd, online_r4=False, verify=True))
        fold_norms(sd)
        if self.plan.rotate:
            rotate_layer(sd, self.r1, self.plan.head_dim,
                         r2=self.r2[i] if self.r2 is not None else True,
                         r4=self.plan.online_r4, r4_blocks=self.o.tp)
        if h_cal is not None and self.o.calibrates_kv:  # may fuse SmoothAttention into sd
            self.calibrate_kv(i, sd, h_cal)
        if self.verifier is not None:  # the rotated (and smoothed) layer = the original
            self.verifier.rotated_layer(self._runner(i, sd, self.plan.online_r4, verify=True))
        out = None
        if h_cal is None:
            for name in LINEARS:
                self.linear(sd, prefix, name, None)
        else:
            def quantize_group(group: tuple[str, ...],
                               hessian: HessianAccumulator) -> dict[str, torch.Tensor]:
                for name in group:
                    self.linear(sd, prefix, name, hessian)
                return {name: sd[f"{name}.weight"] for name in group}

            runner = self._runner(i, sd, self.plan.online_r4)
            out, errors = runner.sequential(
                h_cal, quantize_group, self.plan.a_bits if self.o.a8_layers else None,
                self.plan.act_clip, self.o.tp, spill_dir=self.spill_dir)
            self.act_errors.update({prefix + k: v for k, v in errors.items()})
        for k, v in sd.items():
            if not any(k.startswith(n + ".") for n in LINEARS):
                self._emit(prefix + k, v.to(self.plan.out_dtype))
        return out  # the quantized layer's output feeds the next one

    def calibrate_kv(self, i: int, sd: dict[str, torch.Tensor], h_cal: torch.Tensor) -> None:
        """Choose layer i's KV4 treatment (R3, SmoothAttention, shift) on the first
        calibration windows; fuse the smoothing into sd's q/k_proj."""
        runner = self._runner(i, sd, online_r4=False)
        h = h_cal[:kv_calibration.MAX_WINDOWS, :kv_calibration.MAX_TOKENS]
        x = h.to(runner.device, runner.dtype)
        pos = torch.arange(x.shape[1], device=runner.device).unsqueeze(0)
        cos, sin = self.rotary(x[:1], pos)
        q, k, v = kv_calibration.layer_qkv(runner.module, x, (cos.to(x.dtype), sin.to(x.dtype)))
        kv = self.plan.fmt.kv_cache
        assert kv is not None
        qk_norm = hasattr(runner.module.self_attn, "k_norm")
        cal = kv_calibration.calibrate_layer(
            q.cpu(), k.cpu(), v.cpu(), kv.bits, kv.clip_ratio,
            r3_allowed=self.plan.fmt.rotation.r3 is not None, smooth_allowed=not qk_norm)
        if cal.smooth is not None:
            kv_calibration.apply_smoothing(sd, cal.smooth.double(), self.cfg.num_attention_heads)
        self.kv_choices[i] = cal.choice.summary()
        self.kv_shifts[i] = (cal.k_shift, cal.v_shift)

    def linear(self, sd: dict[str, torch.Tensor], prefix: str, name: str,
               hessian: HessianAccumulator | None) -> None:
        """Quantize one linear (GPTQ or RTN) and write its packed codes, scales, static
        input scale and bias; sd's weight becomes the dequantized one."""
        o, plan, key = self.o, self.plan, f"{prefix}{name}"
        w = sd[f"{name}.weight"]
        if plan.w_bits >= 16:
            self._emit(f"{key}.weight", w.to(plan.out_dtype))
        else:
            sd[f"{name}.weight"] = self._quantize_weight(key, w, plan.w_bits, o.group_size,
                                                         hessian)
            if o.static:  # max calibration, as AMD Quark's per-tensor static W8A8
                assert hessian is not None and plan.a_bits is not None
                amax = torch.tensor([hessian.amax * plan.act_clip], dtype=torch.float32)
                self._emit(f"{key}.input_scale",
                                (amax / qmax(plan.a_bits)).clamp(min=1e-12))
        if f"{name}.bias" in sd:
            self._emit(f"{key}.bias", sd[f"{name}.bias"].to(plan.out_dtype))

    def _quantize_weight(self, key: str, w: torch.Tensor, bits: int, group_size: int,
                         hessian: HessianAccumulator | None) -> torch.Tensor:
        """GPTQ (with a Hessian) or RTN codes of w; writes key's packed codes and scales,
        records its output error; returns the dequantized weight (float64)."""
        o = self.o
        # the maths (GPTQ, clip search) on the quantizer's device, where the Hessian is;
        # codes, scales and the dequantized weight come back to the host for writing
        w_dev = w.to(self.device, torch.float64)
        if o.uses_gptq:
            assert hessian is not None
            q, s = gptq_quantize(w_dev, hessian.h, bits, group_size, o.w_clip, o.damp,
                                 act_order=o.act_order)
        else:
            q, s = quantize_weight_rtn(w_dev, bits, group_size, o.w_clip)
        deq = dequantize_weight(q, s, group_size, torch.float64)
        self.layer_errors[key] = _weight_error(w_dev, deq, hessian)
        q, s, deq = q.cpu(), s.cpu(), deq.cpu()
        self._emit(f"{key}.weight_packed", pack_weight(q, bits))
        self._emit(f"{key}.weight_scale", s)
        return deq

    def head(self, h_cal: torch.Tensor | None) -> None:
        """Fold the final norm's gain into the (untied, rotated) lm_head and write both
        (--lm-head: quantized, GPTQ on the final normalised calibration states when the
        layers use GPTQ); finish --verify on the logits."""
        g_final = self.src.get("model.norm.weight").double()
        name = "lm_head.weight" if "lm_head.weight" in self.src else "model.embed_tokens.weight"
        head = self.src.get(name).double()
        head_rot = head * g_final
        if self.plan.rotate:
            head_rot = rotate_rows_in(head_rot, self.r1)
        self._emit("model.norm.weight", torch.ones_like(g_final).to(self.plan.out_dtype))
        spec = self.plan.fmt.lm_head
        if spec is None:
            self._emit("lm_head.weight", head_rot.to(self.plan.out_dtype))
        else:
            hessian = None
            if self.o.uses_gptq:
                assert h_cal is not None
                # the lm_head's input: the final RMSNorm (gain folded into the head), on
                # the quantizer's device like the layers' Hessians
                hessian = HessianAccumulator(head_rot.shape[1], self.device)
                norm = RMSNorm64(head_rot.shape[1], self.cfg.rms_norm_eps).to(
                    self.device, self.dtype)
                for i in range(h_cal.shape[0]):
                    hessian.add(norm(h_cal[i].to(self.device, self.dtype)))
            self._quantize_weight("lm_head", head_rot, spec.bits, spec.group_size, hessian)
        if self.verifier is not None:
            self.verifier.finish(self.cfg.rms_norm_eps, g_final, head, head_rot)


def quantize(model_dir: str | Path, out_dir: str | Path, o: QuantizeOptions) -> QuantizeSummary:
    """Rotate and quantize model_dir (a local directory or a Hugging Face Hub id) into
    out_dir.

    Options, model and OUT_DIR are checked before anything heavy; the checkpoint is
    written into a hidden stage beside OUT_DIR and renamed to OUT_DIR only once every
    file is complete, so an interrupted run never leaves a checkpoint-looking OUT_DIR.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    check_options(o)
    # provenance: a local directory's name, or the Hub id (@revision)
    source = (Path(model_dir).name if Path(model_dir).exists() else str(model_dir)) + (
        f"@{o.revision}" if o.revision else "")
    model_dir = resolve_model(model_dir, o.revision)  # a local dir, or a Hub id fetched
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
    progress = RunProgress(out_dir, _fingerprint(model_dir, src, o), o.resume)
    try:
        ids: list[torch.Tensor | None] = []

        def calib_ids() -> torch.Tensor | None:  # only computed when a part needs them
            if not ids:
                ids.append(calibration_ids(model_dir, tok, o) if o.uses_calibration else None)
            return ids[0]

        rotations = None
        if o.rotate == "spinquant":
            rotations = _rotations(progress, lambda: _learn_rotations(
                model_dir, spinquant_ids(tok, o, calib_ids), plan, o),
                cfg.num_hidden_layers)
        with staged_dir(out_dir, o.overwrite) as stage:
            writer = ShardedWriter(stage, shard_bytes(o.max_shard_size))
            streamer = _Streamer(cfg, o, plan, src, writer, progress, rotations)
            streamer.run(tok, calib_ids)
            files = writer.close()
            checkpoint_bytes = sum(f.stat().st_size for f in files)
            fmt = plan.fmt
            if o.a8_layers is not None:
                fmt = _with_a8_layers(fmt, select_a8_layers(
                    streamer.act_errors, o.a8_layers, cfg.num_hidden_layers))
                # what the choice was made from (each sub-block's first linear)
                fmt = dataclasses.replace(fmt, quantizer={
                    **fmt.quantizer, "activation_errors": {
                        k: round(v, 5) for k, v in streamer.act_errors.items()}})
            if rotations is not None:
                fmt = dataclasses.replace(fmt, quantizer={
                    **fmt.quantizer, "spinquant": {
                        "steps": o.spinquant_steps, "lr": o.spinquant_lr,
                        "weights_in_loop": ("rtn" if o.spinquant_weights_in_loop
                                            else "float"),
                        "loss_first": rotations.losses[0] if rotations.losses else None,
                        "loss_last": rotations.losses[-1] if rotations.losses else None,
                        "seconds": round(rotations.seconds, 1)}})
            if streamer.kv_choices:
                fmt = _with_kv_choices(fmt, streamer.kv_choices)
                if fmt.kv_cache is not None and fmt.kv_cache.shift:
                    write_kv_shift(stage, streamer.kv_shifts)
            fmt = dataclasses.replace(fmt, quantizer={**fmt.quantizer, "source": source})
            fmt.validate()
            _write_metadata(model_dir, stage, cfg, fmt, plan.out_dtype, o)
    except BaseException:
        progress.close_after_failure()
        raise
    progress.remove()
    return QuantizeSummary(
        out_dir=out_dir,
        seconds=time.time() - t0,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        checkpoint_bytes=checkpoint_bytes,
        layer_errors=streamer.layer_errors,
        verify_max_rel_err=streamer.verifier.max_err if streamer.verifier else None,
    )


def _fingerprint(model_dir: Path, src: TensorSource, o: QuantizeOptions) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: every option that
    changes the output, the input model (config and weight files) and this version."""
    opts = {k: v for k, v in dataclasses.asdict(o).items() if k not in ("overwrite", "resume")}
    opts["device"] = resolve_device(o.device).type
    files = sorted({p.name: p.stat().st_size for p in set(src.where.values())}.items())
    return {"options": opts, "model": str(model_dir.resolve()),
            "config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
            "weight_files": files, "version": __version__}


def _rotations(progress: RunProgress, learn: Callable[[], LearnedRotations],
               n_layers: int) -> LearnedRotations:
    """Learned R1/R2, kept with the run's progress so that --resume does not learn them
    again."""
    from vllm_quarot.offline.spinquant import LearnedRotations

    if progress.has("rotations"):
        t = progress.load("rotations")
        return LearnedRotations(r1=t["r1"], r2=[t[f"r2.{i}"] for i in range(n_layers)],
                                losses=t["losses"].tolist(), seconds=float(t["seconds"]))
    rot = learn()
    progress.save("rotations", {
        "r1": rot.r1, **{f"r2.{i}": r for i, r in enumerate(rot.r2)},
        "losses": torch.tensor(rot.losses, dtype=torch.float64),
        "seconds": torch.tensor(rot.seconds, dtype=torch.float64)}, state={})
    return rot


def _learn_rotations(model_dir: Path, calib_ids: torch.Tensor | None, plan: _Plan,
                     o: QuantizeOptions) -> LearnedRotations:
    """--rotate spinquant: R1 and the R2s learned on the calibration windows."""
    from vllm_quarot.offline.spinquant import learn_rotations

    assert calib_ids is not None
    fmt = plan.fmt
    log.info("learning R1/R2 (SpinQuant, Cayley SGD): %d steps, lr %g, %s weights in the "
             "loop, on %s", o.spinquant_steps, o.spinquant_lr,
             "RTN" if o.spinquant_weights_in_loop else "16-bit", resolve_device(o.device))
    return learn_rotations(
        model_dir, calib_ids, w_bits=plan.w_bits if o.spinquant_weights_in_loop else 16,
        a_bits=plan.a_bits,
        kv_bits=fmt.kv_cache.bits if fmt.kv_cache else None, act_clip=plan.act_clip,
        kv_clip=o.kv_clip, group_size=o.group_size, seed=o.seed, steps=o.spinquant_steps,
        lr=o.spinquant_lr, online_r4=plan.online_r4, r3=fmt.rotation.r3 is not None,
        device=str(resolve_device(o.device)))


# --a8-layers auto: a sub-block whose 4-bit activation error is this many times the
# median of its kind (q/k/v, o_proj, gate/up, down_proj) over the layers
A8_AUTO_FACTOR = 2.0
_GROUP_OF = {g[0]: g for g in SEQUENTIAL_GROUPS}


def select_a8_layers(act_errors: dict[str, float], spec: str,
                     n_layers: int) -> dict[str, int]:
    """The linears whose inputs stay at 8 bits: every linear of each chosen sub-block
    (q/k/v and gate/up share their input). act_errors maps each sub-block's first
    linear (model.layers.i.self_attn.q_proj, ...) to its relative output error."""
    choice = parse_a8_layers(spec)
    if isinstance(choice, list):
        firsts = []
        for name in choice:
            head, _, leaf = name.rpartition(".")
            layer = int(head.split(".")[2]) if head.count(".") >= 2 else -1
            group = next((g for g in SEQUENTIAL_GROUPS if any(n.endswith(leaf) for n in g)),
                         None)
            if group is None or not 0 <= layer < n_layers:
                raise QuantizeError(f"--a8-layers: {name} is not a linear of this model "
                                    f"({n_layers} layers)")
            firsts.append(f"model.layers.{layer}.{group[0]}")
    else:
        score = _a8_scores(act_errors)
        ranked = sorted(score, key=lambda k: -score[k])
        if choice == "auto":
            firsts = [k for k in ranked if score[k] > A8_AUTO_FACTOR]
        else:
            firsts = ranked[: int(choice)]
        for k in ranked[: max(len(firsts), 5)]:
            log.info("activation error %s: %.4f (%.2f× the median of its kind)%s", k,
                     act_errors[k], score[k], " -> 8-bit" if k in firsts else "")
    out = {}
    for first in firsts:
        prefix, _, _ = first.partition(".self_attn." if ".self_attn." in first else ".mlp.")
        stem = first[len(prefix) + 1:]
        for name in _GROUP_OF[stem]:
            out[f"{prefix}.{name}"] = 8
    return out


def _a8_scores(act_errors: dict[str, float]) -> dict[str, float]:
    """Each sub-block's activation error over the median of its kind."""
    by_kind: dict[str, list[float]] = {}
    for k, v in act_errors.items():
        by_kind.setdefault(k.split(".", 3)[3], []).append(v)
    med = {kind: sorted(v)[len(v) // 2] for kind, v in by_kind.items()}
    return {k: v / max(med[k.split(".", 3)[3]], 1e-12) for k, v in act_errors.items()}


def _with_kv_choices(fmt: QuaRotFormat, choices: dict[int, dict[str, Any]]) -> QuaRotFormat:
    """The format after --kv-calibrate: R3 on the layers that chose it, shifts when any
    layer shifts, and every layer's choice and errors in quantizer.kv_calibration."""
    assert fmt.kv_cache is not None
    r3 = fmt.rotation.r3
    if r3 is not None:
        r3 = dataclasses.replace(r3, layers=tuple(i for i in sorted(choices)
                                                  if choices[i]["r3"]))
    shift = any(c["k_shift"] or c["v_shift"] for c in choices.values())
    return dataclasses.replace(
        fmt, kv_cache=dataclasses.replace(fmt.kv_cache, shift=shift),
        rotation=dataclasses.replace(fmt.rotation, r3=r3),
        quantizer={**fmt.quantizer, "kv_calibration": {
            str(i): choices[i] for i in sorted(choices)}})


def _with_a8_layers(fmt: QuaRotFormat, layer_bits: dict[str, int]) -> QuaRotFormat:
    assert fmt.activation is not None
    act = dataclasses.replace(fmt.activation, layer_bits=dict(sorted(layer_bits.items())))
    return dataclasses.replace(fmt, activation=act)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _weight_error(w: torch.Tensor, deq: torch.Tensor, h: HessianAccumulator | None) -> float:
    """Relative output error ‖(W-Ŵ)X‖/‖WX‖ (via H), or relative weight error w/o data."""
    d = w - deq
    if h is None:
        return (d.norm() / w.norm()).item()
    d, w = d.to(h.h.device), w.to(h.h.device)
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

Made by vllm-quarot {__version__} from `{q.get("source", model_dir.name)}`.

| | |
|---|---|
| scheme | `{fmt.scheme}` |
| weights | {fmt.weight.bits}-bit, {fmt.weight.method}, group size {fmt.weight.group_size} |
| activations | {fmt.activation or "16-bit"} |
| KV cache | {fmt.kv_cache or "16-bit"} |
| lm_head | {fmt.lm_head.name + " (" + fmt.lm_head.method + ")" if fmt.lm_head else "16-bit"} |
| rotation | {o.rotate}, R1 seed {o.seed}, online R4 {_r4_text(fmt)} |
| tensor-parallel blocks | {fmt.tp_blocks} (same numbers at every TP size dividing it) |
| calibration | {q["calibration"]} ({q["nsamples"]} × {q["seqlen"]} tokens) |

Serve it with `vllm serve THIS_DIR --quantization quarot` (vllm-quarot installed).
"""
    (out_dir / "README.md").write_text(card)
