"""Per-layer choice of how keys and values enter the 4-bit KV cache.

Models of the Qwen2 class add large biases in k_proj: a few key channels (the slowest
RoPE pairs) carry values of tens to hundreds on every token, where the content is ~1.
Quantized per token and head, those channels set the 4-bit range and the content is
rounded away; R3 (a Hadamard over head_dim) then spreads them over every channel, which
can make it worse. Three exact transformations are tried on each layer, on the
calibration set, and the combination with the least attention-output error is kept:

- **shift** (``vllm_quarot.kv_shift``): keys minus a constant vector per KV head (their
  calibration mean after RoPE). softmax(q·(k − c)) = softmax(q·k): nothing is added
  back. Values minus their mean, added back to the attention output.
- **SmoothAttention** (QServe): keys scaled by 1/λ and queries by λ per channel, λ =
  (max |k| over the calibration tokens)^α, the two channels of a RoPE pair sharing one
  λ so that the scaling commutes with RoPE; fused offline into q_proj/k_proj rows and
  biases (not for q/k-norm models, Qwen3, whose norms would undo it).
- **R3** on or off for the layer (``rotation.r3.layers``).

Keys are judged with exact values and values with exact keys (either error would
drown the other's differences). QuaRot's choice (R3, nothing else) stays unless
another candidate cuts the error by MARGIN; the candidates include "none of them"
(plain per-token-head KV4).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F

from vllm_quarot.hadamard import hadamard_transform
from vllm_quarot.transforms import kv_fake_quant

SMOOTH_ALPHAS = (0.0, 0.5)  # 0: no smoothing; QServe's α = 0.5
MAX_WINDOWS = 8  # calibration windows used per layer
MAX_TOKENS = 512  # tokens per window
# another choice replaces QuaRot's only when it cuts the attention error by this much
# (smaller differences are calibration noise, and were seen to lose end to end)
MARGIN = 0.1


@dataclass(frozen=True)
class KVChoice:
    """What the quantizer chose for one layer, and the attention errors it measured."""

    r3: bool
    alpha: float  # SmoothAttention exponent (0: none)
    k_shift: bool
    v_shift: bool
    error: float  # relative attention-output error of the choice (K and V quantized)
    plain_error: float  # the same without any of the three (plain KV4, no R3)
    r3_error: float | None  # R3 alone (QuaRot's KV4); None without R3

    def summary(self) -> dict[str, float | bool]:
        return {"r3": self.r3, "smooth_alpha": self.alpha, "k_shift": self.k_shift,
                "v_shift": self.v_shift, "error": round(self.error, 5),
                "plain_error": round(self.plain_error, 5),
                "r3_error": None if self.r3_error is None else round(self.r3_error, 5)}


@dataclass
class KVCalibration:
    choice: KVChoice
    smooth: torch.Tensor | None  # λ per key channel [kv_heads, D] (None: α = 0)
    k_shift: torch.Tensor  # [kv_heads, D], zeros when not shifted
    v_shift: torch.Tensor


def pair_max(k: torch.Tensor) -> torch.Tensor:
    """max over tokens of each RoPE pair's norm √(k_i² + k_{i+D/2}²), per KV head and
    channel (both channels of a pair get their pair's value): [kv_heads, D]. RoPE
    rotates within a pair, so this is the same before and after it."""
    d = k.shape[-1]
    norms = (k[..., : d // 2].pow(2) + k[..., d // 2:].pow(2)).sqrt()  # [B, Hkv, T, D/2]
    m = norms.amax(dim=(0, 2))
    return torch.cat([m, m], dim=-1)


def smoothing_scales(k: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothAttention's λ = pair_max^α (≥ a floor, so that no channel is blown up)."""
    return pair_max(k).clamp(min=1e-2).pow(alpha)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over k, v [B, Hkv, T, D] (GQA by repetition)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def calibrate_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int,
                    clip: float, r3_allowed: bool, smooth_allowed: bool) -> KVCalibration:
    """Choose R3 / SmoothAttention / shift for one layer from its post-RoPE queries,
    keys and values (float32, [B, H or Hkv, T, D]) by the relative error of the
    attention output with 4-bit keys and values, against full precision."""
    q, k, v = q.float(), k.float(), v.float()
    ref = attention(q, k, v)
    fq = lambda x: kv_fake_quant(x, bits, clip)  # noqa: E731
    zeros = torch.zeros(k.shape[1], k.shape[-1], device=k.device)

    # values: shifted or not, judged with exact keys
    v_mean = v.mean(dim=(0, 2))
    v_err = {s: _rel(attention(q, k, fq(v - c[:, None]) + c[:, None]), ref)
             for s, c in ((False, zeros), (True, v_mean))}
    v_shift = v_err[True] < (1 - MARGIN) * v_err[False]
    vq = fq(v - v_mean[:, None]) + v_mean[:, None] if v_shift else fq(v)

    # keys: every combination, judged with exact values (the value error would drown
    # the differences); QuaRot's choice (R3 alone, or nothing without online
    # rotations) stays unless another is better by MARGIN
    errors: dict[tuple[float, bool, bool], float] = {}
    alphas = SMOOTH_ALPHAS if smooth_allowed else (0.0,)
    for cand in product(alphas, (False, True), (False, True) if r3_allowed else (False,)):
        qs, kr, _lam, _c = _candidate(q, k, *cand)
        errors[cand] = _rel(attention(qs, fq(kr), v), ref)
    default = (0.0, False, r3_allowed)
    best = min(errors, key=lambda c: errors[c])
    if errors[best] > (1 - MARGIN) * errors[default]:
        best = default
    alpha, shift, r3 = best
    qs, kr, lam, c = _candidate(q, k, alpha, shift, r3)
    choice = KVChoice(r3=r3, alpha=alpha, k_shift=shift, v_shift=v_shift,
                      error=_rel(attention(qs, fq(kr), vq), ref),
                      plain_error=_plain_error(q, k, v, ref, fq),
                      r3_error=_r3_error(q, k, v, ref, fq) if r3_allowed else None)
    return KVCalibration(choice, lam, c, v_mean if v_shift else zeros)


def _candidate(q: torch.Tensor, k: torch.Tensor, alpha: float, shift: bool, r3: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(queries, keys as they enter the 4-bit cache, λ or None, key shift [Hkv, D]) of
    one candidate: SmoothAttention with exponent alpha (none at 0), minus the keys'
    mean when shift, then R3 on both when r3."""
    lam = smoothing_scales(k, alpha) if alpha else None
    ks, qs = k, q
    if lam is not None:
        group = q.shape[1] // k.shape[1]
        ks, qs = k / lam[:, None], q * lam.repeat_interleave(group, dim=0)[:, None]
    c = ks.mean(dim=(0, 2)) if shift else torch.zeros(k.shape[1], k.shape[-1],
                                                       device=k.device)
    kr = ks - c[:, None]
    if r3:
        kr, qs = hadamard_transform(kr), hadamard_transform(qs)
    return qs, kr, lam, c


def _plain_error(q, k, v, ref, fq) -> float:
    return _rel(attention(q, fq(k), fq(v)), ref)


def _r3_error(q, k, v, ref, fq) -> float:
    return _rel(attention(hadamard_transform(q), fq(hadamard_transform(k)), fq(v)), ref)


def apply_smoothing(sd: dict[str, torch.Tensor], lam: torch.Tensor, heads: int) -> None:
    """Fuse λ into a layer's state dict: k_proj rows (and bias) divided by λ, q_proj rows
    of every query head reading that KV head multiplied by it. Scores are unchanged
    (RoPE pairs share λ); per-row weight quantization is unaffected."""
    kv_heads, d = lam.shape
    lam_k = lam.reshape(-1).to(sd["self_attn.k_proj.weight"].dtype)
    lam_q = lam.repeat_interleave(heads // kv_heads, dim=0).reshape(-1).to(lam_k.dtype)
    for proj, scale in (("k_proj", 1.0 / lam_k), ("q_proj", lam_q)):
        sd[f"self_attn.{proj}.weight"] = sd[f"self_attn.{proj}.weight"] * scale[:, None]
        if f"self_attn.{proj}.bias" in sd:
            sd[f"self_attn.{proj}.bias"] = sd[f"self_attn.{proj}.bias"] * scale


@torch.no_grad()
def layer_qkv(layer: torch.nn.Module, h: torch.Tensor, position_embeddings
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE queries, keys and values [B, H or Hkv, T, D] of a transformers
    decoder layer (Llama, Mistral, Qwen2, Qwen3) for hidden states h [B, T, hidden]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, t, _ = x.shape
    d = attn.head_dim

    def heads(proj: torch.nn.Module, norm: str) -> torch.Tensor:
        y = proj(x).view(b, t, -1, d)
        if hasattr(attn, norm):  # Qwen3's per-head q/k RMSNorm, before RoPE
            y = getattr(attn, norm)(y)
        return y.transpose(1, 2)

    q, k = heads(attn.q_proj, "q_norm"), heads(attn.k_proj, "k_norm")
    v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v
