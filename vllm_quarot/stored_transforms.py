"""The matrices of ``rotation.input_transforms`` (an imported compressed-tensors
checkpoint's online transforms), in TRANSFORMS_FILE beside the weights: written by
``vllm-quarot import``, read (and checked against the format's sha256) by the vLLM
plugin and the simulation."""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from vllm_quarot.format import TRANSFORMS_FILE, CheckpointFormatError, QuaRotFormat


def matrix_sha256(m: torch.Tensor) -> str:
    return hashlib.sha256(m.detach().to(torch.float32).contiguous().numpy().tobytes()
                          ).hexdigest()


@functools.lru_cache(maxsize=64)
def is_plain_hadamard(sha256: str, n: int) -> bool:
    """The stored matrix (by its sha256) is exactly this version's ±1 Hadamard of order
    n (``hadamard.hadamard_matrix``, what ``quantize --r1 online`` stores): the runtime
    then applies it as it applies R4 (fused into the 4-bit kernels' quantizer)."""
    from vllm_quarot.hadamard import hadamard_matrix

    try:
        return matrix_sha256(hadamard_matrix(n, torch.float32, normalized=False)) == sha256
    except Exception:  # no Hadamard of this order in this version: not ours
        return False


def write_transforms(out_dir: Path, matrices: dict[str, torch.Tensor]) -> None:
    path = out_dir / TRANSFORMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    from vllm_quarot.offline.checkpoint import save_tensors

    save_tensors({k: v.to(torch.float32).contiguous() for k, v in matrices.items()}, path)


def read_transforms(model_dir: str | Path, fmt: QuaRotFormat) -> dict[str, torch.Tensor]:
    """Transform name -> normalised float32 matrix M / √n; a missing, damaged or
    substituted matrix is a CheckpointFormatError (one line)."""
    specs = fmt.rotation.input_transforms
    if not specs:
        return {}
    path = Path(model_dir) / TRANSFORMS_FILE
    if not path.is_file():
        raise CheckpointFormatError(
            f"{model_dir}: rotation.input_transforms is set but {TRANSFORMS_FILE} is "
            "missing (copy the whole checkpoint directory, or import it again)")
    try:
        tensors = load_file(path)
    except Exception as e:  # a damaged file: safetensors' own message, on one line
        raise CheckpointFormatError(f"{path}: unreadable ({e})") from e
    out = {}
    for t in specs:
        m = tensors.get(t.name)
        if m is None or tuple(m.shape) != (t.size, t.size):
            raise CheckpointFormatError(
                f"{path}: transform {t.name!r} is missing or not {t.size}×{t.size}")
        if matrix_sha256(m) != t.sha256:
            raise CheckpointFormatError(
                f"{path}: transform {t.name!r} is not the matrix the weights were made "
                f"with (sha256 {matrix_sha256(m)[:12]}, the format says {t.sha256[:12]})")
        out[t.name] = m.float() / math.sqrt(t.size)
    return out


def apply_matrix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(m, ..., m) (m: a normalised matrix from read_transforms), computed
    in float32 (float64 for a float64 x), returned in x's dtype."""
    n, dtype = m.shape[0], x.dtype
    xf = x if dtype == torch.float64 else x.float()
    y = (xf.reshape(*x.shape[:-1], x.shape[-1] // n, n) @ m.to(xf.device, xf.dtype))
    return y.reshape(x.shape).to(dtype)


def factor_hadamard(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(d, A) with M ∝ diag(d) · (A ⊗ H_P), H_P the Sylvester Hadamard of the largest
    power of two P that fits, for a (scaled) ±1 M — as compressed-tensors builds
    its random Hadamards (signs times Sloane's K×K matrix ⊗ a Walsh–Hadamard) — so that
    x @ M / √n = hadamard_transform(x ⊙ d, A): O(n·(K + log P)) instead of n² (P = 1, K = n
    for a matrix of no such form); None when M is not ±1 (it is applied densely)."""
    from vllm_quarot.hadamard import _sylvester

    n = m.shape[0]
    md = m.double() / m[0, 0].abs().double()  # ±1 entries, whatever the normalisation
    if not torch.allclose(md.abs(), torch.ones_like(md), rtol=0, atol=1e-5):
        return None
    md = md.sign()
    d = md[:, 0]
    p = n & -n
    while p >= 1:  # P = 1: A = diag(d)·M itself (the op's dense K×K product)
        a = md[::p, ::p] * d[::p, None]
        s = torch.from_numpy(_sylvester(p)).double()
        if torch.equal(d[:, None] * torch.kron(a, s), md):
            return d.float(), a.float().contiguous()
        p //= 2
    return None
