"""GPTQ (Frantar et al., 2022) for one linear layer, in float64 on any device (the
Hessian is accumulated in float64 from float32 or float64 activations).

Scales are fixed up front (per channel, or per group from the original weights:
"static groups"), so act-order only changes the order in which columns are rounded.
"""

from __future__ import annotations

import torch

from vllm_quarot.quant import qmax, quantize_weight_rtn


class HessianAccumulator:
    """Running H = 2/n · Σ xᵀx (and max |x|) over the calibration tokens seen at a
    layer's input."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0
        self.amax = 0.0  # max |x|: the per-tensor static activation scale's calibration
        self.act_error: float | None = None  # set by the quantizer's capture when asked

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs. A float32 batch's xᵀx is computed in float32 (one
        batch: ≤ a few thousand tokens) and accumulated in float64; float64 stays float64."""
        x = x.reshape(-1, x.shape[-1])
        if x.dtype != torch.float32:
            x = x.double()
        self.amax = max(self.amax, x.abs().max().item())
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        self.h.add_((x.t() @ x).double(), alpha=2.0 / self.n)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int = -1,
    clip_search: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    dynamic_groups: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (int8 codes [N, K], float32 scales [N, G]) minimising ‖(W - Ŵ)X‖, on
    h's device (w is moved there). Group scales come from the original weights (static
    groups), or, with dynamic_groups (GPTQ's original recipe; natural column order only),
    from each group's weights as the error propagation has updated them when the loop
    reaches its first column."""
    # detached: a Hessian built through a module with parameters (the lm_head's RMSNorm)
    # must not make the error propagation track gradients
    w = w.detach().to(h.device, torch.float64, copy=True)
    h = h.detach().double().clone()
    n_out, k = w.shape
    _, scale = quantize_weight_rtn(w, bits, group_size, clip_search)
    scale = scale.double()
    gs = k if group_size == -1 else group_size
    dynamic = dynamic_groups and group_size != -1
    if dynamic and (act_order or block_size % gs):
        raise ValueError("dynamic groups need the natural column order and groups that "
                         f"divide the block size {block_size}")
    col_scale = scale.repeat_interleave(gs, dim=1)  # [N, K]: each column's scale

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = (torch.argsort(torch.diag(h), descending=True, stable=True) if act_order
            else torch.arange(k, device=h.device))
    w, h, col_scale = w[:, perm], h[perm][:, perm], col_scale[:, perm]

    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros_like(w)
    lo, hi = -qmax(bits) - 1, qmax(bits)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if dynamic and (i1 + i) % gs == 0:  # this group's scale from its updated weights
                _, sg = quantize_weight_rtn(w1[:, i:i + gs], bits, -1, clip_search)
                scale[:, (i1 + i) // gs] = sg[:, 0].double()
                col_scale[:, i1 + i:i1 + i + gs] = sg.double()
            col = w1[:, i]
            s = col_scale[:, i1 + i]
            qi = torch.clamp(torch.round(col / s), lo, hi)
            q[:, i1 + i] = qi
            e = (col - qi * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    return q[:, inv].to(torch.int8), scale.float()
