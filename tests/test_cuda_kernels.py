"""The CUDA kernels of csrc/cuda: compiled for sm_80 / sm_89 / sm_90a wherever nvcc exists,
and checked against the PyTorch reference ops (vllm_quarot/runtime/ops/reference.py,
runtime/kv_attention.py) when a GPU is present.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from vllm_quarot.hadamard import hadamard_factor, hadamard_transform
from vllm_quarot.quant import pack_kv, unpack_kv
from vllm_quarot.runtime.ops import reference as ops

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = [("compute_80", "sm_80"), ("compute_89", "sm_89"), ("compute_90a", "sm_90a")]
NO_GPU = "no CUDA device: torch.cuda.is_available() is False (GPU tests need one)"


# --------------------------------------------------------------------------- compile


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_flags(shim_dir: Path) -> list[str]:
    """Include paths and defines of a torch CUDA extension build (minus -gencode)."""
    from torch.utils import cpp_extension

    incs = list(cpp_extension.include_paths())
    # CPU-only torch wheels ship c10/cuda without its generated config header; a build
    # against a CUDA torch has it. Supply the (one-line) header when it is missing.
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in incs):
        hdr = shim_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        hdr.parent.mkdir(parents=True, exist_ok=True)
        hdr.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(str(shim_dir))
    incs += [sysconfig.get_paths()["include"], str(CUDA_DIR)]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        *(f"-I{p}" for p in incs),
        "-DTORCH_EXTENSION_NAME=quarot_cuda",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "--std=c++17",
        "-Xcompiler",
        "-fPIC",
        *getattr(cpp_extension, "COMMON_NVCC_FLAGS", []),
    ]


def test_cuda_sources_compile(tmp_path):
    """Every csrc/cuda/*.cu compiles for sm_80, sm_89 and sm_90a (no GPU needed)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): cannot compile")
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources, f"no CUDA sources in {CUDA_DIR}"
    flags = nvcc_flags(tmp_path / "shim")
    # one nvcc per source, every architecture in it: the host side (torch's headers, most
    # of the time) compiles once, the device side per architecture on nvcc's own threads
    gencodes = [f"-gencode=arch={arch},code={code}" for arch, code in ARCHS]
    jobs = [[nvcc, *gencodes, "--threads", "0", "-c", str(src),
             "-o", str(tmp_path / f"{src.stem}.o"), *flags] for src in sources]

    def run(cmd: list[str]) -> tuple[list[str], subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True)
        return cmd, res, time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    failures = []
    for cmd, res, secs in results:
        print(f"{Path(cmd[cmd.index('-c') + 1]).name} {gencodes}: rc={res.returncode} "
              f"in {secs:.0f}s")
        # warnings in our own sources count as failures (torch's headers have some)
        own = [ln for ln in res.stderr.splitlines()
               if str(CUDA_DIR) in ln and "warning" in ln.lower()]
        if res.returncode != 0 or own:
            failures.append(f"$ {' '.join(cmd)}\n{res.stderr[-20000:]}")
    assert not failures, "nvcc failed:\n\n" + "\n\n".join(failures)


# --------------------------------------------------------------------------- GPU helpers


@pytest.fixture(scope="module")
def cuda_ops():
    """torch.ops.quarot_cuda, from the installed extension or built here."""
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    if not _registered():
        try:
            import vllm_quarot._C_cuda  # noqa: F401
        except ImportError:
            from torch.utils.cpp_extension import load

            load(
                name="quarot_cuda",
                sources=[str(p) for p in sorted(CUDA_DIR.glob("*.cu"))],
                extra_include_paths=[str(CUDA_DIR)],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                is_python_module=False,
                verbose=False,
            )
    assert _registered()
    return torch.ops.quarot_cuda


def _registered() -> bool:
    try:
        torch.ops.quarot_cuda.w4a4_gemm  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [.., K] in [-8, 7] -> uint8 [.., K/2], low nibble = even column."""
    q = q.to(torch.int16) & 0xF
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    p = p.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    q = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return ((q ^ 8) - 8).to(torch.int8)


# --------------------------------------------------------------------------- hadamard_quantize

HQ_CASES = [
    # (n, online Hadamard, bits, dtype)
    (4096, True, 4, torch.bfloat16),
    (11008, True, 4, torch.bfloat16),  # K = 172, P = 64
    (14336, True, 4, torch.float16),  # K = 28, P = 512
    (5504, True, 8, torch.float32),  # K = 172, P = 32
    (96, True, 4, torch.bfloat16),  # K = 12, P = 8
    (128, True, 8, torch.float16),
    (65536, True, 4, torch.bfloat16),  # does not fit shared memory: global scratch path
    (4096, False, 4, torch.bfloat16),
    (11008, False, 8, torch.float16),
    (100, False, 4, torch.float32),  # n % 8 != 0: scalar path
]


@pytest.mark.parametrize("n,had,bits,dtype", HQ_CASES)
@pytest.mark.parametrize("lead", [(1,), (37,), (2, 5)])
def test_hadamard_quantize(cuda_ops, n, had, bits, dtype, lead):
    torch.manual_seed(n + bits + len(lead))
    clip = 0.9
    x = torch.randn(*lead, n, dtype=torch.float32)
    x[..., 3] *= 20  # an outlier channel, as in real activations
    x = x.to(dtype)
    had_k = hadamard_factor(n) if had else None

    y = ops.hadamard(x, had_k) if had else x  # reference, on the CPU
    q_ref, s_ref = ops.quantize_per_token(y, bits, clip)
    codes, scales = cuda_ops.hadamard_quantize(
        x.cuda(), None if had_k is None else had_k.cuda(), bits, clip
    )
    codes, scales = codes.cpu(), scales.cpu()
    assert scales.shape == s_ref.shape and scales.dtype == torch.float32
    if bits == 4:
        assert codes.dtype == torch.uint8 and codes.shape == (*lead, n // 2)
        codes = unpack_int4(codes)
    else:
        assert codes.dtype == torch.int8 and codes.shape == (*lead, n)
    # The FWHT sums in another order than the reference: float32 results may differ in
    # the last bit, and after the rounding to x.dtype by one ulp of that dtype.
    torch.testing.assert_close(scales, s_ref, rtol=1e-2 if had else 0, atol=0)
    diff = (codes.int() - q_ref.int()).abs()
    assert diff.max().item() <= 1
    assert diff.float().mean().item() < (2e-3 if had else 1e-6)


# --------------------------------------------------------------------------- w4a4_gemm


def ref_int_linear(a_q, a_s, w_q, w_s, bias, out_dtype):
    """quarot::int_linear on the GPU: the int32 product is exact in float32 here
    (|sum| <= K·64 < 2^24 for K < 262144), then the same epilogue in the same order."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exactness needs true float32
    try:
        acc = a_q.float() @ w_q.float().t()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out = acc * w_s.float().reshape(1, -1)
    out = out * a_s.float().reshape(-1, 1)
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def test_ref_int_linear_matches_op():
    torch.manual_seed(0)
    a = torch.randint(-8, 8, (33, 256), dtype=torch.int8)
    w = torch.randint(-8, 8, (40, 256), dtype=torch.int8)
    a_s, w_s, bias = torch.rand(33, 1), torch.rand(40, 1), torch.randn(40)
    expect = ops.int_linear(a, a_s, w, w_s, bias, torch.float32)
    torch.testing.assert_close(ref_int_linear(a, a_s, w, w_s, bias, torch.float32), expect,
                               rtol=0, atol=0)


GEMM_SHAPES = [  # (N, K)
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
    (1000, 4128),  # ragged N; K % 128 != 0
    (72, 200),  # K % 32 != 0: generic kernel
]


@pytest.mark.parametrize("n,k", GEMM_SHAPES)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 100, 300, 1000])
def test_w4a4_gemm(cuda_ops, m, n, k):
    torch.manual_seed(m * 7 + n + k)
    dev = "cuda"
    a_q = torch.randint(-8, 8, (m, k), dtype=torch.int8, device=dev)
    w_q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
    a_s = torch.rand(m, 1, device=dev) * 0.1 + 1e-3
    w_s = torch.rand(n, 1, device=dev) * 0.01 + 1e-4
    for dtype, bias in ((torch.bfloat16, torch.randn(n, device=dev)), (torch.float16, None)):
        out = cuda_ops.w4a4_gemm(pack_int4(a_q), a_s, pack_int4(w_q), w_s, bias, dtype)
        ref = ref_int_linear(a_q, a_s, w_q, w_s, bias, dtype)
        assert out.shape == (m, n) and out.dtype == dtype
        # same float32 epilogue as the reference: equal up to the last bit of the output
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-6)


def test_hadamard_quantize_then_gemm(cuda_ops):
    """The down_proj pipeline: online Hadamard + int4 quantization, then W4A4."""
    torch.manual_seed(1)
    n_in, n_out, m = 11008, 4096, 64
    had = hadamard_factor(n_in)
    x = torch.randn(m, n_in, dtype=torch.bfloat16)
    w_q = torch.randint(-8, 8, (n_out, n_in), dtype=torch.int8)
    w_s = torch.rand(n_out, 1) * 0.01
    xq, xs = ops.quantize_per_token(ops.hadamard(x, had), 4, 1.0)
    ref = ops.int_linear(xq, xs, w_q, w_s, None, torch.bfloat16)
    codes, scales = cuda_ops.hadamard_quantize(x.cuda(), had.cuda(), 4, 1.0)
    out = cuda_ops.w4a4_gemm(codes, scales, pack_int4(w_q).cuda(), w_s.cuda(), None,
                             torch.bfloat16).cpu()
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 1e-2, err


# --------------------------------------------------------------------------- KV4


def r3(x: torch.Tensor, on: bool) -> torch.Tensor:
    return hadamard_transform(x.float(), hadamard_factor(x.shape[-1])) if on else x.float()


def ref_attention(query, cache, block_table, seq_lens, qsl, scale, rot):
    """QuaRotCPUAttentionImpl.forward's KV4 branch, on CPU tensors."""
    t, h, d = query.shape
    hkv, bs = cache.shape[1], cache.shape[2]
    half = d // 2 + 4
    group = h // hkv
    out = torch.zeros(t, h, d, dtype=query.dtype)
    qs = qsl.tolist()
    for r, seq_len in enumerate(seq_lens.tolist()):
        start, end = qs[r], qs[r + 1]
        if end == start:
            continue
        blocks = block_table[r, : -(-seq_len // bs)].long()
        c = cache[blocks].permute(1, 0, 2, 3).reshape(hkv, -1, 2 * half)[:, :seq_len]
        k = unpack_kv(c[..., :half], d).repeat_interleave(group, dim=0)
        v = unpack_kv(c[..., half:], d).repeat_interleave(group, dim=0)
        q = r3(query[start:end], rot).transpose(0, 1)
        tq = end - start
        pos_q = torch.arange(seq_len - tq, seq_len).unsqueeze(1)
        mask = torch.arange(seq_len).unsqueeze(0) <= pos_q
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             scale=scale)
        out[start:end] = o.transpose(0, 1).to(out.dtype)
    return out


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("rot", [False, True])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_kv4_cache_update(cuda_ops, d, rot, slot_dtype):
    torch.manual_seed(d + rot)
    t, hkv, nblocks, bs, clip = 50, 4, 8, 16, 0.95
    key = torch.randn(t, hkv, d, dtype=torch.bfloat16) * 2
    value = torch.randn(t, hkv, d, dtype=torch.bfloat16)
    slots = torch.randperm(nblocks * bs)[:t]
    slots[::7] = -1
    cache = torch.zeros(nblocks, hkv, bs, d + 8, dtype=torch.uint8, device="cuda")
    # key as a strided view of a fused qkv-like buffer, as vLLM passes it
    kv = torch.cat([key, value], dim=1).cuda()
    cuda_ops.kv4_cache_update(kv[:, :hkv], kv[:, hkv:], cache, slots.to(slot_dtype).cuda(),
                              hadamard_factor(d).cuda() if rot else None, clip)
    cache = cache.cpu()

    rows = torch.cat([pack_kv(r3(key, rot), clip), pack_kv(value.float(), clip)], -1)
    expect = torch.zeros_like(cache)
    valid = slots >= 0
    s = slots[valid]
    expect[s // bs, :, s % bs] = rows[valid]
    if not rot:
        assert torch.equal(cache, expect)
        return
    # R3's float32 sums differ in order from the reference: compare dequantized values
    half = d // 2 + 4
    got_k, exp_k = unpack_kv(cache[..., :half], d), unpack_kv(expect[..., :half], d)
    rng = (exp_k.amax(-1) - exp_k.amin(-1)).clamp(min=1e-3).unsqueeze(-1)
    assert ((got_k - exp_k).abs() / rng).max() < 0.1  # at most one code in 15
    assert ((got_k - exp_k).abs() > 1e-6).float().mean() < 1e-2
    assert torch.equal(cache[..., half:], expect[..., half:])


ATTN_CASES = [  # (heads, kv heads, head_dim, requests as (seq_len, query_len))
    (8, 8, 64, [(1, 1), (40, 1), (37, 5)]),
    (8, 2, 128, [(300, 1), (64, 64), (1000, 1)]),
    (12, 4, 64, [(17, 17), (530, 3)]),  # group of 3 (padded to 4 in the kernel)
    (32, 2, 128, [(2049, 1), (90, 2)]),  # group of 16
    (4, 4, 128, [(5000, 1)]),  # one long decode: split over the sequence
]


@pytest.mark.parametrize("h,hkv,d,reqs", ATTN_CASES)
@pytest.mark.parametrize("rot", [False, True])
def test_kv4_decode_attention(cuda_ops, h, hkv, d, reqs, rot):
    torch.manual_seed(h * d + len(reqs) + rot)
    bs, clip = 16, 1.0
    nblk = [-(-s // bs) for s, _ in reqs]
    nblocks = sum(nblk) + 3
    perm = torch.randperm(nblocks).int()
    block_table = torch.zeros(len(reqs), max(nblk), dtype=torch.int32)
    pos = 0
    for r, nb in enumerate(nblk):
        block_table[r, :nb] = perm[pos : pos + nb]
        pos += nb
    kv = torch.randn(nblocks, hkv, bs, 2, d)
    kv[..., 0, :] = r3(kv[..., 0, :], rot)
    cache = torch.cat([pack_kv(kv[..., 0, :], clip), pack_kv(kv[..., 1, :], clip)], -1)
    seq_lens = torch.tensor([s for s, _ in reqs], dtype=torch.int32)
    qsl = torch.tensor([0] + [q for _, q in reqs], dtype=torch.int32).cumsum(0).int()
    t = int(qsl[-1]) + 2  # two padding tokens past the last request
    query = torch.randn(t, h, d, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(d)

    ref = ref_attention(query, cache, block_table, seq_lens, qsl, scale, rot)
    out = cuda_ops.kv4_decode_attention(
        query.cuda(), cache.cuda(), block_table.cuda(), seq_lens.cuda(), qsl.cuda(), scale,
        hadamard_factor(d).cuda() if rot else None,
    ).cpu()
    assert out.shape == ref.shape and out.dtype == query.dtype
    torch.testing.assert_close(out[: int(qsl[-1])].float(), ref[: int(qsl[-1])].float(),
                               rtol=2e-2, atol=2e-2)
    assert not out[int(qsl[-1]) :].any()


def test_kv4_update_then_attention(cuda_ops):
    """The two KV4 kernels together, against the reference on the same inputs."""
    torch.manual_seed(3)
    h, hkv, d, bs, seq = 8, 2, 128, 16, 77
    nblocks = -(-seq // bs)
    key = torch.randn(seq, hkv, d, dtype=torch.float16)
    value = torch.randn(seq, hkv, d, dtype=torch.float16)
    cache = torch.zeros(nblocks, hkv, bs, d + 8, dtype=torch.uint8, device="cuda")
    had = hadamard_factor(d).cuda()
    slots = torch.arange(seq).cuda()
    cuda_ops.kv4_cache_update(key.cuda(), value.cuda(), cache, slots, had, 1.0)
    block_table = torch.arange(nblocks, dtype=torch.int32).unsqueeze(0)
    seq_lens = torch.tensor([seq], dtype=torch.int32)
    qsl = torch.tensor([0, 4], dtype=torch.int32)
    query = torch.randn(4, h, d, dtype=torch.float16)
    out = cuda_ops.kv4_decode_attention(query.cuda(), cache, block_table.cuda(),
                                        seq_lens.cuda(), qsl.cuda(), 0.1, had).cpu()
    ref = ref_attention(query, cache.cpu(), block_table, seq_lens, qsl, 0.1, True)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
