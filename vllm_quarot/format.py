"""The checkpoint format: the ``quantization_config`` section of config.json.

Pydantic models, one per JSON object, that refuse unknown fields; ``QuaRotFormat.from_dict``
validates a section and raises ``CheckpointFormatError`` (one line) for anything
malformed, inconsistent or not served. Shared by the quantizer (writes it), the vLLM
plugin and the simulation (read it). docs/checkpoint-format.md describes every field
(``tests/test_format.py`` checks that it does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    model_validator,
)

from vllm_quarot.errors import CheckpointFormatError
from vllm_quarot.hadamard import HadamardSizeError, fingerprint
from vllm_quarot.models import (
    DOWN_PROJ,
    GATE_PROJ,
    K_PROJ,
    LINEARS,
    Q_PROJ,
    ROW_PARALLEL,
    SUPPORTED_ARCHITECTURES,
    UP_PROJ,
    V_PROJ,
    UnsupportedModelError,
    canonical_parts,
    family_of,
    head_dim,
    linear_sizes,
)

__all__ = [
    "FORMAT_VERSION", "KV_SHIFT_FILE", "MAX_KV_PIVOTS", "QUANT_METHOD", "READABLE_VERSIONS",
    "SCHEMES", "TRANSFORMS_FILE",
    "SUPPORTED_ARCHITECTURES", "ActivationSpec", "CheckpointFormatError", "InputTransform",
    "KVCacheSpec", "LMHeadSpec", "OnlineHadamard", "QuaRotFormat", "R1Spec", "R2Spec",
    "RotationSpec", "SchemeSpec", "SmoothSpec", "WeightSpec",
]

QUANT_METHOD = "quarot"
# 2: tensor_parallel_blocks (block-diagonal R4); 1 reads as 1 block
# 3: activation.layer_bits (per-layer activation precision); 1 and 2 read as none
# 4: kv_cache.shift (per-layer key/value centring, KV_SHIFT_FILE) and rotation.r3.layers
#    (R3 on some layers only); 1-3 read as no shift and R3 on every layer
# 5: lm_head (a quantized lm_head); 1-4 read as a 16-bit lm_head
# 6: kv_cache.pivots (the first tokens' keys and values kept 16-bit: IntactKV); 1-5 read
#    as none
# 7: activation.smooth (Rotated Runtime Smooth, per-linear smooth_perm tensors); 1-6
#    read as no smoothing
# 8: rotation.input_transforms (stored online matrices, TRANSFORMS_FILE: imported
#    compressed-tensors checkpoints); 1-7 read as none
# 9: activation.smooth.factor_levels (integer smoothing factors, the plain per-token GEMM);
#    7-8 read as 0 (float factors, a per-group epilogue)
FORMAT_VERSION = 9
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
# kv_cache.pivots: at most this many leading tokens per sequence (they live in the tail of
# the sequence's first cache block, which holds at least 32 tokens on CPU)
MAX_KV_PIVOTS = 8
# the per-layer key/value shift vectors of a ``kv_cache.shift`` checkpoint; in a
# subfolder so that vLLM's loader, which globs *.safetensors, never reads it as weights
KV_SHIFT_FILE = "quarot/kv_shift.safetensors"
# the matrices of rotation.input_transforms (same subfolder, same reason)
TRANSFORMS_FILE = "quarot/transforms.safetensors"
ACTIVATION_MODES = ("per-token", "static-per-tensor")
R1_KINDS = ("randomized-hadamard", "cayley-learned", "none")
# the canonical linears vLLM merges into one (one input: one online transform)
MERGED_LINEARS = ((Q_PROJ, K_PROJ, V_PROJ), (GATE_PROJ, UP_PROJ))


class _Section(BaseModel):
    """A JSON object of the section: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _clip(section: str, ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise CheckpointFormatError(f"{section} clip_ratio must be in (0, 1], got {ratio}")


class WeightSpec(_Section):
    bits: int = 4  # 4 or 8: packed codes; 16: plain 16-bit weights (kv4)
    group_size: int = -1  # -1: one scale per output channel
    symmetric: bool = True  # no zero points
    method: str = "rtn"  # how the codes were chosen: rtn | gptq | none (informational)

    @model_validator(mode="after")
    def _check(self) -> WeightSpec:
        if self.bits not in (4, 8, 16):
            raise CheckpointFormatError(f"weight bits must be 4, 8 or 16, got {self.bits}")
        if not self.symmetric:
            raise CheckpointFormatError("the format stores symmetric weights only "
                                        "(weight.symmetric must be true)")
        if self.group_size != -1 and self.group_size <= 0:
            raise CheckpointFormatError(
                f"weight group_size must be -1 or > 0, got {self.group_size}")
        return self


SMOOTH_METHODS = ("runtime",)
# the tokens a smoothing factor is the maximum over: "token" (each token alone) is what
# the runtime serves; the maximum over the tokens of a step would make a request's output
# depend on the requests batched with it
SMOOTH_MAXIMA = ("token",)


class SmoothSpec(_Section):
    """activation.smooth (v7, the quantizer's --smooth runtime): Rotated Runtime Smooth.
    Every quantized decoder-layer linear splits its (rotated) input channels into groups
    of ``group_size`` — in the order of its ``smooth_perm`` tensor when ``reorder``
    (channels sorted by their calibration maxima), else in natural order — divides each
    group by its largest |x| over the token (``maxima``), quantizes the token at the
    activation bits and clip ratio, and the integer GEMM scales each group's partial sum
    by (token scale × smoothing factor). Weights are per output channel, never rescaled.

    ``factor_levels`` L (v9): 0 keeps the smoothing factors in float32 (the GEMM scales
    each group's partial sum); L > 0 rounds each group's scale to an integer multiple
    f in [1, L] of the token's largest group scale / L, so that codes × f stay int8 and
    the GEMM is the plain per-token one (vllm_quarot.quant.smooth_quantize)."""

    method: str = "runtime"
    group_size: int = 64
    maxima: str = "token"
    reorder: bool = True
    factor_levels: int = 0

    @model_validator(mode="after")
    def _check(self) -> SmoothSpec:
        if self.method not in SMOOTH_METHODS:
            raise CheckpointFormatError(
                f"activation.smooth.method must be one of {', '.join(SMOOTH_METHODS)}, got "
                f"{self.method!r}")
        if self.maxima not in SMOOTH_MAXIMA:
            raise CheckpointFormatError(
                f"activation.smooth.maxima {self.maxima!r} is not served by this vllm-quarot "
                f"(it serves {', '.join(SMOOTH_MAXIMA)})")
        if self.group_size <= 0 or self.group_size % 8:
            raise CheckpointFormatError(
                f"activation.smooth.group_size must be a positive multiple of 8, got "
                f"{self.group_size!r}")
        if self.factor_levels != 0 and not 2 <= self.factor_levels <= 16:
            raise CheckpointFormatError(
                "activation.smooth.factor_levels must be 0 (float factors) or in [2, 16] "
                f"(integer factors of 4-bit codes that stay int8), got {self.factor_levels!r}")
        return self


class ActivationSpec(_Section):
    bits: int = 4  # 4 or 8
    clip_ratio: float = 1.0
    dynamic: str = "per-token"  # or "static-per-tensor" (input_scale from calibration)
    # canonical linears (full names, e.g. model.layers.1.mlp.down_proj) whose inputs are
    # quantized at other bits than ``bits`` (8 for the few with massive outliers: the
    # quantizer's --a8-layers); an 8-bit layer quantizes without clipping
    layer_bits: dict[str, int] = Field(default_factory=dict)
    smooth: SmoothSpec | None = None  # v7: Rotated Runtime Smooth (None: per token)

    @model_validator(mode="after")
    def _check(self) -> ActivationSpec:
        if self.bits not in (4, 8):
            raise CheckpointFormatError(f"activation bits must be 4 or 8, got {self.bits}")
        _clip("activation", self.clip_ratio)
        if any(v not in (4, 8) for v in self.layer_bits.values()):
            raise CheckpointFormatError(
                "activation.layer_bits must map linear names to 4 or 8 bits, got "
                f"{self.layer_bits!r}")
        if self.dynamic not in ACTIVATION_MODES:
            raise CheckpointFormatError(
                f"activation quantization {self.dynamic!r} is not supported; the format "
                f"supports {', '.join(ACTIVATION_MODES)}")
        if self.layer_bits and self.static:
            raise CheckpointFormatError(
                "activation.layer_bits is for per-token activations only")
        if self.smooth is not None and self.static:
            raise CheckpointFormatError("activation.smooth needs per-token activations")
        return self

    @property
    def static(self) -> bool:
        return self.dynamic == "static-per-tensor"

    def for_layer(self, name: str) -> tuple[int, float]:
        """(bits, clip ratio) of the input of the canonical linear ``name``."""
        bits = self.layer_bits.get(name, self.bits)
        return bits, (self.clip_ratio if bits == self.bits else 1.0)

    def for_module(self, name: str) -> tuple[int, float]:
        """(bits, clip) of a module that may compute several canonical linears (vLLM's
        qkv_proj / gate_up_proj, Phi-3's fused ones): they share one input, so they
        must share one precision."""
        names = canonical_parts(name)
        got = {self.for_layer(n) for n in names}
        if len(got) > 1:
            raise CheckpointFormatError(
                f"activation.layer_bits gives {', '.join(names)} different precisions; "
                f"they share one input in {name}")
        return got.pop()


class KVCacheSpec(_Section):
    bits: int = 4
    group_size: int = -1  # -1: one group per head (head_dim)
    asymmetric: bool = True
    clip_ratio: float = 1.0
    # keys and values are stored minus a per-layer constant vector per KV head
    # (KV_SHIFT_FILE): a constant subtracted from every key leaves softmax(q·k) unchanged
    # (it moves all of a query's scores by q·c), the value shift is added back to the
    # attention output; it takes the massive bias components (Qwen2's k_proj biases)
    # out of the 4-bit range
    shift: bool = False
    # IntactKV: the first `pivots` tokens of every sequence keep 16-bit (float16) keys and
    # values (after the shift and R3), the others are 4-bit; they are the attention sinks,
    # whose one key draws a third of every later query's attention on Qwen2.5
    # (format v6; 0: none)
    pivots: StrictInt = 0

    @model_validator(mode="after")
    def _check(self) -> KVCacheSpec:
        if self.bits not in (4, 8):
            raise CheckpointFormatError(f"kv_cache bits must be 4 or 8, got {self.bits}")
        _clip("kv_cache", self.clip_ratio)
        if self.group_size != -1 or not self.asymmetric:
            raise CheckpointFormatError(
                "kv_cache: the runtime stores one asymmetric group per head "
                f"(group_size -1, asymmetric true), got group_size {self.group_size}, "
                f"asymmetric {str(self.asymmetric).lower()}")
        if self.shift and self.bits != 4:
            raise CheckpointFormatError("kv_cache.shift is served with 4-bit caches only")
        if not 0 <= self.pivots <= MAX_KV_PIVOTS:
            raise CheckpointFormatError(
                f"kv_cache.pivots must be an integer in [0, {MAX_KV_PIVOTS}], got {self.pivots}")
        if self.pivots and self.bits != 4:
            raise CheckpointFormatError("kv_cache.pivots is served with 4-bit caches only")
        return self


class LMHeadSpec(_Section):
    """A quantized lm_head (format v5, the quantizer's --lm-head): its own weight bits
    and per-token activation bits (None: 16-bit activations), R1 fused like every
    linear; absent, the lm_head is a 16-bit ``lm_head.weight``."""

    bits: int = 8
    group_size: int = -1
    activation_bits: int | None = 8
    method: str = "rtn"  # rtn | gptq (informational)

    @model_validator(mode="after")
    def _check(self) -> LMHeadSpec:
        if self.bits not in (4, 8):
            raise CheckpointFormatError(f"lm_head bits must be 4 or 8, got {self.bits}")
        if self.activation_bits not in (None, 8):
            raise CheckpointFormatError(
                f"lm_head activation_bits must be 8 or null, got {self.activation_bits}")
        if self.group_size != -1 and (self.group_size <= 0
                                      or (self.group_size * self.bits) % 32):
            raise CheckpointFormatError(
                f"lm_head group_size must be -1 or fill whole int32 words, got "
                f"{self.group_size}")
        return self

    @property
    def name(self) -> str:
        """w8a8, w4a16, w4a8 (the quantizer's --lm-head)."""
        return f"w{self.bits}a{self.activation_bits or 16}"


class R1Spec(_Section):
    kind: str = "none"  # randomized-hadamard | cayley-learned | none
    seed: int = 0
    size: int = 0  # hidden size; 0: no R1

    @model_validator(mode="after")
    def _check(self) -> R1Spec:
        if self.kind not in R1_KINDS:
            raise CheckpointFormatError(
                f"rotation.r1.kind must be one of {', '.join(R1_KINDS)}, got {self.kind!r}")
        return self


class R2Spec(_Section):
    size: int = 0  # head_dim


class OnlineHadamard(_Section):
    """An online rotation (R3, R4) as the quantizer built it (``hadamard.fingerprint``):
    the runtime rebuilds the matrix and refuses a checkpoint whose stored one differs."""

    size: int  # the whole dimension it rotates
    blocks: int = 1  # block-diagonal I_blocks ⊗ H_{size/blocks} (tensor-parallel R4)
    # (K, 2^k) of one block: K·2^k·blocks == size; absent (v1 before 0.3): derived
    factors: tuple[int, int] | None = Field(None, alias="hadamard")
    construction: str | None = None  # None: written by a version that did not store it
    sha256: str | None = None  # of the ±1 K×K factor
    # R3 only: the decoder layers whose queries and keys it rotates (None: every layer);
    # the quantizer leaves it off where it makes the 4-bit keys worse
    layers: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _derive(self) -> OnlineHadamard:
        if self.blocks < 1 or self.size % self.blocks:
            raise CheckpointFormatError(
                f"an online Hadamard of size {self.size} cannot have {self.blocks} blocks")
        if self.factors is None:  # checkpoints before 0.3 stored {"size"} only
            try:
                fp = fingerprint(self.size // self.blocks)
            except HadamardSizeError as e:
                raise CheckpointFormatError(str(e)) from e
            object.__setattr__(self, "factors", tuple(fp["hadamard"]))
        if self.layers is not None and (
                list(self.layers) != sorted(set(self.layers)) or any(i < 0 for i in self.layers)):
            raise CheckpointFormatError(
                f"rotation.r3.layers must be increasing layer indices, got {list(self.layers)}")
        return self

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    @classmethod
    def of_size(cls, size: int, blocks: int = 1) -> OnlineHadamard:
        fp = fingerprint(size // blocks)
        return cls(size=size, blocks=blocks, factors=tuple(fp["hadamard"]),
                   construction=fp["construction"], sha256=fp["sha256"])

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"size": self.size, "blocks": self.blocks,
                             "hadamard": list(self.factors or ()),
                             "construction": self.construction, "sha256": self.sha256}
        if self.layers is not None:
            d["layers"] = list(self.layers)
        return d

    def check(self, name: str) -> None:
        """The Hadamard this version builds for ``size / blocks`` is the stored one."""
        k, pow2 = self.factors or (0, 0)
        if k * pow2 * self.blocks != self.size:
            raise CheckpointFormatError(
                f"{name}.hadamard {list(self.factors or ())} × {self.blocks} blocks does not "
                f"multiply to {self.size}")
        try:
            fp = fingerprint(self.block_size)
        except HadamardSizeError as e:
            raise CheckpointFormatError(f"{name}: {e}") from e
        stored = (list(self.factors or ()), self.construction or fp["construction"],
                  self.sha256 or fp["sha256"])
        if stored != (fp["hadamard"], fp["construction"], fp["sha256"]):
            raise CheckpointFormatError(
                f"{name}: the checkpoint's online Hadamard of order {self.block_size} "
                f"({self.construction or '?'} {list(self.factors or ())}, sha256 "
                f"{(self.sha256 or '?')[:12]}) is not the one this vllm-quarot builds "
                f"({fp['construction']} {fp['hadamard']}, sha256 {fp['sha256'][:12]}): its "
                "weights were rotated with another matrix. Serve it with the vllm-quarot "
                "version that made it (quantizer.version) or quantize the model again")


class InputTransform(_Section):
    """An online transform stored as a matrix (``vllm-quarot import`` of a
    compressed-tensors checkpoint: llm-compressor's QuIP / SpinQuant online rotations):
    the input x of each listed linear (every decoder layer) becomes x @ M / √size, M
    applied block-diagonally when ``size`` is smaller than the input (compressed-tensors'
    head_dim). M is ``name`` in TRANSFORMS_FILE, checked against ``sha256`` (of its
    float32 bytes) when the runtime reads it."""

    name: str  # the tensor in TRANSFORMS_FILE
    size: int  # the order of M (one block)
    linears: tuple[str, ...]  # canonical linears of a layer (``self_attn.q_proj``, ...)
    sha256: str

    @model_validator(mode="after")
    def _check(self) -> InputTransform:
        bad = [n for n in self.linears if n not in LINEARS]
        if bad or not self.linears or self.size < 1:
            raise CheckpointFormatError(
                f"rotation.input_transforms {self.name!r}: size {self.size}, linears "
                f"{list(self.linears)} (known linears: {', '.join(LINEARS)})")
        return self


class RotationSpec(_Section):
    r1: R1Spec = Field(default_factory=R1Spec)
    r2: R2Spec | None = None  # per-head Hadamard of head_dim fused into v/o_proj; null: none
    r3: OnlineHadamard | None = None  # head_dim, on queries and keys after RoPE (KV4)
    r4: OnlineHadamard | None = None  # intermediate size, before down_proj
    input_transforms: tuple[InputTransform, ...] = ()  # stored online matrices

    def input_transform(self, linear: str) -> InputTransform | None:
        """The stored transform of a canonical linear (``...self_attn.q_proj``)."""
        return next((t for t in self.input_transforms
                     if any(linear.endswith(n) for n in t.linears)), None)

    @property
    def r2_size(self) -> int:
        return self.r2.size if self.r2 else 0

    @property
    def r3_size(self) -> int:
        return self.r3.size if self.r3 else 0

    @property
    def r4_size(self) -> int:
        return self.r4.size if self.r4 else 0

    def to_dict(self) -> dict[str, Any]:
        return {"r1": self.r1.model_dump(),
                "r2": self.r2.model_dump() if self.r2 and self.r2.size else None,
                "r3": self.r3.to_dict() if self.r3 else None,
                "r4": self.r4.to_dict() if self.r4 else None,
                **({"input_transforms": [t.model_dump() for t in self.input_transforms]}
                   if self.input_transforms else {})}


@dataclass(frozen=True)
class SchemeSpec:
    """What a scheme name promises about the sections (checked against them on load)."""

    weight_bits: int
    activation_bits: int | None  # None: 16-bit activations
    activation_mode: str | None  # "per-token" | "static-per-tensor" | None
    kv_bits: int | None  # None: 16-bit KV cache

    def describe(self) -> str:
        act = ("activation none" if self.activation_bits is None
               else f"activation {self.activation_bits}-bit {self.activation_mode}")
        kv = "kv_cache none" if self.kv_bits is None else f"kv_cache {self.kv_bits}-bit"
        return f"weight {self.weight_bits}-bit, {act}, {kv}"


# The schemes the quantizer writes (``vllm-quarot quantize --scheme``).
SCHEMES: dict[str, SchemeSpec] = {
    "w4a4kv4": SchemeSpec(4, 4, "per-token", 4),
    "w4a4": SchemeSpec(4, 4, "per-token", None),
    "w4a8kv4": SchemeSpec(4, 8, "per-token", 4),
    "w4a8": SchemeSpec(4, 8, "per-token", None),
    "w8a8": SchemeSpec(8, 8, "per-token", None),
    "w8a8-static": SchemeSpec(8, 8, "static-per-tensor", None),
    "w4a16": SchemeSpec(4, None, None, None),
    "kv4": SchemeSpec(16, None, None, 4),
}


def _sections(weight: WeightSpec, activation: ActivationSpec | None,
              kv_cache: KVCacheSpec | None) -> SchemeSpec:
    return SchemeSpec(weight.bits, activation.bits if activation else None,
                      activation.dynamic if activation else None,
                      kv_cache.bits if kv_cache else None)


class QuaRotFormat(_Section):
    quant_method: Literal["quarot"] = QUANT_METHOD
    format_version: int = FORMAT_VERSION
    scheme: str = "custom"  # absent in a hand-written section: named after its sections
    # N: the checkpoint serves at tensor parallelism T for every T dividing N with the same
    # numbers: R4 is I_N ⊗ H_{n/N} and the inputs of the row-parallel linears (o_proj,
    # down_proj) are quantized per (token, block of in_features/N)
    tp_blocks: int = Field(1, alias="tensor_parallel_blocks")
    weight: WeightSpec
    activation: ActivationSpec | None = None  # None: 16-bit activations
    kv_cache: KVCacheSpec | None = None  # None: 16-bit KV cache
    rotation: RotationSpec
    ignore: tuple[str, ...] = ("lm_head",)
    lm_head: LMHeadSpec | None = None  # None: a 16-bit lm_head (ignored by quantization)
    quantizer: dict[str, Any] = Field(default_factory=dict)  # provenance, choices made

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
            "tensor_parallel_blocks": self.tp_blocks,
            "weight": self.weight.model_dump(),
            "activation": self.activation.model_dump() if self.activation else None,
            "kv_cache": self.kv_cache.model_dump() if self.kv_cache else None,
            "rotation": self.rotation.to_dict(),
            "ignore": list(self.ignore),
            "lm_head": self.lm_head.model_dump() if self.lm_head else None,
            "quantizer": dict(self.quantizer),
        }

    @classmethod
    def from_dict(cls, cfg: Any) -> QuaRotFormat:
        """Validate a quantization_config dict; CheckpointFormatError says what is wrong."""
        if not isinstance(cfg, dict):
            raise CheckpointFormatError("quantization_config must be a JSON object")
        if cfg.get("quant_method") != QUANT_METHOD:
            raise CheckpointFormatError(
                f"not a QuaRot checkpoint: quant_method is {cfg.get('quant_method')!r}")
        if cfg.get("format_version") not in READABLE_VERSIONS:
            raise CheckpointFormatError(
                f"unsupported QuaRot format_version {cfg.get('format_version')!r}; "
                f"this vllm-quarot reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        for key in ("weight", "rotation"):
            if not isinstance(cfg.get(key), dict):
                raise CheckpointFormatError(
                    f"quantization_config.{key} is missing or not an object")
        data = {k: v for k, v in cfg.items() if not (k == "scheme" and v is None)}
        recorded = (cfg.get("quantizer") or {}).get("scheme")
        if "scheme" not in data and isinstance(recorded, str):
            # the quantizer records the scheme too (quantizer.scheme): a deleted
            # "scheme" is still checked against the sections
            data["scheme"] = recorded
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise CheckpointFormatError(
                f"malformed quantization_config: {where}: {err['msg']}") from None

    def replace(self, **changes: Any) -> QuaRotFormat:
        """A validated copy with some fields changed (as dataclasses.replace)."""
        return type(self).from_dict(self.model_copy(update=changes).to_dict())

    @model_validator(mode="after")
    def _check(self) -> QuaRotFormat:
        w, a, r = self.weight, self.activation, self.rotation
        if a is not None and w.bits == 16:
            raise CheckpointFormatError("quantized activations need quantized weights")
        if self.tp_blocks < 1:
            raise CheckpointFormatError(
                f"tensor_parallel_blocks must be a positive integer, got {self.tp_blocks!r}")
        if r.r4 is not None and r.r4.blocks != self.tp_blocks:
            raise CheckpointFormatError(
                f"rotation.r4.blocks is {r.r4.blocks} but tensor_parallel_blocks is "
                f"{self.tp_blocks}: the two must agree")
        if r.r3 is not None and r.r3.blocks != 1:
            raise CheckpointFormatError("rotation.r3 is one Hadamard per head: blocks must be 1")
        if r.r4 is not None and r.r4.layers is not None:
            raise CheckpointFormatError("rotation.r4.layers is not supported (R4 is on every "
                                        "layer)")
        for name, online in (("rotation.r3", r.r3), ("rotation.r4", r.r4)):
            if online is not None:
                online.check(name)
        listed = [n for t in r.input_transforms for n in t.linears]
        if len(listed) != len(set(listed)):
            raise CheckpointFormatError(
                "rotation.input_transforms lists a linear twice: one transform per input")
        for group in MERGED_LINEARS:  # vLLM computes each group as one linear
            names = [str(t.name) if (t := r.input_transform(lin)) else "none"
                     for lin in group]
            if len(set(names)) > 1:
                raise CheckpointFormatError(
                    f"rotation.input_transforms differ across {', '.join(group)} "
                    f"({', '.join(names)}), which vLLM computes as one linear with one input")
        if r.input_transforms and r.r4 is not None and r.input_transform(DOWN_PROJ):
            raise CheckpointFormatError(
                "rotation.input_transforms names mlp.down_proj, which rotation.r4 rotates: "
                "one transform per input")
        if self.lm_head is not None and w.bits >= 16:
            raise CheckpointFormatError("a quantized lm_head needs a quantized scheme")
        if self.scheme == "custom":  # hand-written section: named after what it says
            got = self.sections()
            name = next((n for n, s in SCHEMES.items() if s == got), None)
            if name is None:
                raise CheckpointFormatError(
                    f"quantization_config has no scheme, and its sections "
                    f"({got.describe()}) match none this vllm-quarot serves: "
                    f"{', '.join(SCHEMES)}")
            object.__setattr__(self, "scheme", name)
        self._check_scheme()
        self._check_rotation_record()
        self._check_smooth()
        return self

    def _check_smooth(self) -> None:
        """activation.smooth is served with 4-bit per-channel weights and one TP block."""
        smooth = self.activation.smooth if self.activation is not None else None
        if smooth is None:
            return
        w = self.weight
        if w.bits != 4 or w.group_size != -1:
            raise CheckpointFormatError(
                "activation.smooth is served with 4-bit per-output-channel weights (weight "
                f"bits 4, group_size -1), got bits {w.bits}, group_size {w.group_size}")
        if self.tp_blocks != 1:
            raise CheckpointFormatError(
                "activation.smooth is served with tensor_parallel_blocks 1, got "
                f"{self.tp_blocks}")

    def sections(self) -> SchemeSpec:
        """The scheme the weight / activation / kv_cache sections describe."""
        return _sections(self.weight, self.activation, self.kv_cache)

    def _check_scheme(self) -> None:
        """The scheme is one we know, and it names what the sections say."""
        spec = SCHEMES.get(self.scheme)
        if spec is None:
            raise CheckpointFormatError(
                f"unknown scheme {self.scheme!r}; this vllm-quarot serves "
                f"{', '.join(SCHEMES)}")
        got = self.sections()
        if got != spec:
            raise CheckpointFormatError(
                f"scheme {self.scheme!r} means {spec.describe()}, but the sections say "
                f"{got.describe()}: quantization_config was edited or damaged "
                "(re-quantize, or restore the section)")

    def _check_rotation_record(self) -> None:
        """The online rotations agree with what the quantizer recorded doing.

        ``quantizer.rotate`` (quarot | spinquant | r1r2 | none) and
        ``quantizer.online_hadamard`` (bool; absent in checkpoints of vllm-quarot <= 0.1,
        then only contradictions provable without it are refused) tell whether the
        down_proj weights carry R4 and whether keys were calibrated behind R3.
        """
        q, r = self.quantizer, self.rotation
        rotate = q.get("rotate")
        if rotate is None:
            return  # not recorded (another tool): nothing to compare with
        act, kv = self.activation is not None, self.kv_cache is not None
        if rotate in ("none", "r1r2"):
            for name, present in (("rotation.r3", r.r3 is not None),
                                  ("rotation.r4", r.r4 is not None)):
                if present:
                    raise CheckpointFormatError(
                        f"{name} is set but quantizer.rotate is {rotate!r}: the weights "
                        "carry no online Hadamard, the runtime would apply one anyway")
            if rotate == "none" and r.r1.kind != "none":
                raise CheckpointFormatError(
                    f"rotation.r1.kind is {r.r1.kind!r} but quantizer.rotate is 'none'")
            return
        if rotate not in ("quarot", "spinquant"):
            return
        recorded = q.get("online_hadamard")
        # not recorded (vllm-quarot <= 0.1): R3 proves the online Hadamards were on
        online = recorded if recorded is not None else (True if r.r3 else None)
        # weight-only 4/8-bit schemes carry R4 since the quantizer records its scheme
        # (quantizer.scheme); older W4A16 checkpoints have none
        weight_r4 = self.weight.bits < 16 and "scheme" in q
        for name, used, present, what in (
            ("rotation.r4", act or weight_r4, r.r4 is not None,
             "down_proj's weights carry R4"),
            ("rotation.r3", kv, r.r3 is not None, "keys were calibrated behind R3"),
        ):
            if present and (online is False or not used):
                raise CheckpointFormatError(
                    f"{name} is set, but the quantizer did not rotate for it (rotate "
                    f"'quarot', online_hadamard {str(recorded).lower()}, scheme "
                    f"{self.scheme!r}): the runtime would apply a Hadamard the weights "
                    "do not carry")
            if used and online and not present:
                raise CheckpointFormatError(
                    f"{name} is null, but the quantizer applied it (rotate 'quarot' with "
                    f"online Hadamards, scheme {self.scheme!r}): {what}, so the runtime "
                    f"must apply it online; restore {name} from the original config.json")

    def check_model(self, hf_config: Any) -> None:
        """The checkpoint was made for this architecture and these sizes."""
        try:
            family_of(hf_config)
        except UnsupportedModelError as e:
            raise CheckpointFormatError(str(e)) from None
        r = self.rotation
        checks = [
            ("rotation.r1.size", r.r1.size, hf_config.hidden_size),
            ("rotation.r2.size", r.r2_size, head_dim(hf_config)),
            ("rotation.r3.size", r.r3_size, head_dim(hf_config)),
            ("rotation.r4.size", r.r4_size, hf_config.intermediate_size),
        ]
        if r.r3 is not None and r.r3.layers and r.r3.layers[-1] >= hf_config.num_hidden_layers:
            raise CheckpointFormatError(
                f"rotation.r3.layers names layer {r.r3.layers[-1]}, but the model has "
                f"{hf_config.num_hidden_layers} layers: checkpoint and config.json do not match")
        for name, got, want in checks:
            if got and got != want:
                raise CheckpointFormatError(
                    f"{name} is {got} but the model has size {want}: checkpoint and "
                    "config.json do not match")
        n, attn = self.tp_blocks, hf_config.num_attention_heads * head_dim(hf_config)
        if r.input_transforms:
            sizes = linear_sizes(hf_config)
            for t in r.input_transforms:
                for lin in t.linears:
                    k = sizes[lin][1]
                    if k % t.size:
                        raise CheckpointFormatError(
                            f"rotation.input_transforms {t.name!r} of size {t.size} does "
                            f"not divide {lin}'s input size {k}")
                    if lin in ROW_PARALLEL and n > 1 and (k % n or (k // n) % t.size):
                        raise CheckpointFormatError(
                            f"rotation.input_transforms {t.name!r} of size {t.size} "
                            f"crosses the tensor_parallel_blocks {n} of {lin}'s input "
                            f"({k}): each block must lie within one")
        smooth = self.activation.smooth if self.activation is not None else None
        if smooth is not None:
            sizes = {"hidden size": hf_config.hidden_size, "heads × head_dim": attn,
                     "intermediate size": hf_config.intermediate_size}
            bad = [f"{k} {v}" for k, v in sizes.items() if v % smooth.group_size]
            if bad:
                raise CheckpointFormatError(
                    f"activation.smooth.group_size {smooth.group_size} does not divide the "
                    f"{', '.join(bad)} of this model")
        if attn % n or hf_config.intermediate_size % n:
            raise CheckpointFormatError(
                f"tensor_parallel_blocks {n} does not divide the inputs of o_proj ({attn}) "
                f"and down_proj ({hf_config.intermediate_size})")

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Serving at tensor parallelism tp_size gives this checkpoint's numbers: each
        rank holds whole blocks of the row-parallel inputs (and of R4). Weight-only and
        static-activation checkpoints without R4 compute the same at any size."""
        if tp_size == 1 or self.tp_blocks % tp_size == 0:
            return
        dynamic = self.activation is not None and not self.activation.static
        if self.rotation.r4 is None and not dynamic:
            return
        if self.quantizer.get("rotate") == "imported":
            raise CheckpointFormatError(
                f"--tensor-parallel-size {tp_size} cannot serve this imported checkpoint: "
                "its inputs are quantized per token over the whole input of o_proj and "
                "down_proj (compressed-tensors' dynamic per-token scheme), which no rank "
                "holds at tensor parallelism; serve it at --tensor-parallel-size 1")
        what = ("its online R4 Hadamard spans the whole intermediate size"
                if self.tp_blocks == 1 and self.rotation.r4 is not None else
                f"it was quantized for tensor parallelism up to {self.tp_blocks} "
                f"(tensor_parallel_blocks {self.tp_blocks})")
        raise CheckpointFormatError(
            f"--tensor-parallel-size {tp_size} cannot serve this checkpoint: {what}. "
            f"Quantize it with `vllm-quarot quantize ... --tp {tp_size}` (or a multiple "
            f"of {tp_size}), or serve it at a tensor-parallel size dividing "
            f"{self.tp_blocks}")


    def check_packing(self, hf_config: Any, tp_size: int = 1) -> None:
        """vLLM loads packed codes as whole int32s per linear (per rank's shard of a
        row-parallel input at tensor parallelism): a model whose input sizes do not
        allow that (e.g. stories260K's intermediate 172 at 4 bits) is quantized for the
        simulation only, or for another tensor-parallel size."""
        bits = self.weight.bits
        if bits >= 16:
            return
        per = 32 // bits
        sizes = {lin: k // tp_size if lin in ROW_PARALLEL else k
                 for lin, (_, k) in linear_sizes(hf_config).items()}
        bad = [f"{lin} ({k})" for lin, k in sizes.items() if k % per]
        if self.lm_head is not None and hf_config.hidden_size % (32 // self.lm_head.bits):
            bad.append(f"lm_head ({hf_config.hidden_size})")
        if bad and tp_size > 1:
            raise CheckpointFormatError(
                f"--tensor-parallel-size {tp_size} cannot serve this checkpoint: each "
                f"rank's input of {', '.join(bad)} is not a multiple of {per} (whole int32s "
                f"of {bits}-bit codes); serve it at a size that gives whole int32s")
        if bad:
            raise CheckpointFormatError(
                f"vLLM cannot load this checkpoint's {bits}-bit codes: the input size of "
                f"{', '.join(bad)} is not a multiple of {per} (whole int32s of packed "
                "codes); it runs in the simulation only (vllm-quarot eval ... --backend "
                "sim)")

    def check_transforms_tp(self, tp_size: int, hf_config: Any) -> None:
        """A stored transform on a row-parallel input (o_proj, down_proj), whose shards
        live on different ranks, runs per rank only if its blocks lie within a shard."""
        if tp_size == 1 or not self.rotation.input_transforms:
            return
        sizes = linear_sizes(hf_config)
        for t in self.rotation.input_transforms:
            for lin in t.linears:
                k = sizes[lin][1]
                if lin in ROW_PARALLEL and (k % tp_size or (k // tp_size) % t.size):
                    raise CheckpointFormatError(
                        f"--tensor-parallel-size {tp_size} cannot serve this checkpoint: "
                        f"its online transform {t.name!r} of order {t.size} spans "
                        f"{lin}'s input ({k}), which tensor parallelism splits into "
                        f"{tp_size} shards of {k // tp_size}. Serve it at "
                        "--tensor-parallel-size 1, or make it with a transform block "
                        "(llm-compressor's head_dim) that divides the shard")


def documented_fields() -> list[str]:
    """Every field path of the section (``weight.bits``, ``rotation.r4.sha256``, ...), for
    the test that docs/checkpoint-format.md describes each."""
    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, f in model.model_fields.items():
            key = f.alias or name
            out.append(prefix + key)
            for sub in _models_in(f.annotation):
                out += walk(sub, f"{prefix}{key}.")
        return out
    return walk(QuaRotFormat, "")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    import typing

    args = typing.get_args(annotation) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
