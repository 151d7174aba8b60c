"""The linear method on its own (no engine): every kernel serves the same layer as
the reference torch ops (the Triton one under the interpreter), the kernel chooser
picks by platform and capability, and missing checkpoint tensors are refused."""

from __future__ import annotations

import contextlib
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
# vLLM's AMX int8 kernel takes N % 16 == 0 (bf16 only): N = 40 keeps its oneDNN path
SHAPES = {"ragged": (48, 344), "x32": (64, 384), "n40": (40, 384)}


def _fmt(w_bits: int, a_bits: int | None, group_size: int, k: int, clip: float = 0.9,
         static: bool = False) -> QuaRotFormat:
    act = None if a_bits is None else ActivationSpec(
        bits=a_bits, clip_ratio=clip, dynamic="static-per-tensor" if static else "per-token")
    scheme = {(4, 4): "w4a4", (8, 8): "w8a8", (4, 8): "w4a8", (4, None): "w4a16"}[
        (w_bits, a_bits)] + ("-static" if static else "")
    return QuaRotFormat(
        scheme=scheme, weight=WeightSpec(bits=w_bits, group_size=group_size), activation=act,
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
CASES += [("vllm_int8", 8, 8, -1, online, shape, dt)
          for online in (True, False)
          for shape, dt in (("n40", torch.float32), ("x32", torch.bfloat16))]


def _int8_ok(dtype: torch.dtype = torch.float32) -> tuple[bool, str | None]:
    return VLLMInt8LinearKernel.can_implement(
        LinearConfig(8, -1, 8, 1.0, False, 384, 64, dtype, 0, "cpu"))


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
    int8_ok, int8_why = _int8_ok(torch.bfloat16)
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


# ------------------------------------------------- vLLM's kernels on every machine
# The glue to vLLM's CPU kernels branches on what this machine's vLLM build has (see
# tests/vllm_standins.py). Each branch runs here: with vLLM's op where the build has it,
# with a plain PyTorch stand-in (checked against the op where both exist) where not.


def _has_op(name: str) -> bool:
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, name)


def _wna16_layer_inputs(gs: int):
    n, k = SHAPES["x32"]
    g = torch.Generator().manual_seed(3)
    codes, scale = quantize_weight_rtn(torch.randn(n, k, generator=g), 4, gs)
    x = torch.randn(7, k, generator=g).to(torch.bfloat16)
    return codes, scale, x, torch.randn(n, generator=g).to(torch.bfloat16)


@pytest.mark.skipif(not _has_op("cpu_gemm_wna16"), reason="this vLLM build has no "
                    "cpu_gemm_wna16 (AVX2): the stand-in is all there is")
@pytest.mark.parametrize("gs", [-1, 64])
def test_wna16_standin_is_vllms_op(monkeypatch, gs):
    import vllm_standins

    from vllm_quarot.runtime.kernels.vllm_wna16 import VLLMWNA16LinearKernel as K

    codes, scale, x, bias = _wna16_layer_inputs(gs)
    c = _config(a_bits=None, group_size=gs)
    kernel, layer = K(c), torch.nn.Module()
    kernel.process_weights_after_loading(layer, codes, scale)
    real = kernel.apply_weights(layer, x, bias)
    w_q, w_s, _ = kernel.vllm_kernel._get_weight_params(layer)
    standin = vllm_standins.cpu_gemm_wna16(x, w_q, w_s, None, bias, 8, layer.isa_hint)
    assert torch.allclose(real.float(), standin.float(), rtol=1e-2,
                          atol=1e-2 * standin.float().abs().max().item())


@pytest.mark.parametrize("op", ["vllm", "standin"])
@pytest.mark.parametrize("amx", [False, True], ids=["no-amx", "amx"])
@pytest.mark.parametrize("gs", [-1, 64])
def test_vllm_wna16_glue(monkeypatch, op, amx, gs):
    """QuaRot's W4A16 codes through vLLM's CPU kernel = the reference: the kernel is
    built with vLLM 0.32's constructor arguments, and on an AMX CPU (where vLLM would
    quantize bf16 activations to 8 bits, VLLM_CPU_INT4_W4A8=1 by default) the layer
    keeps 16-bit activations."""
    import vllm_standins

    if op == "vllm" and not _has_op("cpu_gemm_wna16"):
        pytest.skip("this vLLM build has no cpu_gemm_wna16 (AVX2); the stand-in case runs")
    stack = contextlib.ExitStack()
    if op == "standin":
        stack.enter_context(vllm_standins.wna16_standin(monkeypatch))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")
    from vllm_quarot.runtime.kernels.vllm_wna16 import VLLMWNA16LinearKernel as K

    codes, scale, x, bias = _wna16_layer_inputs(gs)
    c = _config(a_bits=None, group_size=gs)
    with stack:
        kernel, layer = K(c), torch.nn.Module()
        kernel.process_weights_after_loading(layer, codes, scale)
        assert layer.use_w4a8 is False
        out = kernel.apply_weights(layer, x, bias).float()
    ref_layer = torch.nn.Module()
    ref = ReferenceLinearKernel(c)
    ref.process_weights_after_loading(ref_layer, codes, scale)
    want = ref.apply_weights(ref_layer, x, bias).float()
    assert torch.allclose(out, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def _int8_inputs(n: int = 64, k: int = 384):
    g = torch.Generator().manual_seed(5)
    codes, scale = quantize_weight_rtn(torch.randn(n, k, generator=g), 8, -1)
    return codes, scale, torch.randn(6, k, generator=g), torch.randn(n, generator=g)


@pytest.mark.skipif(not (_has_op("int8_scaled_mm_with_quant")
                         and torch.cpu._is_amx_tile_supported()),
                    reason="no AMX int8 kernel on this machine: the stand-in is all there is")
def test_amx_int8_standin_is_vllms_op():
    import vllm_standins

    codes, scale, x, bias = _int8_inputs()
    x = x.to(torch.bfloat16)
    packed = torch.ops._C.convert_weight_packed(codes)
    real = torch.ops._C.int8_scaled_mm_with_quant(x, packed, scale, bias.float(),
                                                  torch.bfloat16, True).float()
    standin = vllm_standins.int8_scaled_mm_with_quant(
        x, vllm_standins.convert_weight_packed(codes), scale, bias.float(), torch.bfloat16,
        True).float()
    assert torch.allclose(real, standin, rtol=1e-2, atol=1e-2 * standin.abs().max().item())


@pytest.mark.parametrize("path", ["onednn", "amx-vllm", "amx-standin"])
@pytest.mark.parametrize("bias_on", ["layer-bias", "part-without-bias", "none"])
def test_vllm_int8_glue(monkeypatch, path, bias_on):
    """QuaRot W8A8 (clip 1.0) through vLLM's CPU int8 kernel = the reference, on each of
    its two paths: oneDNN (N % 16 != 0 here) and the AMX kernel (bf16, N % 16 == 0),
    with the bias on the vLLM layer, given to a tensor-parallel part that has none (the
    AMX path reads only layer.bias), or absent."""
    import vllm_standins

    from vllm_quarot.runtime.kernels import vllm_int8

    stack = contextlib.ExitStack()
    if path == "amx-vllm" and not (_has_op("int8_scaled_mm_with_quant")
                                   and torch.cpu._is_amx_tile_supported()):
        pytest.skip("no AMX int8 kernel on this machine; the amx-standin case runs")
    if path == "amx-standin":
        stack.enter_context(vllm_standins.amx_int8_standin(monkeypatch))
    vllm_int8.cpu_probe_error.cache_clear()
    monkeypatch.setattr(vllm_int8.cpu_probe_error, "cache_clear", lambda: None,
                        raising=False)
    n = 40 if path == "onednn" else 64
    dtype = torch.float32 if path == "onednn" else torch.bfloat16
    codes, scale, x, bias = _int8_inputs(n)
    x, bias = x.to(dtype), bias.to(dtype)
    c = _config(w_bits=8, a_bits=8, clip_ratio=1.0, out_features=n, params_dtype=dtype)
    with stack:
        assert vllm_int8.amx_path(n, c.in_features) == (path != "onednn")
        ok, why = VLLMInt8LinearKernel.can_implement(c)
        if not ok:
            assert "inexact on this CPU" in why  # oneDNN without VNNI: a real refusal
            pytest.skip(why)
        layer = torch.nn.Module()
        if bias_on == "layer-bias":
            layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        kernel = VLLMInt8LinearKernel(c)
        kernel.process_weights_after_loading(layer, codes, scale)
        out = kernel.apply_weights(layer, x, None if bias_on == "none" else bias).float()
    vllm_int8.cpu_probe_error.cache_clear()
    ref = ReferenceLinearKernel(c)
    ref_layer = torch.nn.Module()
    ref.process_weights_after_loading(ref_layer, codes, scale)
    want = ref.apply_weights(ref_layer, x, None if bias_on == "none" else bias).float()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out, want, rtol=tol, atol=tol * want.abs().max().item())


def test_vllm_int8_declines_what_its_amx_path_cannot_serve(monkeypatch):
    """On the AMX path vLLM quantizes activations itself (per token) and takes bf16/fp16
    only: a static input scale or float32 activations keep QuaRot's kernels; the probe's
    verdict (inexact oneDNN without VNNI) is a refusal naming the error."""
    import vllm_standins

    from vllm_quarot.runtime.kernels import vllm_int8

    with vllm_standins.amx_int8_standin(monkeypatch):
        ok, why = VLLMInt8LinearKernel.can_implement(_config(
            w_bits=8, a_bits=8, clip_ratio=1.0, static=True))
        assert not ok and "static input scale" in why
        ok, why = VLLMInt8LinearKernel.can_implement(_config(
            w_bits=8, a_bits=8, clip_ratio=1.0, params_dtype=torch.float32))
        assert not ok and "bf16/fp16 activations" in why
    monkeypatch.setattr(vllm_int8, "cpu_probe_error", lambda amx: 0.17)
    ok, why = VLLMInt8LinearKernel.can_implement(_config(
        w_bits=8, a_bits=8, clip_ratio=1.0, out_features=40, params_dtype=torch.float32))
    assert not ok and "oneDNN int8 GEMM is inexact on this CPU (17.0% error" in why
    native = NativeCPULinearKernel if cpu_ops.AVAILABLE else ReferenceLinearKernel
    assert choose_kernel(_config(w_bits=8, a_bits=8, clip_ratio=1.0, out_features=40,
                                 params_dtype=torch.float32)) is native


AVX2_BUILD = """
import torch
torch.cpu._is_avx512_supported = lambda: False  # vLLM loads its AVX2 build, as on AVX2 CPUs
from vllm.platforms import current_platform
current_platform.import_kernels()
from vllm_quarot.runtime.kernels import LinearConfig, VLLMWNA16LinearKernel, choose_kernel
c = LinearConfig(4, -1, None, 1.0, False, 384, 64, torch.bfloat16, 0, "cpu")
print("HAS_OP", hasattr(torch.ops._C, "cpu_gemm_wna16"))
print("WNA16", VLLMWNA16LinearKernel.can_implement(c))
print("CHOSEN", choose_kernel(c).__name__)
"""


def test_on_vllms_avx2_build_w4a16_falls_back_with_the_reason():
    """vLLM's AVX2 build lacks cpu_gemm_wna16 but vLLM still selects its CPU W4A16
    kernel: the glue declines it, naming why (run here by loading that build in a
    fresh process, as vLLM does on an AVX2 CPU)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AVX2_BUILD], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HAS_OP False" in proc.stdout
    assert "lacks cpu_gemm_wna16" in proc.stdout
    assert "CHOSEN ReferenceLinearKernel" in proc.stdout


FRESH_PROCESS = """
import socket, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.platforms import current_platform
current_platform.import_kernels()
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
with set_current_vllm_config(VllmConfig()):
    init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
    initialize_model_parallel(1, 1)
    from vllm_quarot.quant import quantize_weight_rtn
    from vllm_quarot.runtime.kernels import (LinearConfig, ReferenceLinearKernel,
                                             VLLMInt8LinearKernel, VLLMWNA16LinearKernel)
    for cls, bits, a_bits in ((VLLMWNA16LinearKernel, 4, None), (VLLMInt8LinearKernel, 8, 8)):
        c = LinearConfig(bits, -1, a_bits, 1.0, False, 384, 64, torch.bfloat16, 0, "cpu")
        ok, why = cls.can_implement(c)
        if not ok:
            print("SKIP", cls.__name__, why)
            continue
        codes, scale = quantize_weight_rtn(torch.randn(64, 384), bits, -1)
        x = torch.randn(5, 384).bfloat16()
        k, layer = cls(c), torch.nn.Module()
        k.process_weights_after_loading(layer, codes, scale)
        r, ref_layer = ReferenceLinearKernel(c), torch.nn.Module()
        r.process_weights_after_loading(ref_layer, codes, scale)
        out = k.apply_weights(layer, x, None).float()
        want = r.apply_weights(ref_layer, x, None).float()
        assert torch.allclose(out, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        print("OK", cls.__name__)
"""


def test_vllm_kernels_in_a_fresh_process():
    """A process whose first AMX instruction is vLLM's kernel (a worker serving a model
    whose every linear is quantized): the glue requests the AMX permission first, else
    the worker dies of SIGILL (exit -4) at the first forward on CPUs with AMX."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    for name in ("VLLMWNA16LinearKernel", "VLLMInt8LinearKernel"):
        assert f"OK {name}" in proc.stdout or f"SKIP {name}" in proc.stdout, proc.stdout
