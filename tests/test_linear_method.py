"""The linear method on its own (no engine): every kernel serves the same layer as
the reference torch ops (the Triton one under the interpreter), the kernel chooser
picks by platform and capability, and missing checkpoint tensors are refused."""

from __future__ import annotations

import logging

import pytest
import torch

from vllm_quarot.format import (
    ActivationSpec,
    CheckpointFormatError,
    OnlineHadamard,
    QuaRotFormat,
    RotationSpec,
    WeightSpec,
)
from vllm_quarot.quant import pack_weight, quantize_weight_rtn
from vllm_quarot.runtime import linear_method as lm
from vllm_quarot.runtime.kernels import (
    LinearConfig,
    NativeCPULinearKernel,
    ReferenceLinearKernel,
    TritonLinearKernel,
    VLLMInt8LinearKernel,
    VLLMWNA16LinearKernel,
    choose_kernel,
)
from vllm_quarot.runtime.ops import cpu as cpu_ops
from vllm_quarot.runtime.ops import triton as triton_ops
from vllm_quarot.runtime.schemes import scheme_for
from vllm_quarot.runtime.transform import HadamardTransform


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
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # torch.ops._C.* (the engine does this itself)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield
        cleanup_dist_env_and_memory()


# K = 172·2: down_proj with the online R4 of order 172·2 (ragged for every kernel);
# vLLM's kernels want multiples of 32: 12·32
SHAPES = {"ragged": (48, 344), "x32": (64, 384)}


def _fmt(w_bits: int, a_bits: int | None, group_size: int, k: int, clip: float = 0.9,
         static: bool = False) -> QuaRotFormat:
    act = None if a_bits is None else ActivationSpec(
        bits=a_bits, clip_ratio=clip, dynamic="static-per-tensor" if static else "per-token")
    return QuaRotFormat(
        scheme="test", weight=WeightSpec(bits=w_bits, group_size=group_size), activation=act,
        kv_cache=None, rotation=RotationSpec(r4=OnlineHadamard.of_size(k)))


def _layer(fmt: QuaRotFormat, online: bool, kernel: type | None, shape: str,
           dtype: torch.dtype, monkeypatch, load: tuple[str, ...] = ("weight_packed",
                                                                        "weight_scale")):
    """A loaded layer whose method runs `kernel` (None: the one choose_kernel picks)."""
    n, k = SHAPES[shape]
    if kernel is not None:
        def forced(c: LinearConfig) -> type:
            ok, why = kernel.can_implement(c)
            assert ok, why
            return kernel
        monkeypatch.setattr(lm, "choose_kernel", forced)
    transform = HadamardTransform(fmt.rotation.r4) if online else None
    method = lm.QuaRotLinearMethod(scheme_for(fmt), transform, "model.mlp.down_proj")
    layer = torch.nn.Module()
    method.create_weights(layer, k, [n], k, n, dtype,
                          weight_loader=lambda p, w, *a: p.data.copy_(w))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    codes, scale = quantize_weight_rtn(w, fmt.weight.bits, fmt.weight.group_size)
    tensors = {"weight_packed": pack_weight(codes, fmt.weight.bits), "weight_scale": scale,
               "input_scale": torch.tensor([0.05])}
    for name in load + (("input_scale",) if fmt.activation and fmt.activation.static else ()):
        param = getattr(layer, name)
        param.weight_loader(param, tensors[name])
    method.process_weights_after_loading(layer)
    return method, layer


LAYERS = [(4, 4, -1, True), (4, 4, -1, False), (8, 8, -1, True), (4, None, -1, True)]
KERNELS = ["reference", "triton", "triton-unfused"] + (
    ["native"] if cpu_ops.AVAILABLE else [])
CLASSES = {"reference": ReferenceLinearKernel, "triton": TritonLinearKernel,
           "triton-unfused": TritonLinearKernel, "native": NativeCPULinearKernel,
           "vllm_wna16": VLLMWNA16LinearKernel, "vllm_int8": VLLMInt8LinearKernel}
# (kernel, w_bits, a_bits, group size, online R4, shape, dtype); the native CPU kernel has
# no weight-only GEMM: W4A16 takes vLLM's (bf16/fp16 only, sizes multiple of 32)
CASES = [(b, *layer, "ragged", torch.float32) for b in KERNELS for layer in LAYERS
         if not (b == "native" and layer[1] is None)]
# vLLM's kernels, where this machine's vLLM build runs them exactly (else skipped with
# the reason can_implement gives)
CASES += [("vllm_wna16", 4, None, gs, online, "x32", torch.bfloat16)
          for gs, online in ((-1, True), (64, False), (128, True))]
CASES += [("vllm_int8", 8, 8, -1, online, "x32", dt)
          for online in (True, False) for dt in (torch.float32, torch.bfloat16)]


def _int8_ok() -> tuple[bool, str | None]:
    return VLLMInt8LinearKernel.can_implement(
        LinearConfig(8, -1, 8, 1.0, False, 384, 64, torch.float32, 0, "cpu"))


@pytest.mark.parametrize(("kernel", "w_bits", "a_bits", "gs", "online", "shape", "dtype"),
                         CASES)
def test_kernels_serve_the_same_layer(monkeypatch, kernel, w_bits, a_bits, gs, online,
                                      shape, dtype):
    n, k = SHAPES[shape]
    clip = 1.0 if kernel == "vllm_int8" else 0.9
    fmt = _fmt(w_bits, a_bits, gs, k, clip)
    if kernel.startswith("vllm"):
        c = scheme_for(fmt).linear_config(k, n, dtype, 0, "cpu")
        ok, why = CLASSES[kernel].can_implement(c)
        if not ok:
            pytest.skip(f"{CLASSES[kernel].__name__} cannot run here: {why}")
    ref_method, ref_layer = _layer(fmt, online, ReferenceLinearKernel, shape, dtype,
                                   monkeypatch)
    if kernel == "triton-unfused":
        monkeypatch.setattr(triton_ops, "fused_hadamard_fits", lambda *a: False)
    method, layer = _layer(fmt, online, CLASSES[kernel], shape, dtype, monkeypatch)
    assert type(method.kernel) is CLASSES[kernel]
    if online and a_bits is not None and kernel.startswith("triton"):
        assert method.kernel.fuses_hadamard == (kernel == "triton")
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n).to(dtype)
    ref = ref_method.apply(ref_layer, x, bias).float()
    out = method.apply(layer, x, bias).float()
    # equal codes give equal outputs; a rounding tie in the Hadamard may move one code;
    # in bf16 the outputs round (2^-8) after different float orders
    tol = 0.05 if a_bits is not None else (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.allclose(out, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_static_activations_on_every_kernel(monkeypatch):
    """W8A8-static: the calibrated input_scale reaches each kernel that serves it."""
    n, k = SHAPES["x32"]
    fmt = _fmt(8, 8, -1, k, clip=1.0, static=True)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    ref_method, ref_layer = _layer(fmt, True, ReferenceLinearKernel, "x32", torch.float32,
                                   monkeypatch)
    ref = ref_method.apply(ref_layer, x, None)
    for name in ["triton"] + (["native"] if cpu_ops.AVAILABLE else []) + (
            ["vllm_int8"] if _int8_ok()[0] else []):
        method, layer = _layer(fmt, True, CLASSES[name], "x32", torch.float32, monkeypatch)
        out = method.apply(layer, x, None)
        assert torch.allclose(out, ref, rtol=0.02, atol=0.02 * ref.abs().max().item()), name


def _config(**kw) -> LinearConfig:
    base = dict(w_bits=4, group_size=-1, a_bits=4, clip_ratio=0.9, static=False,
                in_features=384, out_features=64, params_dtype=torch.bfloat16,
                online_hadamard=0, device_type="cpu")
    return LinearConfig(**(base | kw))


def test_choose_kernel_on_cpu(monkeypatch, caplog):
    """The CPU list, first match: W4A4 -> native (when built); clipped W8A8 -> native;
    W8A8 at clip 1.0 -> vLLM's int8 where its probe is exact; W4A16 -> vLLM's kernel
    where this build has it; the rest -> reference. Each skip is logged with a reason."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_ops, "INTERPRET", False)
    native = NativeCPULinearKernel if cpu_ops.AVAILABLE else ReferenceLinearKernel
    assert choose_kernel(_config()) is native
    assert choose_kernel(_config(w_bits=8, a_bits=8, clip_ratio=0.9)) is native
    int8 = choose_kernel(_config(w_bits=8, a_bits=8, clip_ratio=1.0))
    int8_ok, int8_why = _int8_ok()
    assert int8 is (VLLMInt8LinearKernel if int8_ok else native)
    if not int8_ok:
        assert "inexact on this CPU" in int8_why
    wna16 = choose_kernel(_config(a_bits=None))
    assert wna16 is (VLLMWNA16LinearKernel if VLLMWNA16LinearKernel.can_implement(
        _config(a_bits=None))[0] else ReferenceLinearKernel)
    # float32 activations: vLLM's W4A16 kernels take 16-bit ones
    assert choose_kernel(_config(a_bits=None, params_dtype=torch.float32)) is (
        ReferenceLinearKernel)


def test_disabled_kernels_are_skipped(monkeypatch):
    monkeypatch.setenv("VLLM_QUAROT_DISABLED_KERNELS",
                       "NativeCPULinearKernel, VLLMInt8LinearKernel,TritonLinearKernel")
    assert choose_kernel(_config()) is ReferenceLinearKernel
    assert choose_kernel(_config(w_bits=8, a_bits=8, clip_ratio=1.0)) is (
        ReferenceLinearKernel)
    monkeypatch.setenv("VLLM_QUAROT_DISABLED_KERNELS", "ReferenceLinearKernel,"
                       "NativeCPULinearKernel,TritonLinearKernel,VLLMWNA16LinearKernel")
    with pytest.raises(ValueError, match="ReferenceLinearKernel: in VLLM_QUAROT_DISABLED"):
        choose_kernel(_config(params_dtype=torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_w4a16_runs_marlin_on_cuda(monkeypatch):
    """On a GPU, W4A16 layers run vLLM's Marlin (or Machete on sm90) kernel."""
    c = _config(a_bits=None, device_type="cuda", params_dtype=torch.float16)
    assert choose_kernel(c) is VLLMWNA16LinearKernel
    from vllm_quarot.runtime.kernels.vllm_wna16 import _vllm_kernel

    assert _vllm_kernel(c).__name__ in ("MarlinLinearKernel", "MacheteLinearKernel")


def test_w4a16_cpu_kernel_class():
    """On CPU, vLLM chooses its CPU W4A16 kernel; ours uses it only where this vLLM
    build has the op (the AVX2 build lacks cpu_gemm_wna16)."""
    from vllm_quarot.runtime.kernels.vllm_wna16 import _vllm_kernel

    c = _config(a_bits=None)
    assert _vllm_kernel(c).__name__ == "CPUWNA16LinearKernel"
    ok, why = VLLMWNA16LinearKernel.can_implement(c)
    assert ok == hasattr(torch.ops._C, "cpu_gemm_wna16"), why


@pytest.mark.parametrize("missing", ["weight_packed", "weight_scale"])
def test_a_parameter_no_checkpoint_tensor_wrote_is_refused(monkeypatch, missing):
    """vLLM checks for missing tensors only on unquantized layers: the method counts
    the loader's writes and refuses a layer whose tensor never came."""
    fmt = _fmt(4, 4, -1, SHAPES["ragged"][1])
    load = tuple(n for n in ("weight_packed", "weight_scale") if n != missing)
    with pytest.raises(CheckpointFormatError, match=f"down_proj.{missing}: missing"):
        _layer(fmt, True, ReferenceLinearKernel, "ragged", torch.float32, monkeypatch,
               load=load)


def test_choice_is_logged(caplog):
    logger = logging.getLogger("vllm.quarot")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)  # vLLM configures its loggers only inside an engine
    try:
        choose_kernel(_config(w_bits=8, a_bits=8, clip_ratio=0.77, group_size=64))
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
    assert "W8A8 group 64 layers run on" in caplog.text
    assert "VLLMInt8LinearKernel: 8-bit per-channel weights" in caplog.text
