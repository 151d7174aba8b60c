"""Hadamard matrices of order K·2^k and the transform that applies them.

One module shared by the offline quantizer (R1, R2, R4 fused into weights) and the
runtime (R4 online before down_proj, R3 on queries and keys), so that both sides use
the very same orthogonal matrix. The power-of-two factor is Sylvester's (applied with
a fast Walsh–Hadamard butterfly); the rest, a small dense K×K matrix, comes from the
Paley I / Paley II constructions over GF(q) or, for orders that need them (156, 172),
from the Goethals–Seidel array.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch

from vllm_quarot.errors import QuaRotError

__all__ = [
    "HadamardSizeError",
    "block_hadamard_transform",
    "factorize",
    "fingerprint",
    "hadamard_matrix",
    "hadamard_transform",
    "random_signs",
    "supported_k",
]


class HadamardSizeError(QuaRotError):
    """No Hadamard matrix of the requested order can be built."""


# --------------------------------------------------------------------------- GF(q)


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with q = p**m and p prime, else None."""
    if q < 2:
        return None
    for p in range(2, int(math.isqrt(q)) + 1):
        if q % p == 0:
            m = 0
            while q % p == 0:
                q //= p
                m += 1
            return (p, m) if q == 1 else None
    return q, 1


def _poly_mulmod(a: list[int], b: list[int], mod: list[int], p: int) -> list[int]:
    """Product of two polynomials (low degree first) modulo a monic polynomial."""
    m = len(mod) - 1
    prod = [0] * (2 * m - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, m - 1, -1):
        c = prod[d]
        if c:
            for k in range(m + 1):
                prod[d - m + k] = (prod[d - m + k] - c * mod[k]) % p
    return prod[:m]


def _irreducible(p: int, m: int) -> list[int]:
    """A monic irreducible polynomial of degree m over GF(p) (brute force, small q)."""
    for code in range(p**m):
        coeffs = [(code // p**i) % p for i in range(m)] + [1]
        if coeffs[0] == 0:
            continue
        # Irreducible iff it has no monic factor of degree 1..m//2: test by
        # checking that no polynomial of degree <= m//2 divides it (tiny q only).
        if all(not _divides(f, coeffs, p) for f in _monic_polys(p, m // 2)):
            return coeffs
    raise AssertionError(f"no irreducible polynomial of degree {m} over GF({p})")


def _monic_polys(p: int, max_deg: int):
    for d in range(1, max_deg + 1):
        for code in range(p**d):
            yield [(code // p**i) % p for i in range(d)] + [1]


def _divides(f: list[int], g: list[int], p: int) -> bool:
    g = list(g)
    df = len(f) - 1
    for d in range(len(g) - 1, df - 1, -1):
        c = g[d]
        if c:
            for k in range(df + 1):
                g[d - df + k] = (g[d - df + k] - c * f[k]) % p
    return not any(g[:df])


def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """χ over GF(q) and the subtraction table, elements indexed 0..q-1.

    Element i of GF(p^m) is the polynomial whose base-p digits are those of i.
    """
    p, m = _prime_power(q)  # type: ignore[misc]
    digits = np.array([[(i // p**k) % p for k in range(m)] for i in range(q)])
    weights = p ** np.arange(m)
    sub = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    mod = _irreducible(p, m) if m > 1 else [0, 1]
    chi = np.zeros(q, dtype=np.int64)
    e = (q - 1) // 2
    for i in range(1, q):
        if m == 1:
            r = pow(i, e, p)
            chi[i] = 1 if r == 1 else -1
            continue
        base, acc, k = list(digits[i]), [1] + [0] * (m - 1), e
        while k:
            if k & 1:
                acc = _poly_mulmod(acc, base, mod, p)
            base = _poly_mulmod(base, base, mod, p)
            k >>= 1
        chi[i] = 1 if acc == [1] + [0] * (m - 1) else -1
    return chi, sub


def _jacobsthal(q: int) -> np.ndarray:
    chi, sub = _quadratic_character(q)
    return chi[sub]


def _paley1(q: int) -> np.ndarray:
    """Order q+1, for a prime power q ≡ 3 (mod 4)."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q+1), for a prime power q ≡ 1 (mod 4)."""
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(
        np.eye(n, dtype=np.int64), np.array([[1, -1], [-1, -1]])
    )


def _goethals_seidel_k() -> dict[int, tuple[str, str, str, str]]:
    try:
        from vllm_quarot._hadamard_seeds import GOETHALS_SEIDEL_SEQUENCES
    except ImportError:  # pragma: no cover - the seeds file ships with the package
        return {}
    return {4 * n: seqs for n, seqs in GOETHALS_SEIDEL_SEQUENCES.items()}


def _goethals_seidel(seqs: tuple[str, str, str, str]) -> np.ndarray:
    """Goethals–Seidel array over four circulants with zero total autocorrelation."""
    a, b, c, d = (
        np.array([1 if ch == "+" else -1 for ch in s], dtype=np.int64) for s in seqs
    )
    n = len(a)

    def circ(v: np.ndarray) -> np.ndarray:
        return np.stack([np.roll(v, i) for i in range(n)])

    ca, cb, cc, cd = circ(a), circ(b), circ(c), circ(d)
    r = np.fliplr(np.eye(n, dtype=np.int64))
    return np.block(
        [
            [ca, cb @ r, cc @ r, cd @ r],
            [-cb @ r, ca, cd.T @ r, -cc.T @ r],
            [-cc @ r, -cd.T @ r, ca, cb.T @ r],
            [-cd @ r, cc.T @ r, -cb.T @ r, ca],
        ]
    )


def _construction(k: int) -> str | None:
    """Name of the construction that gives order k (k not a multiple of 8 needed)."""
    if k in (1, 2):
        return "sylvester"
    if k % 4:
        return None
    pp = _prime_power(k - 1)
    if pp is not None and (k - 1) % 4 == 3:
        return "paley1"
    pp = _prime_power(k // 2 - 1)
    if pp is not None and (k // 2 - 1) % 4 == 1:
        return "paley2"
    if k in _goethals_seidel_k():
        return "goethals-seidel"
    return None


@functools.cache
def _base_matrix(k: int) -> np.ndarray:
    kind = _construction(k)
    if kind == "sylvester":
        h = np.array([[1]], dtype=np.int64)
        while h.shape[0] < k:
            h = np.block([[h, h], [h, -h]])
    elif kind == "paley1":
        h = _paley1(k - 1)
    elif kind == "paley2":
        h = _paley2(k // 2 - 1)
    elif kind == "goethals-seidel":
        h = _goethals_seidel(_goethals_seidel_k()[k])
    else:
        raise HadamardSizeError(f"no Hadamard construction for order {k}")
    if not np.array_equal(h @ h.T, k * np.eye(k, dtype=np.int64)):
        raise AssertionError(f"{kind} construction of order {k} is not Hadamard")
    return h


def supported_k(k: int) -> bool:
    """Whether the dense factor K of an order K·2^k can be constructed."""
    return _construction(k) is not None


@functools.cache
def factorize(n: int) -> tuple[int, int]:
    """Split n = K · 2^k with the smallest constructible K (the cheapest transform).

    Raises HadamardSizeError naming n and the ways around it when no factor works.
    """
    if n < 1:
        raise HadamardSizeError(f"Hadamard order must be positive, got {n}")
    pow2 = n & -n
    while pow2 >= 1:
        k = n // pow2
        if supported_k(k):
            return k, pow2
        pow2 //= 2
    raise HadamardSizeError(
        f"no Hadamard matrix of order {n} can be built here (orders K·2^k need K in "
        "1, 2, Paley I (q+1, q ≡ 3 mod 4 a prime power), Paley II (2(q+1), q ≡ 1 mod 4) "
        f"or Goethals–Seidel {sorted(_goethals_seidel_k())}). For the intermediate size "
        "(R4), quantize with --no-online-hadamard to skip the online rotation."
    )


def has_hadamard(n: int) -> bool:
    """Whether ``factorize`` can build a Hadamard matrix of order n."""
    try:
        factorize(n)
    except HadamardSizeError:
        return False
    return True


def fingerprint(n: int) -> dict[str, object]:
    """What defines the Hadamard transform of order n that this version builds:
    ``{"hadamard": [K, 2^k], "construction": name, "sha256": digest of the ±1 K×K
    factor}``. Checkpoints store it for their online rotations (R3, R4) and the runtime
    compares it with what it rebuilds, so that a change to a construction can never
    silently change the rotation a checkpoint's weights were made with."""
    k, pow2 = factorize(n)
    digest = hashlib.sha256(np.ascontiguousarray(_base_matrix(k), dtype=np.int8).tobytes())
    return {"hadamard": [k, pow2], "construction": _construction(k),
            "sha256": digest.hexdigest()}


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float64, normalized: bool = True
) -> torch.Tensor:
    """The dense n×n matrix M with hadamard_transform(x) == x @ M (tests, small n)."""
    k, pow2 = factorize(n)
    m = np.kron(_base_matrix(k), _base_matrix_pow2(pow2))
    t = torch.from_numpy(m).to(dtype)
    return t / math.sqrt(n) if normalized else t


def _base_matrix_pow2(n: int) -> np.ndarray:
    return _base_matrix(n) if n <= 2 else _sylvester(n)


@functools.cache
def _sylvester(n: int) -> np.ndarray:
    h = np.array([[1]], dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_factor(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense K×K factor of order n = K·2^k, unnormalised (a 1×1 one for 2^k)."""
    k, _ = factorize(n)
    return torch.from_numpy(_base_matrix(k)).to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) over the last dim."""
    n = x.shape[-1]
    if n & (n - 1):
        raise HadamardSizeError(f"fast Walsh–Hadamard needs a power of two, got {n}")
    lead = x.shape[:-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, n)


def hadamard_transform(
    x: torch.Tensor, had_k: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """x @ (H_K ⊗ H_2^k) · scale over the last dim; scale defaults to 1/sqrt(n).

    ``had_k`` is the dense K×K factor (hadamard_factor); it is built when omitted.
    """
    n = x.shape[-1]
    if had_k is None:
        had_k = hadamard_factor(n, x.dtype)
    k = had_k.shape[0]
    if n % k:
        raise HadamardSizeError(f"size {n} is not a multiple of the factor {k}")
    pow2 = n // k
    y = fwht(x.reshape(*x.shape[:-1], k, pow2))
    if k > 1:
        # y[..., a, :] -> sum_a H_K[a, c] y[..., a, :]
        y = torch.matmul(had_k.to(y.device, y.dtype).t(), y)
    s = 1.0 / math.sqrt(n) if scale is None else scale
    return (y * s).reshape(x.shape)


def block_hadamard_transform(
    x: torch.Tensor, blocks: int = 1, had_k: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ (I_blocks ⊗ M) over the last dim, M the normalised Hadamard of order
    n / blocks (``had_k``: its dense factor, built when omitted): the tensor-parallel
    R4, one block per rank's slice of the intermediate size. blocks == 1 is
    hadamard_transform itself."""
    if blocks == 1:
        return hadamard_transform(x, had_k)
    n = x.shape[-1]
    if n % blocks:
        raise HadamardSizeError(f"{blocks} blocks do not divide the size {n}")
    y = hadamard_transform(x.reshape(*x.shape[:-1], blocks, n // blocks), had_k)
    return y.reshape(x.shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A seeded ±1 vector: the diagonal that randomizes R1 (deterministic per seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).mul(2).sub(1).double()
