"""The quantizer's options, declared once, their checks, and its error type.

Each option is a field of ``QuantizeOptions`` whose metadata holds its help text,
choices, command-line flag and check (``option``); the CLI's argparse arguments
(``add_arguments``) and the options table of docs/quantize.md (``options_markdown``;
``tests/test_cli.py`` compares them) are derived from the fields. Every check runs
before any tensor is read or any file is written, so a bad option is a one-line error
that costs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_quarot.errors import QuaRotError
from vllm_quarot.format import MAX_KV_PIVOTS, SMOOTH_METHODS
from vllm_quarot.format import SCHEMES as FORMAT_SCHEMES
from vllm_quarot.hadamard import has_hadamard
from vllm_quarot.models import head_dim as _head_dim

# scheme -> (weight bits, activation bits or None, kv bits or None): the format's table
SCHEMES: dict[str, tuple[int, int | None, int | None]] = {
    name: (s.weight_bits, s.activation_bits, s.kv_bits) for name, s in FORMAT_SCHEMES.items()}
# per-tensor activation scales calibrated offline
STATIC_SCHEMES = tuple(name for name, s in FORMAT_SCHEMES.items()
                       if s.activation_mode == "static-per-tensor")
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("auto", "cpu", "cuda")
ROTATIONS = ("quarot", "spinquant", "r1r2", "none")
R1_PLACEMENTS = ("auto", "fused", "online")
SPINQUANT_WEIGHTS = ("auto", "float", "rtn")
WEIGHT_METHODS = ("gptq", "rtn")
# --lm-head: (weight bits, activation bits or None); "none" keeps it 16-bit; "auto" (the
# default) is w8a8 for the schemes that quantize weights (lossless: WikiText-2 perplexity
# of SmolLM2 19.3152 -> 19.3130), none for kv4
LM_HEADS: dict[str, tuple[int, int | None] | None] = {
    "none": None, "w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, None)}
LM_HEAD_CHOICES = ("auto", *LM_HEADS)
SCHEME_HELP = {
    "w4a4kv4": "the paper's setting: 4-bit weights, activations and KV cache",
    "w4a4": "4-bit weights and activations, 16-bit KV cache",
    "w4a8kv4": "4-bit weights and KV cache, 8-bit activations (the CPU pick: as fast as "
               "W4A4 there, far less loss)",
    "w4a8": "4-bit weights, 8-bit activations",
    "w8a8": "8-bit weights and per-token activations (lossless)",
    "w8a8-static": "8-bit weights, per-tensor activation scales calibrated offline",
    "w4a16": "weight-only 4-bit",
    "kv4": "only the KV cache (4-bit, with R3 / shift chosen per layer)",
}
# the calibration budget (windows × tokens) when --nsamples / --seqlen are not given:
# QuaRot's 128 × 2048 where the maths runs on a GPU; on a CPU a budget that finishes a
# 0.5B model in minutes (a 1.1B layer forward over 128 × 2048 tokens alone takes
# minutes there: benchmarks/results/quantize_floor_cpu.md); a KV-only checkpoint needs
# only what the KV calibration reads (kv_calibration.MAX_WINDOWS × MAX_TOKENS)
BUDGETS = {"cuda": (128, 2048), "cpu": (32, 512), "kv": (8, 512)}
# --calib-self samples used for the KV calibration when no text is given
KV_SELF_SAMPLES = 8


class QuantizeError(QuaRotError):
    """A bad option, model or calibration input for the quantizer."""


def option(default: Any, help: str, *, choices: Any = None, flag: str | None = None,
           metavar: str | None = None, check: Callable[[Any], str | None] | None = None,
           group: str | None = None, required: bool = False, cli_choices: bool = True,
           factory: Callable[[], Any] | None = None) -> Any:
    """A ``QuantizeOptions`` field with what the CLI and the docs need: help, choices,
    flag (default ``--field-name``), a check returning an error message (or None), a
    mutually exclusive group, required on the command line, choices checked by argparse
    (cli_choices) or by check_options' own message."""
    meta = {"help": help, "choices": choices, "flag": flag, "metavar": metavar,
            "check": check, "group": group, "required": required, "cli_choices": cli_choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _positive(name: str, what: str = "positive") -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v > 0 else f"{name} must be {what}, got {v}"


def _ratio(name: str) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or 0.0 < v <= 1.0 else f"{name} must be in (0, 1], got {v}"


@dataclasses.dataclass
class QuantizeOptions:
    """Everything ``vllm-quarot quantize`` takes besides its two directories."""

    scheme: str = option(
        "w4a4", "what to quantize: " + "; ".join(f"{k}: {v}" for k, v in SCHEME_HELP.items()),
        choices=tuple(SCHEMES), required=True, cli_choices=False)
    weight_method: str = option(
        "gptq", "GPTQ (sequential inside each layer, act-order, clip search) or "
        "round-to-nearest", choices=WEIGHT_METHODS)
    calib: str | None = option(
        None, "calibration text file (GPTQ, static scales, KV calibration): random "
        "windows of it", metavar="FILE", group="calib")
    calib_self: int | None = option(
        None, "calibrate on N samples generated by the model itself (data-free)",
        metavar="N", group="calib", check=_positive("--calib-self", "a positive number "
                                                    "of samples"))
    nsamples: int | None = option(
        None, "calibration windows (default: 128 on a GPU, 32 on a CPU, 8 for kv4)",
        check=_positive("--nsamples"))
    seqlen: int | None = option(
        None, "tokens per calibration window (default: 2048 on a GPU, 512 on a CPU)",
        check=_positive("--seqlen"))
    group_size: int = option(
        -1, "-1: one weight scale per output channel; G: per group of G inputs",
        check=lambda v: None if v == -1 or v > 0 else
        f"--group-size must be -1 or positive, got {v}")
    w_clip: bool = option(True, "search per-channel (per-group) weight clip ratios")
    act_clip: float | None = option(
        None, "activation clip ratio (default 0.9 at 4 bits, 1.0 at 8)",
        check=_ratio("--act-clip"))
    # 1.0 measures better than 0.95 with the pivots (KV4 on SmolLM2 19.76 -> 19.64, on
    # the Qwen2.5 surrogate 32.55 -> 31.42; simulation, 2 x 2048): clipping cuts part of
    # the component that all keys share
    kv_clip: float = option(1.0, "KV cache clip ratio", check=_ratio("--kv-clip"))
    seed: int = option(0, "R1's random signs and the calibration windows (same seed, "
                       "same bytes)")
    online_hadamard: bool = option(
        True, "online R4 (down_proj) and R3 (query, key) rotations")
    rotate: str = option(
        "quarot", "quarot: randomized Hadamard R1/R2; spinquant: R1/R2 learned by Cayley "
        "SGD from it; ablations: r1r2 = offline rotations only, none", choices=ROTATIONS)
    r1: str = option(
        "auto", "--rotate quarot: fused = R1 on the residual stream, RMSNorm gains folded "
        "into the next linears (QuaRot); online = no R1: a randomized Hadamard on the "
        "input of q/k/v, gate/up and o_proj at run time, after each RMSNorm with its gain "
        "kept (QuIP's placement; fused into the 4-bit kernels' quantizer); auto = online "
        "where it applies to 4-bit activations (dynamic, no --smooth or --a8-layers: "
        "SmolLM2 W4A4KV4 44.9 -> 34.1), else fused; at --tp N o_proj's Hadamard is one "
        "per rank's shard", choices=R1_PLACEMENTS)
    act_order: bool = option(True, "GPTQ in activation order")
    dynamic_groups: bool = option(
        False, "GPTQ with --group-size: each group's scale from its weights as updated by "
        "the error propagation when GPTQ reaches it (needs --no-act-order), instead of "
        "from the original weights")
    damp: float = option(0.01, "GPTQ dampening", check=_positive("--damp"))
    verify: bool = option(
        False, "check, layer by layer in float64, that the rotated model gives the "
        "original hidden states and logits (fails above 1e-8)")
    overwrite: bool = option(
        False, "replace a non-empty OUT_DIR (only once the new one is complete)")
    resume: bool = option(
        False, "continue an interrupted run for OUT_DIR from its last finished layer "
        "(kept in .OUT_DIR.partial); the options must be the same")
    revision: str | None = option(None, "of a Hub id: branch, tag or commit")
    max_shard_size: str = option(
        "5GB", "safetensors shards of at most this size (+ index), e.g. 5GB, 500MB",
        check=lambda v: shard_bytes(v) and None)
    tp: int = option(
        1, "tensor-parallel-ready for N ranks: block-diagonal online R4 and per-(token, "
        "1/N slice) activation scales on o_proj/down_proj (same numbers at every TP "
        "size dividing N)", metavar="N",
        check=lambda v: None if v >= 1 else
        f"--tp must be a positive number of blocks, got {v}")
    a8_layers: str | None = option(
        None, "keep the activations of some projections at 8 bits: auto (those with "
        "massive outliers on the calibration set), the N worst, or names "
        "(layers.1.mlp.down_proj,...)", metavar="auto|N|LIST",
        check=lambda v: v is not None and parse_a8_layers(v) and None)
    spinquant_steps: int = option(
        30, "--rotate spinquant: Cayley SGD steps, one calibration window each (the "
        "paper: 100)", check=lambda v: None if v >= 0 else
        f"--spinquant-steps must be >= 0, got {v}")
    spinquant_lr: float = option(1.5, "--rotate spinquant: learning rate",
                                 check=_positive("--spinquant-lr"))
    spinquant_weights: str = option(
        "auto", "--rotate spinquant: weights in the loop; auto = 16-bit before GPTQ "
        "(SpinQuant's recipe), RTN before RTN", choices=SPINQUANT_WEIGHTS)
    device: str = option(
        "auto", "where the layer-by-layer maths runs (auto: CUDA when present); one "
        "decoder layer and its calibration activations at a time", choices=DEVICES)
    precision: str = option(
        "float32", "calibration forward passes (Hessians and GPTQ stay float64)",
        choices=tuple(PRECISIONS))
    kv_calibrate: bool = option(
        True, "4-bit KV cache: choose key/value shift, SmoothAttention and R3 per layer "
        "by attention error (on --calib text, else on "
        f"{KV_SELF_SAMPLES} samples the model generates itself)")
    kv_pivots: str = option(
        "auto", "4-bit KV cache: the first N tokens of every sequence keep 16-bit keys "
        "and values (IntactKV; N*256 bytes more per cache block and KV head at head_dim "
        "64); auto: the attention sinks (leading tokens drawing >= 1/20 of the attention "
        "in some layer of the 16-bit model on the calibration windows), found before "
        "every layer's KV choice is calibrated with them; 0 without it", metavar="auto|N",
        check=lambda v: parse_kv_pivots(v) and None)
    lm_head: str = option(
        "auto", "quantize the lm_head too (R1 fused; GPTQ when the layers use GPTQ); "
        "auto: w8a8 when the scheme quantizes weights (lossless), else none",
        choices=LM_HEAD_CHOICES)
    smooth: str | None = option(
        None, "Rotated Runtime Smooth: after the rotations, each decoder-layer linear's "
        "input channels are smoothed in groups by their run-time maxima over the token, "
        "each group quantized at its own scale (format v7 activation.smooth; 4-bit "
        "per-channel weights, per-token activations, --tp 1)",
        choices=SMOOTH_METHODS)
    smooth_group: int = option(
        64, "--smooth: input channels per smoothing group (a multiple of 8)", metavar="G",
        check=lambda v: None if v > 0 and v % 8 == 0 else
        f"--smooth-group must be a positive multiple of 8, got {v}")
    smooth_reorder: bool = option(
        True, "--smooth: group channels by their calibration maxima (needs calibration "
        "text)")
    smooth_levels: int | None = option(
        None, "--smooth: round each group's smoothing factor to an integer multiple 1..L of "
        "the token's base, so that the GEMM is the plain per-token one (format v9 "
        "activation.smooth.factor_levels); 0: float factors, a per-group epilogue "
        "(slower at prefill); default 16 with 4-bit activations, 0 with 8-bit",
        metavar="L", check=lambda v: None if v is None or v == 0 or 2 <= v <= 16 else
        f"--smooth-levels must be 0 or in [2, 16], got {v}")

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
    def pivots(self) -> int | None:
        """--kv-pivots as a count; None for auto (the KV calibration's attention sinks,
        0 without it)."""
        return parse_kv_pivots(self.kv_pivots)

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
                or self.rotate == "spinquant" or self.smooth_reorders)

    @property
    def smooth_factor_levels(self) -> int:
        """activation.smooth.factor_levels to write: --smooth-levels, by default 16 at 4-bit
        activations (integer factors, the plain GEMM) and 0 (float factors) at 8-bit."""
        if self.smooth_levels is not None:
            return self.smooth_levels
        return 16 if self.bits[1] == 4 else 0

    @property
    def smooth_reorders(self) -> bool:
        """--smooth runtime with channels grouped by their calibration maxima."""
        return self.smooth is not None and self.smooth_reorder

    @property
    def calibrates_kv(self) -> bool:
        """The KV cache choices are calibrated: a 4-bit cache and --kv-calibrate (the
        default); without calibration text, on the model's own samples."""
        return self.kv_calibrate and self.bits[2] is not None

    @property
    def uses_calibration(self) -> bool:
        """Calibration activations are computed (needed, or for the KV choices)."""
        return self.needs_calibration or self.calibrates_kv

    @property
    def self_samples(self) -> int | None:
        """--calib-self, or the samples the KV calibration generates when it has no
        text and nothing else needs calibration (None: none generated)."""
        if self.calib_self:
            return self.calib_self
        if self.calib is None and self.calibrates_kv and not self.needs_calibration:
            return KV_SELF_SAMPLES
        return None

    def budget(self, device: str | torch.device) -> tuple[int, int]:
        """(windows, tokens per window) of the calibration: --nsamples / --seqlen, else
        the default for this scheme and device (``BUDGETS``)."""
        kind = "kv" if not self.needs_calibration else torch.device(device).type
        n, t = BUDGETS.get(kind, BUDGETS["cpu"])
        return (self.nsamples or n, self.seqlen or t)

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
    def r1_online(self) -> bool:
        """--r1 resolved: online when asked, or (auto) where the activations are 4-bit,
        dynamic per token, on one TP block, without --smooth or --a8-layers, and R1 is
        QuaRot's randomized Hadamard: there keeping the norm gains out of the weights
        pays (benchmarks/results/README.md#r1-placement); at 8/16-bit activations the
        fused R1 scores the same without the online transforms."""
        if self.r1 != "auto":
            return self.r1 == "online"
        return self.bits[1] == 4 and _r1_online_obstacle(self) is None

    @property
    def online_rotations(self) -> bool:
        """R3/R4 run online (QuaRot and SpinQuant; not the offline-only ablations)."""
        return self.rotate in ("quarot", "spinquant") and self.online_hadamard


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The quantizer's options as argparse arguments (destinations = field names)."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(QuantizeOptions):
        m = f.metadata
        target = p
        if m.get("group"):
            if m["group"] not in groups:
                groups[m["group"]] = p.add_mutually_exclusive_group()
            target = groups[m["group"]]
        kw: dict[str, Any] = {"dest": f.name, "help": m["help"]}
        if f.type in ("bool", bool):
            target.add_argument(_flag(f), action=argparse.BooleanOptionalAction,
                                default=f.default, **kw)
            continue
        typ = str(f.type)
        kw["type"] = int if typ.startswith("int") else float if typ.startswith("float") \
            else str
        if m.get("choices") is not None and m.get("cli_choices", True):
            kw["choices"] = m["choices"]
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        if m.get("required"):
            kw["required"] = True
        else:
            kw["default"] = f.default
        target.add_argument(_flag(f), **kw)


def options_markdown() -> str:
    """The options table of docs/quantize.md, from the fields."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(QuantizeOptions):
        m = f.metadata
        flag = _flag(f)
        if f.type in ("bool", bool):
            flag = f"{flag} / --no-{flag[2:]}"
        default = "required" if m.get("required") else (
            "—" if f.default is None else str(f.default).lower()
            if isinstance(f.default, bool) else str(f.default))
        text = m["help"]
        if m.get("choices") is not None and f.name != "scheme":
            text += " (" + ", ".join(f"`{c}`" for c in m["choices"]) + ")"
        text = text.replace("|", "\\|")
        rows.append(f"| `{flag}` | {default} | {text} |")
    return "\n".join(rows) + "\n"


def check_options(o: QuantizeOptions) -> None:
    """The checks that need neither the model nor the data: each option's own (choices,
    ranges), then the ones between options."""
    for f in dataclasses.fields(QuantizeOptions):
        v, m = getattr(o, f.name), f.metadata
        unset = v is None and f.default is None  # an optional choice left off
        if m.get("choices") is not None and v not in m["choices"] and not unset:
            if f.name == "scheme":
                raise QuantizeError(
                    f"unknown scheme {v!r}; choose one of {', '.join(SCHEMES)}")
            raise QuantizeError(f"{_flag(f)} must be one of {', '.join(m['choices'])}, "
                                f"got {v!r}")
        if m.get("check") is not None:
            problem = m["check"](v)
            if problem:
                raise QuantizeError(problem)
    if o.lm_head not in ("auto", "none") and o.bits[0] >= 16:
        raise QuantizeError(f"--lm-head {o.lm_head}: scheme {o.scheme} keeps 16-bit "
                            "weights; a quantized lm_head needs a weight-quantized scheme")
    w_bits = o.bits[0]
    if o.group_size != -1 and w_bits < 16 and (o.group_size * w_bits) % 32:
        raise QuantizeError(
            f"--group-size {o.group_size} at {w_bits} bits: a group must fill whole "
            f"32-bit words of packed codes (a multiple of {32 // w_bits})")
    if o.pivots and o.bits[2] is None:
        raise QuantizeError(f"--kv-pivots {o.kv_pivots}: scheme {o.scheme} keeps a "
                            "16-bit KV cache")
    resolve_device(o.device)
    if o.a8_layers is not None and (o.bits[1] != 4 or o.static):
        raise QuantizeError(
            f"--a8-layers keeps some 4-bit activations at 8 bits; scheme {o.scheme} "
            "has no 4-bit per-token activations")
    _check_smooth(o)
    _check_r1(o)
    if o.dynamic_groups and o.act_order:
        raise QuantizeError("--dynamic-groups computes each group's scale as GPTQ reaches "
                            "it in column order: add --no-act-order")
    if o.calib is not None and o.calib_self is not None:
        raise QuantizeError("give either --calib FILE or --calib-self N, not both")
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


def _check_smooth(o: QuantizeOptions) -> None:
    """--smooth runtime: 4-bit per-channel weights, per-token activations, one TP block."""
    if o.smooth is None:
        return
    w_bits, a_bits, _ = o.bits
    if a_bits is None or o.static or w_bits != 4:
        raise QuantizeError(
            f"--smooth runtime smooths per-token activations in front of 4-bit weights; "
            f"scheme {o.scheme} has none (use w4a4kv4, w4a4, w4a8kv4 or w4a8)")
    if o.group_size != -1:
        raise QuantizeError("--smooth runtime runs with per-output-channel weights "
                            f"(--group-size -1), got --group-size {o.group_size}")
    if o.tp != 1:
        raise QuantizeError(f"--smooth runtime is served with --tp 1, got --tp {o.tp}")
    if o.smooth_levels and a_bits != 4:
        raise QuantizeError(f"--smooth-levels {o.smooth_levels} needs 4-bit activations (codes "
                            f"times the factor must stay int8); scheme {o.scheme} has "
                            f"{a_bits}-bit: use --smooth-levels 0")


def _r1_online_obstacle(o: QuantizeOptions) -> str | None:
    """Why R1 cannot go online with these options (None: it can): it needs QuaRot's
    randomized Hadamards and dynamic per-token scales (at --tp N o_proj's Hadamard is
    block-diagonal, one block per rank's shard)."""
    if o.rotate != "quarot":
        return (f"--r1 online places QuaRot's randomized Hadamards; --rotate {o.rotate} has "
                "no such R1 (use --rotate quarot)")
    for bad, what in ((o.smooth is not None, "--smooth runtime"),
                      (o.a8_layers is not None, "--a8-layers"),
                      (o.static, f"scheme {o.scheme} (static activation scales)")):
        if bad:
            return f"--r1 online does not combine with {what}: use --r1 fused"
    return None


def _check_r1(o: QuantizeOptions) -> None:
    """--r1 online where it cannot go: one line."""
    why = _r1_online_obstacle(o) if o.r1 == "online" else None
    if why is not None:
        raise QuantizeError(why)


def _calibration_user(o: QuantizeOptions) -> str:
    if o.static:
        return "static activation scales"
    if o.uses_gptq:
        return "GPTQ"
    if o.smooth_reorders:
        return "--smooth runtime with --smooth-reorder (channel maxima)"
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


def parse_kv_pivots(spec: str | int) -> int | None:
    """--kv-pivots: "auto" (None) or a count in [0, MAX_KV_PIVOTS]."""
    if isinstance(spec, str) and spec.strip() == "auto":
        return None
    try:
        n = int(spec)
    except ValueError:
        n = -1
    if isinstance(spec, bool) or not 0 <= n <= MAX_KV_PIVOTS:
        raise QuantizeError(f"--kv-pivots must be auto or 0..{MAX_KV_PIVOTS}, got {spec!r}")
    return n


def check_model_fits(cfg: Any, o: QuantizeOptions) -> None:
    """The checks that need the model's config: group size vs the linears' input sizes,
    calibration length vs the model's context."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    n_heads = cfg.num_attention_heads
    head_dim = _head_dim(cfg)
    if o.group_size != -1 and o.bits[0] < 16:
        sizes = {"hidden size": hidden, "intermediate size (down_proj)": inter,
                 "heads × head_dim (o_proj)": n_heads * head_dim}
        bad = [f"{name} {k}" for name, k in sizes.items() if k % o.group_size]
        if bad:
            raise QuantizeError(
                f"--group-size {o.group_size} does not divide the {', '.join(bad)} of "
                "this model")
    _check_tp(o, inter, n_heads * head_dim)
    if o.smooth is not None:
        sizes = {"hidden size": hidden, "intermediate size (down_proj)": inter,
                 "heads × head_dim (o_proj)": n_heads * head_dim}
        bad = [f"{name} {k}" for name, k in sizes.items() if k % o.smooth_group]
        if bad:
            raise QuantizeError(
                f"--smooth-group {o.smooth_group} does not divide the {', '.join(bad)} of "
                "this model")
    if o.tp > 1 and o.group_size != -1 and o.bits[0] < 16:
        sizes = {"o_proj": n_heads * head_dim // o.tp, "down_proj": inter // o.tp}
        bad = [f"{name} {k}" for name, k in sizes.items() if k % o.group_size]
        if bad:
            raise QuantizeError(
                f"--group-size {o.group_size} does not divide the per-block input size "
                f"(in_features / --tp {o.tp}) of {', '.join(bad)}: a weight group may not "
                "straddle two tensor-parallel ranks")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    seqlen = o.budget(resolve_device(o.device))[1]
    if o.uses_calibration and max_pos is not None and seqlen > max_pos:
        if o.seqlen is None:  # a default budget: fit it to the model
            return
        raise QuantizeError(
            f"--seqlen {o.seqlen} is longer than the model's context "
            f"(max_position_embeddings {max_pos})")




def tp_choices(o: QuantizeOptions, inter: int, attn: int) -> list[int]:
    """Every --tp this model allows with these options: N divides the inputs of o_proj
    (heads × head_dim) and down_proj (intermediate), and with the online R4 a Hadamard
    of order intermediate / N can be built."""
    return [n for n in range(1, min(inter, attn) + 1)
            if inter % n == 0 and attn % n == 0
            and (not o.online_r4 or has_hadamard(inter // n))]


def _check_tp(o: QuantizeOptions, inter: int, attn: int) -> None:
    n = o.tp
    if n == 1:
        return  # the whole-size R4's order is checked (and explained) with the format
    if inter % n == 0 and attn % n == 0:
        if not o.online_r4 or has_hadamard(inter // n):
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


OPTIONS_BEGIN, OPTIONS_END = "<!-- options:begin -->", "<!-- options:end -->"


def write_options_table(doc: Path) -> bool:
    """Rewrite the options table between the markers of doc; True when it changed."""
    text = doc.read_text(encoding="utf-8")
    head, _, rest = text.partition(OPTIONS_BEGIN)
    _, _, tail = rest.partition(OPTIONS_END)
    new = f"{head}{OPTIONS_BEGIN}\n{options_markdown()}{OPTIONS_END}{tail}"
    if new != text:
        doc.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":  # python -m vllm_quarot.offline.options docs/quantize.md
    import sys

    for arg in sys.argv[1:]:
        print(f"{arg}: {'rewritten' if write_options_table(Path(arg)) else 'up to date'}")
