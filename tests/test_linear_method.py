"""QuaRotLinearMethod on its own (no engine): every backend it can pick serves the
same layer as the reference torch ops, the Triton one under the interpreter."""

from __future__ import annotations

import pytest
import torch

from vllm_quarot import cpu_kernels
from vllm_quarot import linear_method as lm
from vllm_quarot.format import (
    ActivationSpec,
    QuaRotFormat,
    RotationSpec,
    WeightSpec,
)
from vllm_quarot.quant import pack_weight, quantize_weight_rtn


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    """vLLM's parameters ask for their tensor-parallel rank: a world of one."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        cleanup_dist_env_and_memory,
        init_distributed_environment,
        initialize_model_parallel,
    )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield
        cleanup_dist_env_and_memory()


N, K = 48, 344  # K = 172·2: down_proj with the online R4 of order 172·2


def _layer(fmt: QuaRotFormat, online: bool, backend: str, monkeypatch) -> tuple:
    """A loaded layer whose method chose `backend` (the others are switched off)."""
    monkeypatch.setattr(lm.cpu_kernels, "can_run", lambda *a: backend == "native" and
                        cpu_kernels.AVAILABLE)
    monkeypatch.setattr(lm.triton_kernels, "usable", lambda dev: backend.startswith("triton"))
    monkeypatch.setattr(lm.triton_kernels, "fused_hadamard_fits",
                        lambda *a: backend == "triton")
    method = lm.QuaRotLinearMethod(fmt, online_hadamard=online, prefix="model.mlp.down_proj")
    layer = torch.nn.Module()
    method.create_weights(layer, K, [N], K, N, torch.float32,
                          weight_loader=lambda p, w: p.data.copy_(w))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    codes, scale = quantize_weight_rtn(w, fmt.weight.bits, fmt.weight.group_size)
    layer.weight_packed.data.copy_(pack_weight(codes, fmt.weight.bits))
    layer.weight_scale.data.copy_(scale)
    method.process_weights_after_loading(layer)
    return method, layer


def _fmt(w_bits: int, a_bits: int | None, group_size: int) -> QuaRotFormat:
    act = None if a_bits is None else ActivationSpec(bits=a_bits, clip_ratio=0.9)
    return QuaRotFormat(
        scheme="test", weight=WeightSpec(bits=w_bits, group_size=group_size), activation=act,
        kv_cache=None, rotation=RotationSpec(r4_size=K, r4_hadamard=(172, 2)))


LAYERS = [(4, 4, -1, True), (4, 4, -1, False), (8, 8, -1, True), (4, None, -1, True)]
BACKENDS = ["reference", "triton", "triton-unfused"] + (
    ["native"] if cpu_kernels.AVAILABLE else [])
# the native CPU path has no weight-only GEMM (W4A16 layers take the reference)
CASES = [(b, *layer) for b in BACKENDS for layer in LAYERS
         if not (b == "native" and layer[1] is None)]


@pytest.mark.parametrize(("backend", "w_bits", "a_bits", "gs", "online"), CASES)
def test_backends_serve_the_same_layer(monkeypatch, backend, w_bits, a_bits, gs, online):
    fmt = _fmt(w_bits, a_bits, gs)
    ref_method, ref_layer = _layer(fmt, online, "reference", monkeypatch)
    method, layer = _layer(fmt, online, backend, monkeypatch)
    assert layer.quarot_backend == backend.removesuffix("-unfused")
    if online and a_bits is not None and backend.startswith("triton"):
        assert layer.quarot_fused_hadamard == (backend == "triton")
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(N)
    ref = ref_method.apply(ref_layer, x, bias)
    out = method.apply(layer, x, bias)
    # equal codes give equal outputs; a rounding tie in the Hadamard may move one code
    tol = 1e-5 if a_bits is None else 0.05
    assert torch.allclose(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
