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


def r1_matrix(signs: torch.Tensor) -> torch.Tensor:
    """The dense R1 = diag(s)·M that ``rotate_rows_in(x, signs)`` applies (x·R1)."""
    return rotate_rows_in(torch.eye(signs.shape[0], dtype=torch.float64), signs)


def r2_matrix(head_dim: int) -> torch.Tensor:
    """The dense per-head R2 (the normalised Hadamard of order head_dim)."""
    return hadamard_transform(torch.eye(head_dim, dtype=torch.float64))


def rotate_rows_in(w: torch.Tensor, r1: torch.Tensor | None) -> torch.Tensor:
    """W·R1: rotate the input side of a [out, in] weight (or rows of E). r1 is either
    the ±1 diagonal s of the randomized Hadamard R1 = diag(s)·M (1-D, applied with the
    fast transform) or a dense orthogonal matrix (2-D: a learned rotation)."""
    if r1 is not None and r1.dim() == 2:
        return w @ r1.to(w.dtype)
    return hadamard_transform(w if r1 is None else w * r1)


def rotate_rows_out(w: torch.Tensor, r1: torch.Tensor | None) -> torch.Tensor:
    """R1ᵀ·W for a weight writing the residual stream (acts on its output rows)."""
    return rotate_rows_in(w.t(), r1).t().contiguous()


def _per_head(x: torch.Tensor, r2: torch.Tensor | None) -> torch.Tensor:
    """x [..., head_dim] @ R2 (the Hadamard when r2 is None, else the dense matrix)."""
    return hadamard_transform(x) if r2 is None else x @ r2.to(x.dtype)


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
    r2: bool | torch.Tensor,
    r4: bool,
    r4_blocks: int = 1,
) -> None:
    """Apply R1 (when signs is given: a ±1 diagonal or a dense matrix, see
    rotate_rows_in), R2 (True: the per-head Hadamard; a [head_dim, head_dim] tensor: that
    orthogonal matrix) and R4 to one layer's folded tensors; R4 is block-diagonal with
    r4_blocks blocks (down_proj's columns [out, N, n/N], each block rotated by the
    Hadamard of order n/N)."""
    if signs is not None:
        for name in ATTN_IN + MLP_IN:
            sd[f"{name}.weight"] = rotate_rows_in(sd[f"{name}.weight"], signs)
        for name in RESIDUAL_OUT:
            sd[f"{name}.weight"] = rotate_rows_out(sd[f"{name}.weight"], signs)
            if f"{name}.bias" in sd:
                sd[f"{name}.bias"] = rotate_rows_in(sd[f"{name}.bias"], signs)
    if r2 is not False:
        r2m = r2 if isinstance(r2, torch.Tensor) else None
        wv = sd["self_attn.v_proj.weight"]  # [n_kv*hd, hidden]: rotate each head's rows
        n_kv = wv.shape[0] // head_dim
        wv = wv.reshape(n_kv, head_dim, -1).transpose(1, 2)
        sd["self_attn.v_proj.weight"] = (
            _per_head(wv, r2m).transpose(1, 2).reshape(n_kv * head_dim, -1).contiguous()
        )
        if "self_attn.v_proj.bias" in sd:
            b = sd["self_attn.v_proj.bias"].reshape(n_kv, head_dim)
            sd["self_attn.v_proj.bias"] = _per_head(b, r2m).reshape(-1)
        wo = sd["self_attn.o_proj.weight"]  # [hidden, n_h*hd]: rotate each head's columns
        n_h = wo.shape[1] // head_dim
        sd["self_attn.o_proj.weight"] = (
            _per_head(wo.reshape(-1, n_h, head_dim), r2m).reshape(wo.shape[0], -1)
        )
    if r4:
        sd["mlp.down_proj.weight"] = block_hadamard_transform(sd["mlp.down_proj.weight"],
                                                              r4_blocks)


def fold_online_r1_signs(sd: dict[str, torch.Tensor], signs: dict[str, torch.Tensor],
                         head_dim: int) -> None:
    """--r1 online: make each online Hadamard H a randomized one D·H without a sign op at
    run time: the input of q/k/v (gate/up) is the input (post-attention) norm's output,
    so D goes into that norm's gain and, to keep the layer's function, into the columns
    of the linears reading it (D·D = I); o_proj's input is the attention output, linear
    in the values, so D goes into v_proj's output rows (and bias) and o_proj's columns
    (each query head's channels take the signs of its KV head). An exact invariance of
    the layer (``--verify``)."""
    for norm, linears in (("input_layernorm", ATTN_IN), ("post_attention_layernorm", MLP_IN)):
        d = signs[norm].to(sd[f"{norm}.weight"].dtype)
        sd[f"{norm}.weight"] = sd[f"{norm}.weight"] * d
        for name in linears:
            sd[f"{name}.weight"] = sd[f"{name}.weight"] * d
    d = signs["v_proj"].to(sd["self_attn.v_proj.weight"].dtype)
    sd["self_attn.v_proj.weight"] = sd["self_attn.v_proj.weight"] * d[:, None]
    if "self_attn.v_proj.bias" in sd:
        sd["self_attn.v_proj.bias"] = sd["self_attn.v_proj.bias"] * d
    wo = sd["self_attn.o_proj.weight"]
    groups = wo.shape[1] // d.shape[0]  # query heads per KV head
    d_o = d.reshape(-1, head_dim).repeat_interleave(groups, dim=0).reshape(-1)
    sd["self_attn.o_proj.weight"] = wo * d_o
