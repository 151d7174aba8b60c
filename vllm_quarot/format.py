"""Checkpoint format v1: the ``quantization_config`` section of config.json.

Pure data and validation, shared by the quantizer (writes it), the vLLM plugin and
the simulation (read it). docs/checkpoint-format.md describes every field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vllm_quarot.hadamard import HadamardSizeError, fingerprint

QUANT_METHOD = "quarot"
# 2: tensor_parallel_blocks (block-diagonal R4); 1 reads as 1 block
# 3: activation.layer_bits (per-layer activation precision); 1 and 2 read as none
# 4: kv_cache.shift (per-layer key/value centring, KV_SHIFT_FILE) and rotation.r3.layers
#    (R3 on some layers only); 1-3 read as no shift and R3 on every layer
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
# the per-layer key/value shift vectors of a ``kv_cache.shift`` checkpoint; in a
# subfolder so that vLLM's loader, which globs *.safetensors, never reads it as weights
KV_SHIFT_FILE = "quarot/kv_shift.safetensors"
ACTIVATION_MODES = ("per-token", "static-per-tensor")
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class CheckpointFormatError(Exception):
    """The checkpoint is not a valid QuaRot format v1 checkpoint (its quantization_config,
    or its tensors: ``vllm_quarot.validate``).

    Deliberately not a ValueError: vLLM's config classes are pydantic dataclasses, and
    pydantic turns a ValueError raised in a config hook (``from_config``,
    ``maybe_update_config``, ``override_quantization_method``) into a multi-line
    ValidationError that dumps every engine argument; any other exception reaches
    ``LLM(...)`` / ``vllm serve`` as it is, one line."""


@dataclass(frozen=True)
class WeightSpec:
    bits: int = 4
    group_size: int = -1  # -1: one scale per output channel
    symmetric: bool = True
    method: str = "rtn"  # how the codes were chosen: rtn | gptq (informational)


@dataclass(frozen=True)
class LMHeadSpec:
    """A quantized lm_head (format v5, the quantizer's --lm-head): its own weight bits
    and per-token activation bits (None: 16-bit activations), R1 fused like every
    linear; absent, the lm_head is a 16-bit ``lm_head.weight``."""

    bits: int = 8
    group_size: int = -1
    activation_bits: int | None = 8
    method: str = "rtn"  # rtn | gptq (informational)

    def check(self) -> None:
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

    @property
    def name(self) -> str:
        """w8a8, w4a16, w4a8 (the quantizer's --lm-head)."""
        return f"w{self.bits}a{self.activation_bits or 16}"


@dataclass(frozen=True)
class ActivationSpec:
    bits: int = 4
    clip_ratio: float = 1.0
    dynamic: str = "per-token"  # or "static-per-tensor" (input_scale from calibration)
    # linears (full module names, e.g. model.layers.1.mlp.down_proj) whose inputs are
    # quantized at other bits than ``bits`` (8 for the few with massive outliers: the
    # quantizer's --a8-layers); an 8-bit layer quantizes without clipping
    layer_bits: dict[str, int] = field(default_factory=dict)

    @property
    def static(self) -> bool:
        return self.dynamic == "static-per-tensor"

    def for_layer(self, name: str) -> tuple[int, float]:
        """(bits, clip ratio) of the input of the linear ``name`` (a full module name)."""
        bits = self.layer_bits.get(name, self.bits)
        return bits, (self.clip_ratio if bits == self.bits else 1.0)

    def for_merged(self, prefix: str, packed: dict[str, list[str]]) -> tuple[int, float]:
        """(bits, clip) of a vLLM layer, which may merge several checkpoint linears
        (qkv_proj = q/k/v_proj, gate_up_proj = gate/up_proj: they share one input, so
        they must share one precision)."""
        head, _, last = prefix.rpartition(".")
        names = [f"{head}.{s}" if head else s for s in packed.get(last, [last])]
        got = {self.for_layer(n) for n in names}
        if len(got) > 1:
            raise CheckpointFormatError(
                f"activation.layer_bits gives {', '.join(names)} different precisions; "
                f"they share one input in vLLM's {prefix}")
        return got.pop()


@dataclass(frozen=True)
class KVCacheSpec:
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


R1_KINDS = ("randomized-hadamard", "cayley-learned", "none")


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


@dataclass(frozen=True)
class OnlineHadamard:
    """An online rotation (R3, R4) as the quantizer built it (``hadamard.fingerprint``):
    the runtime rebuilds the matrix and refuses a checkpoint whose stored one differs."""

    size: int  # the whole dimension it rotates
    factors: tuple[int, int]  # (K, 2^k) of one block: K·2^k·blocks == size
    construction: str | None = None  # None / "": written by a version that did not store it
    sha256: str | None = None  # of the ±1 K×K factor
    blocks: int = 1  # block-diagonal I_blocks ⊗ H_{size/blocks} (tensor-parallel R4)
    # R3 only: the decoder layers whose queries and keys it rotates (None: every layer);
    # the quantizer leaves it off where it makes the 4-bit keys worse
    layers: tuple[int, ...] | None = None

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    @classmethod
    def of_size(cls, size: int, blocks: int = 1) -> OnlineHadamard:
        fp = fingerprint(size // blocks)
        return cls(size, tuple(fp["hadamard"]), fp["construction"], fp["sha256"],  # type: ignore[arg-type]
                   blocks)

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def to_dict(self) -> dict[str, Any]:
        d = {"size": self.size, "blocks": self.blocks, "hadamard": list(self.factors),
             "construction": self.construction, "sha256": self.sha256}
        if self.layers is not None:
            d["layers"] = list(self.layers)
        return d

    def check(self, name: str) -> None:
        """The Hadamard this version builds for ``size / blocks`` is the stored one."""
        k, pow2 = self.factors
        if self.blocks < 1 or k * pow2 * self.blocks != self.size:
            raise CheckpointFormatError(
                f"{name}.hadamard {list(self.factors)} × {self.blocks} blocks does not "
                f"multiply to {self.size}")
        try:
            fp = fingerprint(self.block_size)
        except HadamardSizeError as e:
            raise CheckpointFormatError(f"{name}: {e}") from e
        stored = (list(self.factors), self.construction or fp["construction"],
                  self.sha256 or fp["sha256"])
        if stored != (fp["hadamard"], fp["construction"], fp["sha256"]):
            raise CheckpointFormatError(
                f"{name}: the checkpoint's online Hadamard of order {self.block_size} "
                f"({self.construction or '?'} {list(self.factors)}, sha256 "
                f"{(self.sha256 or '?')[:12]}) is not the one this vllm-quarot builds "
                f"({fp['construction']} {fp['hadamard']}, sha256 {fp['sha256'][:12]}): its "
                "weights were rotated with another matrix. Serve it with the vllm-quarot "
                "version that made it (quantizer.version) or quantize the model again"
            )


@dataclass(frozen=True)
class RotationSpec:
    r1_seed: int = 0
    r1_kind: str = "none"  # or "randomized-hadamard"
    r1_size: int = 0
    r2_size: int = 0  # head_dim; 0: no R2
    r3: OnlineHadamard | None = None  # head_dim, on queries and keys after RoPE (KV4)
    r4: OnlineHadamard | None = None  # intermediate size, before down_proj

    @property
    def r3_size(self) -> int:
        return self.r3.size if self.r3 else 0

    @property
    def r4_size(self) -> int:
        return self.r4.size if self.r4 else 0


@dataclass(frozen=True)
class QuaRotFormat:
    scheme: str
    weight: WeightSpec
    activation: ActivationSpec | None
    kv_cache: KVCacheSpec | None
    rotation: RotationSpec
    ignore: tuple[str, ...] = ("lm_head",)
    quantizer: dict[str, Any] = field(default_factory=dict)
    # N: the checkpoint serves at tensor parallelism T for every T dividing N with the same
    # numbers: R4 is I_N ⊗ H_{n/N} and the inputs of the row-parallel linears (o_proj,
    # down_proj) are quantized per (token, block of in_features/N)
    tp_blocks: int = 1
    lm_head: LMHeadSpec | None = None  # None: a 16-bit lm_head (ignored by quantization)

    def to_dict(self) -> dict[str, Any]:
        r = self.rotation
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
            "tensor_parallel_blocks": self.tp_blocks,
            "weight": dataclasses.asdict(self.weight),
            "activation": None if self.activation is None else dataclasses.asdict(self.activation),
            "kv_cache": None if self.kv_cache is None else dataclasses.asdict(self.kv_cache),
            "rotation": {
                "r1": {"kind": r.r1_kind, "seed": r.r1_seed, "size": r.r1_size},
                "r2": {"size": r.r2_size} if r.r2_size else None,
                "r3": r.r3.to_dict() if r.r3 else None,
                "r4": r.r4.to_dict() if r.r4 else None,
            },
            "ignore": list(self.ignore),
            "lm_head": None if self.lm_head is None else dataclasses.asdict(self.lm_head),
            "quantizer": dict(self.quantizer),
        }

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> QuaRotFormat:
        """Validate a quantization_config dict; CheckpointFormatError says what is wrong."""
        if not isinstance(cfg, dict):
            raise CheckpointFormatError("quantization_config must be a JSON object")
        if cfg.get("quant_method") != QUANT_METHOD:
            raise CheckpointFormatError(
                f"not a QuaRot checkpoint: quant_method is {cfg.get('quant_method')!r}"
            )
        if cfg.get("format_version") not in READABLE_VERSIONS:
            raise CheckpointFormatError(
                f"unsupported QuaRot format_version {cfg.get('format_version')!r}; "
                f"this vllm-quarot reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            weight = WeightSpec(**_section(cfg, "weight"))
            act = cfg.get("activation")
            activation = None if act is None else ActivationSpec(**_section(cfg, "activation"))
            kv = cfg.get("kv_cache")
            kv_cache = None if kv is None else KVCacheSpec(**_section(cfg, "kv_cache"))
            rot = _section(cfg, "rotation")
            r1 = rot.get("r1") or {}
            rotation = RotationSpec(
                r1_seed=int(r1.get("seed", 0)),
                r1_kind=str(r1.get("kind", RotationSpec.r1_kind)),
                r1_size=int(r1.get("size", 0)),
                r2_size=int((rot.get("r2") or {}).get("size", 0)),
                r3=_online_hadamard(rot, "r3"),
                r4=_online_hadamard(rot, "r4"),
            )
            head = cfg.get("lm_head")
            lm_head = None if head is None else LMHeadSpec(**_section(cfg, "lm_head"))
        except CheckpointFormatError:
            raise
        except (TypeError, ValueError, KeyError) as e:  # unknown, missing or mistyped keys
            raise CheckpointFormatError(f"malformed quantization_config: {e}") from e
        # the quantizer records the scheme too (vllm-quarot >= 0.7): a deleted "scheme"
        # is still checked against the sections
        scheme = cfg.get("scheme") or (cfg.get("quantizer") or {}).get("scheme")
        if scheme is None:  # hand-written section: named after what it says
            scheme = _scheme_of(weight, activation, kv_cache) or "custom"
        fmt = cls(
            scheme=str(scheme),
            weight=weight,
            activation=activation,
            kv_cache=kv_cache,
            rotation=rotation,
            ignore=tuple(cfg.get("ignore", ("lm_head",))),
            quantizer=dict(cfg.get("quantizer") or {}),
            tp_blocks=cfg.get("tensor_parallel_blocks", 1),
            lm_head=lm_head,
        )
        fmt.validate()
        return fmt

    def validate(self) -> None:
        w, a, kv, r = self.weight, self.activation, self.kv_cache, self.rotation
        if w.bits not in (4, 8, 16):
            raise CheckpointFormatError(f"weight bits must be 4, 8 or 16, got {w.bits}")
        if not w.symmetric:
            raise CheckpointFormatError("format v1 stores symmetric weights only")
        if w.group_size != -1 and w.group_size <= 0:
            raise CheckpointFormatError(f"weight group_size must be -1 or > 0, got {w.group_size}")
        if a is not None:
            if a.bits not in (4, 8):
                raise CheckpointFormatError(f"activation bits must be 4 or 8, got {a.bits}")
            _check_clip("activation", a.clip_ratio)
            if not isinstance(a.layer_bits, dict) or any(
                    not isinstance(k, str) or v not in (4, 8) for k, v in a.layer_bits.items()):
                raise CheckpointFormatError(
                    "activation.layer_bits must map linear names to 4 or 8 bits, got "
                    f"{a.layer_bits!r}")
            if a.layer_bits and a.static:
                raise CheckpointFormatError(
                    "activation.layer_bits is for per-token activations only")
            if a.dynamic not in ACTIVATION_MODES:
                raise CheckpointFormatError(
                    f"activation quantization {a.dynamic!r} is not supported; format v1 "
                    f"supports {', '.join(ACTIVATION_MODES)}"
                )
            if w.bits == 16:
                raise CheckpointFormatError("quantized activations need quantized weights")
        if kv is not None:
            if kv.bits not in (4, 8):
                raise CheckpointFormatError(f"kv_cache bits must be 4 or 8, got {kv.bits}")
            _check_clip("kv_cache", kv.clip_ratio)
            if kv.group_size != -1 or not kv.asymmetric:
                raise CheckpointFormatError(
                    "kv_cache: the runtime stores one asymmetric group per head "
                    f"(group_size -1, asymmetric true), got group_size {kv.group_size}, "
                    f"asymmetric {str(kv.asymmetric).lower()}")
        if r.r1_kind not in R1_KINDS:
            raise CheckpointFormatError(
                f"rotation.r1.kind must be one of {', '.join(R1_KINDS)}, got {r.r1_kind!r}")
        if not isinstance(self.tp_blocks, int) or self.tp_blocks < 1:
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
        if r.r3 is not None and r.r3.layers is not None and (
                list(r.r3.layers) != sorted(set(r.r3.layers))
                or any(not isinstance(i, int) or i < 0 for i in r.r3.layers)):
            raise CheckpointFormatError(
                f"rotation.r3.layers must be increasing layer indices, got {list(r.r3.layers)}")
        if kv is not None and kv.shift and kv.bits != 4:
            raise CheckpointFormatError("kv_cache.shift is served with 4-bit caches only")
        for name, online in (("rotation.r3", r.r3), ("rotation.r4", r.r4)):
            if online is not None:
                online.check(name)
        if self.lm_head is not None:
            self.lm_head.check()
            if w.bits >= 16:
                raise CheckpointFormatError("a quantized lm_head needs a quantized scheme")
        self._check_scheme()
        self._check_rotation_record()

    def sections(self) -> SchemeSpec:
        """The scheme the weight / activation / kv_cache sections describe."""
        return _sections(self.weight, self.activation, self.kv_cache)

    def _check_scheme(self) -> None:
        """The scheme is one we know, and it names what the sections say."""
        spec = SCHEMES.get(self.scheme)
        if self.scheme == "custom" and spec is None:
            raise CheckpointFormatError(
                f"quantization_config has no scheme, and its sections "
                f"({self.sections().describe()}) match none this vllm-quarot serves: "
                f"{', '.join(SCHEMES)}")
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

        ``quantizer.rotate`` (quarot | spinquant | r1r2 | none) and ``quantizer.online_hadamard``
        (bool; absent in checkpoints of vllm-quarot <= 0.1, then only contradictions
        provable without it are refused) tell whether the down_proj weights carry R4
        and whether keys were calibrated behind R3.
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
            if rotate == "none" and r.r1_kind != "none":
                raise CheckpointFormatError(
                    f"rotation.r1.kind is {r.r1_kind!r} but quantizer.rotate is 'none'")
            return
        if rotate not in ("quarot", "spinquant"):
            return
        recorded = q.get("online_hadamard")
        # not recorded (vllm-quarot <= 0.1): R3 proves the online Hadamards were on
        online = recorded if recorded is not None else (True if r.r3 else None)
        for name, used, present, what in (
            ("rotation.r4", act or self.weight.bits < 16, r.r4 is not None,
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
        archs = list(getattr(hf_config, "architectures", None) or [])
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointFormatError(
                f"architecture {archs} is not supported by vllm-quarot; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        r = self.rotation
        hidden = hf_config.hidden_size
        head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
        checks = [
            ("rotation.r1.size", r.r1_size, hidden),
            ("rotation.r2.size", r.r2_size, head_dim),
            ("rotation.r3.size", r.r3_size, head_dim),
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
                    "config.json do not match"
                )
        n, attn = self.tp_blocks, hf_config.num_attention_heads * head_dim
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
        what = ("its online R4 Hadamard spans the whole intermediate size"
                if self.tp_blocks == 1 and self.rotation.r4 is not None else
                f"it was quantized for tensor parallelism up to {self.tp_blocks} "
                f"(tensor_parallel_blocks {self.tp_blocks})")
        raise CheckpointFormatError(
            f"--tensor-parallel-size {tp_size} cannot serve this checkpoint: {what}. "
            f"Quantize it with `vllm-quarot quantize ... --tp {tp_size}` (or a multiple "
            f"of {tp_size}), or serve it at a tensor-parallel size dividing "
            f"{self.tp_blocks}")


def _sections(weight: WeightSpec, activation: ActivationSpec | None,
              kv_cache: KVCacheSpec | None) -> SchemeSpec:
    return SchemeSpec(weight.bits, activation.bits if activation else None,
                      activation.dynamic if activation else None,
                      kv_cache.bits if kv_cache else None)


def _scheme_of(weight: WeightSpec, activation: ActivationSpec | None,
               kv_cache: KVCacheSpec | None) -> str | None:
    got = _sections(weight, activation, kv_cache)
    return next((name for name, spec in SCHEMES.items() if spec == got), None)


def _online_hadamard(rot: dict[str, Any], key: str) -> OnlineHadamard | None:
    sec = rot.get(key)
    if not sec:
        return None
    size = int(sec["size"])
    # v1 checkpoints before 0.3 stored R3 as {"size"} only (a power of two or a K·2^k
    # whose factors this version derives the same way)
    blocks = int(sec.get("blocks", 1))
    factors = sec.get("hadamard") or _factors(size // max(blocks, 1))
    layers = sec.get("layers")
    if layers is not None and not isinstance(layers, list):
        raise CheckpointFormatError(f"rotation.{key}.layers must be a list, got {layers!r}")
    return OnlineHadamard(size, (int(factors[0]), int(factors[1])),
                          sec.get("construction"), sec.get("sha256"), blocks,
                          None if layers is None else tuple(layers))


def _factors(size: int) -> list[int]:
    try:
        return list(fingerprint(size)["hadamard"])  # type: ignore[arg-type]
    except HadamardSizeError as e:
        raise CheckpointFormatError(str(e)) from e


def _check_clip(section: str, ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise CheckpointFormatError(f"{section} clip_ratio must be in (0, 1], got {ratio}")


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    sec = cfg.get(key)
    if not isinstance(sec, dict):
        raise CheckpointFormatError(f"quantization_config.{key} is missing or not an object")
    return sec
