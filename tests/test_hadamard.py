"""Hadamard constructions: every matrix is checked H·Hᵀ = n·I, and the fast
transform equals multiplication by the dense matrix."""

from __future__ import annotations

import pytest
import torch

from vllm_quarot.hadamard import (
    HadamardSizeError,
    factorize,
    hadamard_factor,
    hadamard_matrix,
    hadamard_transform,
    supported_k,
)

KNOWN_K = [12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172]
# sizes of real models: SmolLM2 hidden/intermediate, Llama-2-7B intermediate (11008 =
# 172·64), Qwen2.5-0.5B intermediate (4864 = 76·64), Qwen2-7B intermediate (18944 =
# 148·128), stories260K intermediate (172 = 4·43)
MODEL_SIZES = [576, 1536, 11008, 4864, 18944, 172, 64, 4096, 14336]


@pytest.mark.parametrize("k", KNOWN_K + [76, 148, 44, 68, 100])
def test_dense_factor_is_hadamard(k):
    h = hadamard_matrix(k, normalized=False)
    assert h.shape == (k, k)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes_factorize(n):
    k, pow2 = factorize(n)
    assert k * pow2 == n and pow2 & (pow2 - 1) == 0 and supported_k(k)


@pytest.mark.parametrize("n", [1, 2, 8, 24, 40, 172, 576, 1536, 4864])
def test_full_matrix_orthogonal_and_transform_matches(n):
    m = hadamard_matrix(n)
    assert torch.allclose(m @ m.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ m, atol=1e-12)


def test_transform_is_an_involution_up_to_transpose():
    x = torch.randn(7, 1536, dtype=torch.float64)
    m = hadamard_matrix(1536)
    y = hadamard_transform(x)
    assert torch.allclose(y @ m.t(), x, atol=1e-12)


def test_factor_is_the_smallest_constructible():
    assert factorize(144) == (36, 4)
    assert hadamard_factor(11008).shape == (172, 172)


# 188 = 4·47 exists mathematically but needs a construction we do not ship
@pytest.mark.parametrize("n", [3, 6, 7, 10, 188, 2 * 188])
def test_impossible_sizes_raise_a_clear_error(n):
    with pytest.raises(HadamardSizeError, match=f"order {n} .*--no-online-hadamard"):
        factorize(n)
