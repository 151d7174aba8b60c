"""--verify: the original and the rotated full-precision models run side by side,
layer by layer in float64, on a short text; hidden states and logits must agree.

The original runs the family's own layer class on the checkpoint's own tensors; the
rotated one the canonical class on the split, folded and rotated tensors (what the
quantizer quantizes): agreement proves the split (fused families), the norm folding and
every rotation at once."""

from __future__ import annotations

from typing import Any

import torch

from vllm_quarot.offline.layer_runner import LayerRunner, RMSNorm64
from vllm_quarot.offline.options import QuantizeError
from vllm_quarot.offline.rotation import rotate_rows_in


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class Verifier:
    TOL = 1e-8
    TEXT = "The quick brown fox jumps over the lazy dog. " * 4

    def __init__(self, tok: Any, embed: torch.Tensor, embed_rot: torch.Tensor,
                 r1: torch.Tensor | None):
        ids = tok(self.TEXT, return_tensors="pt").input_ids[:, :32]
        self.h_orig, self.h_rot = embed[ids], embed_rot[ids]
        self.r1 = r1
        self.max_err = 0.0

    @classmethod
    def restored(cls, h_orig: torch.Tensor, h_rot: torch.Tensor, r1: torch.Tensor | None,
                 max_err: float) -> Verifier:
        """The verifier of a resumed run, from the state its last finished part saved."""
        v = cls.__new__(cls)
        v.h_orig, v.h_rot, v.r1, v.max_err = h_orig, h_rot, r1, max_err
        return v

    def original_layer(self, runner: LayerRunner) -> None:
        self.h_orig = runner(self.h_orig)

    def rotated_layer(self, runner: LayerRunner) -> None:
        self.h_rot = runner(self.h_rot)
        ref = rotate_rows_in(self.h_orig, self.r1) if self.r1 is not None else self.h_orig
        self.max_err = max(self.max_err, rel_err(self.h_rot, ref))

    def finish(self, eps: float, g_final: torch.Tensor, head: torch.Tensor,
               head_rot: torch.Tensor, g_kept: torch.Tensor) -> float:
        """Compare the logits (final norm + head; g_kept: the rotated model's final
        gain, ones where it folded into head_rot); raise above TOL; the max error."""
        norm = RMSNorm64(g_final.shape[0], eps)
        with torch.no_grad():
            norm.weight.copy_(g_final)
            logits_orig = norm(self.h_orig) @ head.t()
            norm.weight.copy_(g_kept)
            logits_rot = norm(self.h_rot) @ head_rot.t()
        self.max_err = max(self.max_err, rel_err(logits_rot, logits_orig))
        if self.max_err > self.TOL:
            raise QuantizeError(
                f"--verify failed: the rotated full-precision model differs from the "
                f"original by a relative error of {self.max_err:.3e} (> {self.TOL:g})")
        return self.max_err
