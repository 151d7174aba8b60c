"""Offline QuaRot rotations on one decoder layer's tensors (float64, in place).

Conventions (weights are [out, in], activations are row vectors):
- R1 = diag(s)·M with M the normalised Hadamard of size hidden; the residual stream
  becomes x·R1. Linears reading it get W·R1, linears writing it get R1ᵀ·W.
- R2 = per-head Hadamard of size head_dim on v_proj's output rows and o_proj's input
  columns (GQA: each KV head's block and each attention head's block).
- R4 = Hadamard of size intermediate folded into down_proj's input; the runtime applies
  the same transform online to down_proj's input. For a tensor-parallel checkpoint
  (--tp N) R4 is block-diagonal, I_N ⊗ H_{intermediate/N}: one block per rank's slice.
RMSNorm gains are folded into the following linears first (RMSNorm with unit gain
commutes with any orthogonal R1), so norms are stored as ones.
"""

from __future__ import annotations

import torch

from vllm_quarot.hadamard import block_hadamard_transform, hadamard_transform

ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
RESIDUAL_OUT = ("self_attn.o_proj", "mlp.down_proj")
LINEARS = ATTN_IN + ("self_attn.o_proj",) + MLP_IN + ("mlp.down_proj",)


def rotate_rows_in(w: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """W·diag(s)·M: rotate the input side of a [out, in] weight (or rows of E)."""
    return hadamard_transform(w if signs is None else w * signs)


def rotate_rows_out(w: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """Rᵀ·W for a weight writing the residual stream (acts on its output rows)."""
    return rotate_rows_in(w.t(), signs).t().contiguous()


def fold_norms(sd: dict[str, torch.Tensor]) -> None:
    """Fold input_layernorm into q/k/v and post_attention_layernorm into gate/up."""
    for norm, linears in (("input_layernorm", ATTN_IN), ("post_attention_layernorm", MLP_IN)):
        g = sd[f"{norm}.weight"]
        for name in linears:
            sd[f"{name}.weight"] = sd[f"{name}.weight"] * g
        sd[f"{norm}.weight"] = torch.ones_like(g)


def rotate_layer(
    sd: dict[str, torch.Tensor],
    signs: torch.Tensor | None,
    head_dim: int,
    r2: bool,
    r4: bool,
    r4_blocks: int = 1,
) -> None:
    """Apply R1 (when signs is given), R2 and R4 to one layer's folded tensors; R4 is
    block-diagonal with r4_blocks blocks (down_proj's columns [out, N, n/N], each block
    rotated by the Hadamard of order n/N)."""
    if signs is not None:
        for name in ATTN_IN + MLP_IN:
            sd[f"{name}.weight"] = rotate_rows_in(sd[f"{name}.weight"], signs)
        for name in RESIDUAL_OUT:
            sd[f"{name}.weight"] = rotate_rows_out(sd[f"{name}.weight"], signs)
            if f"{name}.bias" in sd:
                sd[f"{name}.bias"] = rotate_rows_in(sd[f"{name}.bias"], signs)
    if r2:
        wv = sd["self_attn.v_proj.weight"]  # [n_kv*hd, hidden]: rotate each head's rows
        n_kv = wv.shape[0] // head_dim
        wv = wv.reshape(n_kv, head_dim, -1).transpose(1, 2)
        sd["self_attn.v_proj.weight"] = (
            hadamard_transform(wv).transpose(1, 2).reshape(n_kv * head_dim, -1).contiguous()
        )
        if "self_attn.v_proj.bias" in sd:
            b = sd["self_attn.v_proj.bias"].reshape(n_kv, head_dim)
            sd["self_attn.v_proj.bias"] = hadamard_transform(b).reshape(-1)
        wo = sd["self_attn.o_proj.weight"]  # [hidden, n_h*hd]: rotate each head's columns
        n_h = wo.shape[1] // head_dim
        sd["self_attn.o_proj.weight"] = (
            hadamard_transform(wo.reshape(-1, n_h, head_dim)).reshape(wo.shape[0], -1)
        )
    if r4:
        sd["mlp.down_proj.weight"] = block_hadamard_transform(sd["mlp.down_proj.weight"],
                                                              r4_blocks)
