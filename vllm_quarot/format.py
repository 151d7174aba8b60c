"""Checkpoint format v1: the ``quantization_config`` section of config.json.

Pure data and validation, shared by the quantizer (writes it), the vLLM plugin and
the simulation (read it). docs/checkpoint-format.md describes every field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class RotationSpec:
    r1_seed: int = 0
    r1_kind: str = "randomized-hadamard"
    r1_size: int = 0
    r2_size: int = 0  # head_dim; 0: no R2
    r3_size: int = 0  # head_dim; 0: no online R3
    r4_size: int = 0  # intermediate size; 0: no online R4 before down_proj
    r4_hadamard: tuple[int, int] = (1, 1)  # (K, 2^k) with K·2^k == r4_size


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
                "r3": {"size": r.r3_size} if r.r3_size else None,
                "r4": (
                    {"size": r.r4_size, "hadamard": list(r.r4_hadamard)} if r.r4_size else None
                ),
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
            r4 = rot.get("r4") or {}
            rotation = RotationSpec(
                r1_seed=int(r1.get("seed", 0)),
                r1_kind=str(r1.get("kind", "none")),
                r1_size=int(r1.get("size", 0)),
                r2_size=int((rot.get("r2") or {}).get("size", 0)),
                r3_size=int((rot.get("r3") or {}).get("size", 0)),
                r4_size=int(r4.get("size", 0)),
                r4_hadamard=tuple(r4.get("hadamard", (1, 1))),  # type: ignore[arg-type]
            )
        except TypeError as e:  # unknown or missing keys in a section
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
        if r.r4_size and r.r4_hadamard[0] * r.r4_hadamard[1] != r.r4_size:
            raise CheckpointFormatError(
                f"rotation.r4.hadamard {list(r.r4_hadamard)} does not multiply to {r.r4_size}"
            )

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


def _check_clip(section: str, ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise CheckpointFormatError(f"{section} clip_ratio must be in (0, 1], got {ratio}")


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    sec = cfg.get(key)
    if not isinstance(sec, dict):
        raise CheckpointFormatError(f"quantization_config.{key} is missing or not an object")
    return sec
