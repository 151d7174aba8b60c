"""The model map: every supported family's module and tensor names, in one place.

Everything else (the quantizer, the rotations, SpinQuant, the checkpoint validator, the
simulation, the vLLM runtime) works on **canonical** names, Llama's: a decoder layer
``model.layers.{i}`` holds ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm`` and ``mlp.{gate,up,down}_proj``. A family whose checkpoint
fuses projections (Phi-3: ``self_attn.qkv_proj``, ``mlp.gate_up_proj``) is mapped onto
them: its fused tensors are split into the canonical ones when read
(``Family.split``) and concatenated back when written (``Family.fuse``), and the offline
maths runs its layers as the unfused architecture that computes the same function
(``Family.canonical_config``). Adding a family is one ``Family`` entry here (plus its
tests); adding one with another layer structure (e.g. parallel attention + MLP) is not.

vLLM merges q/k/v and gate/up into ``qkv_proj`` / ``gate_up_proj`` for every family;
``SUB_BLOCKS`` names them, the linears that share their input, and the ones whose input
is split across tensor-parallel ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_quarot.errors import QuaRotError

EMBED = "model.embed_tokens"
FINAL_NORM = "model.norm"
LM_HEAD = "lm_head"
LAYERS = "model.layers"

Q_PROJ, K_PROJ, V_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
O_PROJ = "self_attn.o_proj"
GATE_PROJ, UP_PROJ, DOWN_PROJ = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
ATTN_IN = (Q_PROJ, K_PROJ, V_PROJ)
MLP_IN = (GATE_PROJ, UP_PROJ)
RESIDUAL_OUT = (O_PROJ, DOWN_PROJ)  # write the residual stream (R1ᵀ on their outputs)
LINEARS = (Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ)
INPUT_NORM, POST_NORM = "input_layernorm", "post_attention_layernorm"
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # Qwen3: per-head RMSNorm before RoPE


def layer_prefix(i: int) -> str:
    """``model.layers.{i}.``"""
    return f"{LAYERS}.{i}."


def layer_index(name: str) -> int | None:
    """The decoder layer a module/tensor name belongs to (None: not in a layer)."""
    parts = name.split(".")
    for j in range(len(parts) - 1):
        if parts[j] == "layers" and parts[j + 1].isdigit():
            return int(parts[j + 1])
    return None


@dataclass(frozen=True)
class SubBlock:
    """The linears of a decoder layer that read one input: quantized together by GPTQ's
    sequential pass (one Hessian), merged into one layer by vLLM (so they share their
    activation precision), and, for the row-parallel ones, split by input across
    tensor-parallel ranks."""

    name: str
    linears: tuple[str, ...]  # canonical, in vLLM's merge order
    vllm: str  # vLLM's (merged) module name inside the layer
    norm: str | None  # the RMSNorm whose gain is folded into these linears
    row_parallel: bool  # input split across TP ranks (o_proj, down_proj)


SUB_BLOCKS = (
    SubBlock("qkv", ATTN_IN, "self_attn.qkv_proj", INPUT_NORM, False),
    SubBlock("o", (O_PROJ,), O_PROJ, None, True),
    SubBlock("gate_up", MLP_IN, "mlp.gate_up_proj", POST_NORM, False),
    SubBlock("down", (DOWN_PROJ,), DOWN_PROJ, None, True),
)
ROW_PARALLEL = tuple(lin for b in SUB_BLOCKS if b.row_parallel for lin in b.linears)


def sub_block(name: str) -> SubBlock:
    """The sub-block of a linear, given by its canonical, fused (checkpoint) or vLLM name,
    with or without its layer prefix."""
    stem = name.split(".", 3)[-1] if layer_index(name) is not None else name
    for b in SUB_BLOCKS:
        if stem == b.vllm or stem in b.linears:
            return b
    for fam in FAMILIES:
        parts = fam.fused.get(stem)
        if parts:
            return sub_block(parts[0])
    raise KeyError(f"{name} is not a decoder-layer linear")


def canonical_parts(name: str) -> list[str]:
    """The canonical linears a module computes, with the module's layer prefix: a
    canonical name itself, or the parts of a fused / vLLM-merged module
    (``model.layers.3.self_attn.qkv_proj`` → its q, k and v)."""
    i = layer_index(name)
    if i is None:
        return [name]
    prefix = layer_prefix(i)
    stem = name[len(prefix):] if name.startswith(prefix) else name.split(".", 3)[-1]
    if stem in LINEARS:
        return [prefix + stem]
    b = sub_block(stem)
    return [prefix + lin for lin in b.linears]


def linear_sizes(cfg: Any) -> dict[str, tuple[int, int]]:
    """Canonical linear -> (out_features, in_features) of one decoder layer."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = head_dim(cfg)
    return {Q_PROJ: (heads * hd, hidden), K_PROJ: (kv * hd, hidden),
            V_PROJ: (kv * hd, hidden), O_PROJ: (hidden, heads * hd),
            GATE_PROJ: (inter, hidden), UP_PROJ: (inter, hidden), DOWN_PROJ: (hidden, inter)}


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _attention_biases(cfg: Any) -> set[str]:
    """Llama / Mistral / Qwen3: attention_bias (q/k/v/o), mlp_bias (gate/up/down)."""
    attn = bool(getattr(cfg, "attention_bias", False) or getattr(cfg, "bias", False))
    mlp = bool(getattr(cfg, "mlp_bias", False))
    return (({Q_PROJ, K_PROJ, V_PROJ, O_PROJ} if attn else set())
            | ({GATE_PROJ, UP_PROJ, DOWN_PROJ} if mlp else set()))


@dataclass(frozen=True)
class Family:
    """One model family: its Hugging Face architecture, which checkpoint linears fuse
    several canonical ones, which carry biases, and the unfused architecture its
    layers are computed as offline."""

    name: str
    architecture: str  # config.json "architectures"
    model_type: str
    # checkpoint linear -> the canonical linears it concatenates along its output rows
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    biases: Callable[[Any], set[str]] = _attention_biases
    qk_norm: bool = False  # per-head q/k RMSNorm before RoPE (SmoothAttention cannot apply)
    # fused families: the architecture whose layers compute the same function on the
    # split tensors (the offline maths and SpinQuant run it)
    canonical: str | None = None

    def checkpoint_linears(self) -> list[tuple[str, tuple[str, ...]]]:
        """(name in the checkpoint, canonical linears it holds), in layer order."""
        out: list[tuple[str, tuple[str, ...]]] = []
        seen: set[str] = set()
        for lin in LINEARS:
            if lin in seen:
                continue
            fused = next(((f, parts) for f, parts in self.fused.items() if lin in parts), None)
            name, parts = fused if fused else (lin, (lin,))
            out.append((name, parts))
            seen.update(parts)
        return out

    def split(self, sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
        """A layer's tensors (names relative to the layer) with fused linears split into
        canonical ones (weights and biases along their output rows)."""
        if not self.fused:
            return sd
        sizes = linear_sizes(cfg)
        out = {}
        for k, t in sd.items():
            stem, _, leaf = k.rpartition(".")
            parts = self.fused.get(stem)
            if parts is None:
                out[k] = t
                continue
            rows = [sizes[p][0] for p in parts]
            if t.shape[0] != sum(rows):
                raise QuaRotError(f"{k} has {t.shape[0]} rows; {'+'.join(parts)} need "
                                  f"{sum(rows)}")
            for p, piece in zip(parts, t.split(rows, dim=0), strict=True):
                out[f"{p}.{leaf}"] = piece.contiguous()
        return out

    def fuse(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors named canonically (full names) with the parts of each
        fused linear concatenated along their output rows (codes, scales, biases,
        16-bit weights) or, for a static input scale (one per input, shared by the
        parts), kept once."""
        if not self.fused:
            return tensors
        out = dict(tensors)
        for i in sorted({layer_index(k) for k in tensors} - {None}):
            p = layer_prefix(i)
            for fused, parts in self.fused.items():
                leaves = {k[len(p + parts[0]) + 1:] for k in tensors
                          if k.startswith(p + parts[0] + ".")}
                for leaf in leaves:
                    pieces = [out.pop(f"{p}{part}.{leaf}") for part in parts]
                    if leaf == "input_scale":
                        out[f"{p}{fused}.{leaf}"] = torch.stack(pieces).amax(0)
                    else:
                        out[f"{p}{fused}.{leaf}"] = torch.cat(pieces, dim=0)
        return out

    def canonical_config(self, cfg: Any) -> Any:
        """The config of the architecture that computes this family's layers on the
        canonical (split) tensors: the config itself for unfused families."""
        if self.canonical is None:
            return cfg
        from transformers import AutoConfig

        fields = dict(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None)
            or cfg.num_attention_heads,
            head_dim=head_dim(cfg), hidden_act=cfg.hidden_act,
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.rms_norm_eps, sliding_window=getattr(cfg, "sliding_window", None),
            tie_word_embeddings=getattr(cfg, "tie_word_embeddings", False),
            attention_dropout=0.0,
        )
        canon = AutoConfig.for_model(self.canonical, architectures=[f"{self.canonical.title()}"
                                                                   "ForCausalLM"], **fields)
        canon.rope_parameters = copy.deepcopy(getattr(cfg, "rope_parameters", None))
        canon._attn_implementation = getattr(cfg, "_attn_implementation", None) or "sdpa"
        return canon

    def check(self, cfg: Any) -> None:
        """Refuse the configurations of this family that the map does not describe."""
        if self.canonical is not None:
            partial = getattr(cfg, "partial_rotary_factor", None)
            rope = getattr(cfg, "rope_parameters", None) or {}
            partial = rope.get("partial_rotary_factor", partial) if isinstance(rope, dict) \
                else partial
            if partial not in (None, 1, 1.0):
                raise QuaRotError(
                    f"{self.architecture} with partial_rotary_factor {partial} is not "
                    "supported (its attention is not the canonical one)")


def _qwen2_biases(cfg: Any) -> set[str]:
    return set(ATTN_IN)


FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaForCausalLM", "llama"),
    Family("mistral", "MistralForCausalLM", "mistral"),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", biases=_qwen2_biases),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", qk_norm=True),
    Family("phi3", "Phi3ForCausalLM", "phi3",
           fused={"self_attn.qkv_proj": ATTN_IN, "mlp.gate_up_proj": MLP_IN},
           biases=lambda cfg: set(), canonical="mistral"),
)
SUPPORTED_ARCHITECTURES = tuple(f.architecture for f in FAMILIES)


class UnsupportedModelError(QuaRotError):
    """The model's architecture is not in the model map."""


def family_of(cfg: Any) -> Family:
    """The family of a Hugging Face config (by its architectures), checked."""
    archs = list(getattr(cfg, "architectures", None) or [])
    for fam in FAMILIES:
        if fam.architecture in archs:
            fam.check(cfg)
            return fam
    raise UnsupportedModelError(
        f"architecture {archs or getattr(cfg, 'model_type', '?')!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def biases(cfg: Any) -> dict[str, bool]:
    """Canonical linear -> whether it carries a bias, as the model classes decide."""
    have = family_of(cfg).biases(cfg)
    return {lin: lin in have for lin in LINEARS}
