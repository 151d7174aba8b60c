"""The quantizer's options, their checks, and its error type.

Every check here runs before any tensor is read or any file is written, so a bad
option is a one-line error that costs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from vllm_quarot.format import SCHEMES as FORMAT_SCHEMES
from vllm_quarot.hadamard import HadamardSizeError, factorize

# scheme -> (weight bits, activation bits or None, kv bits or None): the format's table
SCHEMES: dict[str, tuple[int, int | None, int | None]] = {
    name: (s.weight_bits, s.activation_bits, s.kv_bits) for name, s in FORMAT_SCHEMES.items()}
# per-tensor activation scales calibrated offline
STATIC_SCHEMES = tuple(name for name, s in FORMAT_SCHEMES.items()
                       if s.activation_mode == "static-per-tensor")
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda", "auto")
ROTATIONS = ("quarot", "spinquant", "r1r2", "none")
SPINQUANT_WEIGHTS = ("auto", "float", "rtn")
WEIGHT_METHODS = ("gptq", "rtn")
# --lm-head: (weight bits, activation bits or None); "none" keeps it 16-bit; "auto" (the
# default) is w8a8 for the schemes that quantize weights (lossless: WikiText-2 perplexity
# of SmolLM2 19.3152 -> 19.3130), none for kv4
LM_HEADS: dict[str, tuple[int, int | None] | None] = {
    "none": None, "w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, None)}
LM_HEAD_CHOICES = ("auto", *LM_HEADS)


class QuantizeError(ValueError):
    """A bad option, model or calibration input for the quantizer."""


@dataclasses.dataclass
class QuantizeOptions:
    """Everything ``vllm-quarot quantize`` takes besides its two directories. The CLI's
    argparse destinations carry these names (see ``from_namespace``)."""

    scheme: str = "w4a4"
    weight_method: str = "gptq"
    calib: str | None = None
    calib_self: int | None = None
    nsamples: int = 128
    seqlen: int = 2048
    group_size: int = -1
    w_clip: bool = True  # per-channel (per-group) weight clip search, as QuaRot's GPTQ
    act_clip: float | None = None  # default: 0.9 at 4 bits, 1.0 at 8 bits
    kv_clip: float = 0.95
    seed: int = 0
    online_hadamard: bool = True
    rotate: str = "quarot"
    act_order: bool = True
    damp: float = 0.01
    verify: bool = False
    overwrite: bool = False  # replace a non-empty OUT_DIR (once the new one is complete)
    resume: bool = False  # continue an interrupted run from its last finished layer
    revision: str | None = None  # of a Hugging Face Hub id (MODEL_DIR)
    max_shard_size: str = "5GB"  # safetensors shards of at most this size (+ index)
    tp: int = 1  # tensor_parallel_blocks: block-diagonal R4, per-block row-parallel inputs
    a8_layers: str | None = None  # "auto", a number of layers, or comma-separated names
    spinquant_steps: int = 30  # --rotate spinquant: Cayley SGD steps (SpinQuant: 100)
    spinquant_lr: float = 1.5
    # weights in the SpinQuant loop: auto = unquantized before GPTQ (SpinQuant's recipe:
    # GPTQ adapts the weights to the rotation afterwards), RTN before RTN; float; rtn
    spinquant_weights: str = "auto"
    device: str = "auto"  # where the layer-streamed maths runs: cpu, cuda, auto
    precision: str = "float32"  # calibration forward passes (Hessians, GPTQ: float64)
    # with a 4-bit KV cache and calibration text: choose key/value shift, SmoothAttention
    # and R3 per layer by measured attention error (offline/kv_calibration.py)
    kv_calibrate: bool = True
    # the lm_head quantized too (R1 is fused into it like every linear): auto, none,
    # w8a8, w4a8, w4a16 (LM_HEADS); GPTQ when the layers use GPTQ
    lm_head: str = "auto"

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> QuantizeOptions:
        """Options from parsed arguments whose destinations are the field names; a
        field the namespace lacks keeps its default."""
        return cls(**{f.name: getattr(ns, f.name)
                      for f in dataclasses.fields(cls) if hasattr(ns, f.name)})

    @property
    def bits(self) -> tuple[int, int | None, int | None]:
        """(weight bits, activation bits or None, KV bits or None) of the scheme."""
        return SCHEMES[self.scheme]

    @property
    def activation_clip(self) -> float:
        """--act-clip, or its default: 0.9 for 4-bit activations, 1.0 otherwise."""
        if self.act_clip is not None:
            return self.act_clip
        return 0.9 if self.bits[1] == 4 else 1.0

    @property
    def lm_head_scheme(self) -> str:
        """--lm-head resolved: auto is w8a8 when the scheme quantizes weights."""
        if self.lm_head == "auto":
            return "w8a8" if self.bits[0] < 16 else "none"
        return self.lm_head

    @property
    def static(self) -> bool:
        """Per-tensor activation scales calibrated offline (w8a8-static)."""
        return self.scheme in STATIC_SCHEMES

    @property
    def uses_gptq(self) -> bool:
        return self.weight_method == "gptq" and self.bits[0] < 16

    @property
    def needs_calibration(self) -> bool:
        """GPTQ, static activation scales, --a8-layers or learned rotations: calibration
        activations are computed."""
        return (self.uses_gptq or self.static or self.a8_layers is not None
                or self.rotate == "spinquant")

    @property
    def calibrates_kv(self) -> bool:
        """The KV cache choices are calibrated: a 4-bit cache, --kv-calibrate (the
        default) and calibration text (given, or needed by another step)."""
        return (self.kv_calibrate and self.bits[2] is not None
                and (self.needs_calibration or self.calib is not None or bool(self.calib_self)))

    @property
    def uses_calibration(self) -> bool:
        """Calibration activations are computed (needed, or for the KV choices)."""
        return self.needs_calibration or self.calibrates_kv

    @property
    def spinquant_weights_in_loop(self) -> bool:
        """--rotate spinquant learns against RTN weights (else unquantized weights). auto:
        only when RTN makes the final weights; before GPTQ the rotation is learned
        against 16-bit weights, as SpinQuant does, since GPTQ then fits the weights to
        the learned rotation (RTN in the loop trains the rotation for a rounding GPTQ
        does not do)."""
        if self.spinquant_weights == "auto":
            return not self.uses_gptq and self.bits[0] < 16
        return self.spinquant_weights == "rtn" and self.bits[0] < 16

    @property
    def online_r4(self) -> bool:
        """R4 is folded into down_proj's input and applied online by the runtime: with
        quantized activations, and with 4/8-bit weights alone (W4A16: the Hadamard
        spreads down_proj's weight outliers too, as QuIP's input rotations do)."""
        return self.online_rotations and (self.bits[1] is not None or self.bits[0] < 16)

    @property
    def online_rotations(self) -> bool:
        """R3/R4 run online (QuaRot and SpinQuant; not the offline-only ablations)."""
        return self.rotate in ("quarot", "spinquant") and self.online_hadamard


def check_options(o: QuantizeOptions) -> None:
    """The checks that need neither the model nor the data."""
    if o.scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {o.scheme!r}; choose one of {', '.join(SCHEMES)}")
    if o.weight_method not in WEIGHT_METHODS:
        raise QuantizeError(f"--weight-method must be gptq or rtn, got {o.weight_method!r}")
    if o.rotate not in ROTATIONS:
        raise QuantizeError(f"--rotate must be one of {ROTATIONS}, got {o.rotate!r}")
    if o.lm_head not in LM_HEAD_CHOICES:
        raise QuantizeError(f"--lm-head must be one of {', '.join(LM_HEAD_CHOICES)}, got "
                            f"{o.lm_head!r}")
    if o.lm_head not in ("auto", "none") and o.bits[0] >= 16:
        raise QuantizeError(f"--lm-head {o.lm_head}: scheme {o.scheme} keeps 16-bit "
                            "weights; a quantized lm_head needs a weight-quantized scheme")
    if o.group_size != -1 and o.group_size <= 0:
        raise QuantizeError(f"--group-size must be -1 or positive, got {o.group_size}")
    w_bits = o.bits[0]
    if o.group_size != -1 and w_bits < 16 and (o.group_size * w_bits) % 32:
        raise QuantizeError(
            f"--group-size {o.group_size} at {w_bits} bits: a group must fill whole "
            f"32-bit words of packed codes (a multiple of {32 // w_bits})")
    for name, v in (("--act-clip", o.act_clip), ("--kv-clip", o.kv_clip)):
        if v is not None and not 0.0 < v <= 1.0:
            raise QuantizeError(f"{name} must be in (0, 1], got {v}")
    if o.precision not in PRECISIONS:
        raise QuantizeError(f"--precision must be float32 or float64, got {o.precision!r}")
    if o.device not in DEVICES:
        raise QuantizeError(f"--device must be one of {', '.join(DEVICES)}, got {o.device!r}")
    resolve_device(o.device)
    if o.a8_layers is not None:
        if o.bits[1] != 4 or o.static:
            raise QuantizeError(
                f"--a8-layers keeps some 4-bit activations at 8 bits; scheme {o.scheme} "
                "has no 4-bit per-token activations")
        parse_a8_layers(o.a8_layers)
    if o.rotate == "spinquant":
        if o.spinquant_steps < 0:
            raise QuantizeError(f"--spinquant-steps must be >= 0, got {o.spinquant_steps}")
        if not o.spinquant_lr > 0:
            raise QuantizeError(f"--spinquant-lr must be positive, got {o.spinquant_lr}")
        if o.spinquant_weights not in SPINQUANT_WEIGHTS:
            raise QuantizeError(f"--spinquant-weights must be one of "
                                f"{', '.join(SPINQUANT_WEIGHTS)}, got {o.spinquant_weights!r}")
    shard_bytes(o.max_shard_size)
    if o.nsamples <= 0:
        raise QuantizeError(f"--nsamples must be positive, got {o.nsamples}")
    if o.tp < 1:
        raise QuantizeError(f"--tp must be a positive number of blocks, got {o.tp}")
    if o.seqlen <= 0:
        raise QuantizeError(f"--seqlen must be positive, got {o.seqlen}")
    if o.calib_self is not None and o.calib_self <= 0:
        raise QuantizeError(f"--calib-self must be a positive number of samples, got "
                            f"{o.calib_self}")
    if o.calib is not None and o.calib_self is not None:
        raise QuantizeError("give either --calib FILE or --calib-self N, not both")
    if not o.damp > 0:
        raise QuantizeError(f"--damp must be positive, got {o.damp}")
    if o.needs_calibration and o.calib is None and not o.calib_self:
        raise QuantizeError(
            f"{_calibration_user(o)} need calibration text: give --calib FILE or "
            "--calib-self N")
    if o.calib is not None and not Path(o.calib).is_file():
        raise QuantizeError(f"calibration file {o.calib} does not exist")


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}


def shard_bytes(size: str) -> int:
    """--max-shard-size: "5GB", "500MB", "2GiB" (as transformers' save_pretrained)."""
    text = size.strip().upper().replace(" ", "")
    unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if text.endswith(u)),
                None)
    try:
        value = float(text[: -len(unit)] if unit else text) * _SIZE_UNITS[unit or "B"]
    except ValueError:
        value = -1
    if value <= 0:
        raise QuantizeError(f"--max-shard-size must be a size like 5GB or 500MB, got {size!r}")
    return int(value)


def _calibration_user(o: QuantizeOptions) -> str:
    if o.static:
        return "static activation scales"
    if o.uses_gptq:
        return "GPTQ"
    return "--rotate spinquant" if o.rotate == "spinquant" else "--a8-layers"


def resolve_device(device: str) -> torch.device:
    """cpu, cuda, or auto (cuda when a GPU is visible); cuda without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantizeError("--device cuda: no CUDA device is visible to torch "
                            f"(torch {torch.__version__}); use --device cpu or auto")
    return torch.device(device)


def parse_a8_layers(spec: str) -> int | list[str] | str:
    """--a8-layers: "auto", a count N (the N linear groups with the largest activation
    error), or comma-separated names ("layers.1.mlp.down_proj", with or without the
    "model." prefix)."""
    spec = spec.strip()
    if spec == "auto":
        return spec
    if spec.isdigit():
        return int(spec)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if not n.removeprefix("model.").startswith("layers.")
           or not n.endswith(("_proj",))]
    if not names or bad:
        raise QuantizeError(
            f"--a8-layers takes auto, a number, or names like layers.1.mlp.down_proj; "
            f"got {spec!r}")
    return ["model." + n.removeprefix("model.") for n in names]


def check_model_fits(cfg: Any, o: QuantizeOptions) -> None:
    """The checks that need the model's config: group size vs the linears' input sizes,
    calibration length vs the model's context."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    if o.group_size != -1 and o.bits[0] < 16:
        sizes = {"hidden size": hidden, "intermediate size (down_proj)": inter,
                 "heads × head_dim (o_proj)": n_heads * head_dim}
        bad = [f"{name} {k}" for name, k in sizes.items() if k % o.group_size]
        if bad:
            raise QuantizeError(
                f"--group-size {o.group_size} does not divide the {', '.join(bad)} of "
                "this model")
    _check_tp(o, inter, n_heads * head_dim)
    if o.tp > 1 and o.group_size != -1 and o.bits[0] < 16:
        sizes = {"o_proj": n_heads * head_dim // o.tp, "down_proj": inter // o.tp}
        bad = [f"{name} {k}" for name, k in sizes.items() if k % o.group_size]
        if bad:
            raise QuantizeError(
                f"--group-size {o.group_size} does not divide the per-block input size "
                f"(in_features / --tp {o.tp}) of {', '.join(bad)}: a weight group may not "
                "straddle two tensor-parallel ranks")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if o.uses_calibration and max_pos is not None and o.seqlen > max_pos:
        raise QuantizeError(
            f"--seqlen {o.seqlen} is longer than the model's context "
            f"(max_position_embeddings {max_pos})")


def _block_hadamard_ok(inter: int, n: int) -> bool:
    try:
        factorize(inter // n)
    except HadamardSizeError:
        return False
    return True


def tp_choices(o: QuantizeOptions, inter: int, attn: int) -> list[int]:
    """Every --tp this model allows with these options: N divides the inputs of o_proj
    (heads × head_dim) and down_proj (intermediate), and with the online R4 a Hadamard
    of order intermediate / N can be built."""
    return [n for n in range(1, min(inter, attn) + 1)
            if inter % n == 0 and attn % n == 0
            and (not o.online_r4 or _block_hadamard_ok(inter, n))]


def _check_tp(o: QuantizeOptions, inter: int, attn: int) -> None:
    n = o.tp
    if n == 1:
        return  # the whole-size R4's order is checked (and explained) with the format
    if inter % n == 0 and attn % n == 0:
        if not o.online_r4 or _block_hadamard_ok(inter, n):
            return
        why = (f"its block-diagonal online R4 needs a Hadamard matrix of order "
               f"intermediate {inter} / {n} = {inter // n}, which cannot be built here")
    else:
        why = (f"{n} does not divide both the inputs of o_proj (heads × head_dim "
               f"{attn}) and down_proj (intermediate {inter})")
    ok = tp_choices(o, inter, attn)
    nearest = min(ok, key=lambda m: (abs(m - n), m)) if ok else None
    raise QuantizeError(
        f"--tp {n} does not fit this model: {why}; nearest --tp that works: "
        f"{nearest if nearest is not None else 'none'}")


def tp_serving_warning(cfg: Any, tp: int) -> str | None:
    """Why vLLM will refuse --tensor-parallel-size tp on this model (it needs
    heads % tp == 0 and kv_heads % tp == 0 or tp % kv_heads == 0), or None."""
    if tp == 1:
        return None
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0):
        return None
    ok = [t for t in range(2, tp) if tp % t == 0 and heads % t == 0
          and (kv % t == 0 or t % kv == 0)]
    also = f" and {', '.join(map(str, ok))}" if ok else ""
    return (f"--tp {tp}: vLLM cannot serve this model ({heads} attention heads, {kv} KV "
            f"heads) at tensor parallelism {tp}; the checkpoint still serves at TP=1{also}")
