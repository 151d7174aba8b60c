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
FORMAT_VERSION = 1
ACTIVATION_MODES = ("per-token", "static-per-tensor")
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class CheckpointFormatError(ValueError):
    """The checkpoint's quantization_config is not a valid QuaRot format v1 section."""


@dataclass(frozen=True)
class WeightSpec:
    bits: int = 4
    group_size: int = -1  # -1: one scale per output channel
    symmetric: bool = True
    method: str = "rtn"  # how the codes were chosen: rtn | gptq (informational)


@dataclass(frozen=True)
class ActivationSpec:
    bits: int = 4
    clip_ratio: float = 1.0
    dynamic: str = "per-token"  # or "static-per-tensor" (input_scale from calibration)

    @property
    def static(self) -> bool:
        return self.dynamic == "static-per-tensor"


@dataclass(frozen=True)
class KVCacheSpec:
    bits: int = 4
    group_size: int = -1  # -1: one group per head (head_dim)
    asymmetric: bool = True
    clip_ratio: float = 1.0


R1_KINDS = ("randomized-hadamard", "none")


@dataclass(frozen=True)
class OnlineHadamard:
    """An online rotation (R3, R4) as the quantizer built it (``hadamard.fingerprint``):
    the runtime rebuilds the matrix and refuses a checkpoint whose stored one differs."""

    size: int
    factors: tuple[int, int]  # (K, 2^k), K·2^k == size
    construction: str | None = None  # None / "": written by a version that did not store it
    sha256: str | None = None  # of the ±1 K×K factor

    @classmethod
    def of_size(cls, size: int) -> OnlineHadamard:
        fp = fingerprint(size)
        return cls(size, tuple(fp["hadamard"]), fp["construction"], fp["sha256"])  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "hadamard": list(self.factors),
                "construction": self.construction, "sha256": self.sha256}

    def check(self, name: str) -> None:
        """The Hadamard this version builds for ``size`` is the stored one."""
        k, pow2 = self.factors
        if k * pow2 != self.size:
            raise CheckpointFormatError(
                f"{name}.hadamard {list(self.factors)} does not multiply to {self.size}")
        try:
            fp = fingerprint(self.size)
        except HadamardSizeError as e:
            raise CheckpointFormatError(f"{name}: {e}") from e
        stored = (list(self.factors), self.construction or fp["construction"],
                  self.sha256 or fp["sha256"])
        if stored != (fp["hadamard"], fp["construction"], fp["sha256"]):
            raise CheckpointFormatError(
                f"{name}: the checkpoint's online Hadamard of order {self.size} "
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

    def to_dict(self) -> dict[str, Any]:
        r = self.rotation
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
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
        if cfg.get("format_version") != FORMAT_VERSION:
            raise CheckpointFormatError(
                f"unsupported QuaRot format_version {cfg.get('format_version')!r}; "
                f"this vllm-quarot reads version {FORMAT_VERSION}"
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
        except CheckpointFormatError:
            raise
        except (TypeError, ValueError, KeyError) as e:  # unknown, missing or mistyped keys
            raise CheckpointFormatError(f"malformed quantization_config: {e}") from e
        fmt = cls(
            scheme=str(cfg.get("scheme", "custom")),
            weight=weight,
            activation=activation,
            kv_cache=kv_cache,
            rotation=rotation,
            ignore=tuple(cfg.get("ignore", ("lm_head",))),
            quantizer=dict(cfg.get("quantizer") or {}),
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
        for name, online in (("rotation.r3", r.r3), ("rotation.r4", r.r4)):
            if online is not None:
                online.check(name)

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
        for name, got, want in checks:
            if got and got != want:
                raise CheckpointFormatError(
                    f"{name} is {got} but the model has size {want}: checkpoint and "
                    "config.json do not match"
                )


def _online_hadamard(rot: dict[str, Any], key: str) -> OnlineHadamard | None:
    sec = rot.get(key)
    if not sec:
        return None
    size = int(sec["size"])
    # v1 checkpoints before 0.3 stored R3 as {"size"} only (a power of two or a K·2^k
    # whose factors this version derives the same way)
    factors = sec.get("hadamard") or _factors(size)
    return OnlineHadamard(size, (int(factors[0]), int(factors[1])),
                          sec.get("construction"), sec.get("sha256"))


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
