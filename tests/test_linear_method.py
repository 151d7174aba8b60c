"""QuaRotLinearMethod on its own (no engine): every backend it can pick serves the
same layer as the reference torch ops, the Triton one under the interpreter."""

from __future__ import annotations

import pytest
import torch

from vllm_quarot.format import (
    ActivationSpec,
    OnlineHadamard,
    QuaRotFormat,
    RotationSpec,
    WeightSpec,
)
from vllm_quarot.quant import pack_weight, quantize_weight_rtn
from vllm_quarot.runtime import linear_method as lm
from vllm_quarot.runtime.kernels import vllm_wna16
from vllm_quarot.runtime.ops import cpu as cpu_ops


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


# K = 172·2: down_proj with the online R4 of order 172·2 (ragged for every kernel);
# vLLM's W4A16 kernel wants multiples of 32: 12·32
SHAPES = {"ragged": (48, 344), "x32": (64, 384)}


def _layer(fmt: QuaRotFormat, online: bool, backend: str, shape: str, dtype: torch.dtype,
           monkeypatch) -> tuple:
    """A loaded layer whose method chose `backend` (the others are switched off)."""
    n, k = SHAPES[shape]
    monkeypatch.setattr(lm.cpu_ops, "can_run", lambda *a: backend == "native" and
                        cpu_ops.AVAILABLE)
    monkeypatch.setattr(lm.cpu_wna16, "can_run", lambda *a: backend == "vllm_wna16" and
                        vllm_wna16.AVAILABLE)
    monkeypatch.setattr(lm.triton_ops, "usable", lambda dev: backend.startswith("triton"))
    monkeypatch.setattr(lm.triton_ops, "fused_hadamard_fits",
                        lambda *a: backend == "triton")
    method = lm.QuaRotLinearMethod(fmt, online_hadamard=online, prefix="model.mlp.down_proj")
    layer = torch.nn.Module()
    method.create_weights(layer, k, [n], k, n, dtype,
                          weight_loader=lambda p, w: p.data.copy_(w))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    codes, scale = quantize_weight_rtn(w, fmt.weight.bits, fmt.weight.group_size)
    layer.weight_packed.data.copy_(pack_weight(codes, fmt.weight.bits))
    layer.weight_scale.data.copy_(scale)
    method.process_weights_after_loading(layer)
    return method, layer


def _fmt(w_bits: int, a_bits: int | None, group_size: int, k: int) -> QuaRotFormat:
    act = None if a_bits is None else ActivationSpec(bits=a_bits, clip_ratio=0.9)
    return QuaRotFormat(
        scheme="test", weight=WeightSpec(bits=w_bits, group_size=group_size), activation=act,
        kv_cache=None, rotation=RotationSpec(r4=OnlineHadamard.of_size(k)))


LAYERS = [(4, 4, -1, True), (4, 4, -1, False), (8, 8, -1, True), (4, None, -1, True)]
BACKENDS = ["reference", "triton", "triton-unfused"] + (
    ["native"] if cpu_ops.AVAILABLE else [])
# (backend, w_bits, a_bits, group size, online R4, shape, dtype); the native CPU path has
# no weight-only GEMM: W4A16 takes vLLM's (bf16/fp16 only, sizes multiple of 32)
CASES = [(b, *layer, "ragged", torch.float32) for b in BACKENDS for layer in LAYERS
         if not (b == "native" and layer[1] is None)] + (
    [("vllm_wna16", 4, None, gs, online, "x32", torch.bfloat16)
     for gs, online in ((-1, True), (64, False), (128, True))] if vllm_wna16.AVAILABLE else [])


@pytest.mark.parametrize(("backend", "w_bits", "a_bits", "gs", "online", "shape", "dtype"),
                         CASES)
def test_backends_serve_the_same_layer(monkeypatch, backend, w_bits, a_bits, gs, online,
                                       shape, dtype):
    n, k = SHAPES[shape]
    fmt = _fmt(w_bits, a_bits, gs, k)
    ref_method, ref_layer = _layer(fmt, online, "reference", shape, dtype, monkeypatch)
    method, layer = _layer(fmt, online, backend, shape, dtype, monkeypatch)
    assert layer.quarot_backend == backend.removesuffix("-unfused")
    if online and a_bits is not None and backend.startswith("triton"):
        assert layer.quarot_fused_hadamard == (backend == "triton")
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n).to(dtype)
    ref = ref_method.apply(ref_layer, x, bias).float()
    out = method.apply(layer, x, bias).float()
    # equal codes give equal outputs; a rounding tie in the Hadamard may move one code;
    # in bf16 the outputs round (2^-8) after different float orders
    tol = 0.05 if a_bits is not None else (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.allclose(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
