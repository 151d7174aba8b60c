"""The GPU kernels versus torch's bf16 matmul (cuBLAS) at Llama-2-7B linear shapes.

    .venv/bin/python benchmarks/cuda_kernels.py [--ms 1,16,256,2048,8192] [--iters 50]

Needs a CUDA GPU (exits with status 1 without one). For each (in -> out) shape and batch
M it times, with CUDA events (median of --iters runs):
  * bf16: torch.nn.functional.linear(x, w) with x, w in bfloat16;
  * Triton (the path the plugin serves with on GPUs, vllm_quarot/triton_ops.py):
    quarot_triton.quantize (online Hadamard only for 11008 -> 4096: down_proj, R4,
    K = 172 x 64) and quarot_triton.gemm (int8 tensor cores on 4-bit weights) -> bf16;
    the quantize once more with the Hadamard's dots on tensor cores (3xTF32) instead of
    FMA units; and the W4A16 GEMM (codes dequantized in the kernel);
  * CUDA C++ (csrc/cuda, experimental): hadamard_quantize + w4a4_gemm, when the
    extension builds (torch.utils.cpp_extension.load unless vllm_quarot._C_cuda exists);
and prints each W4A4 layer time (quant + gemm), its speedup over bf16 and the share of
quant in the layer. The table is also written to
benchmarks/results/cuda_kernels_<device name>.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in_features, out_features)


def load_cuda_ops():
    """The csrc/cuda ops, or None (with the reason printed) when they do not build."""
    try:
        torch.ops.quarot_cuda.w4a4_gemm  # noqa: B018
        return torch.ops.quarot_cuda
    except (AttributeError, RuntimeError):
        pass
    try:
        import vllm_quarot._C_cuda  # noqa: F401
    except ImportError:
        from torch.utils.cpp_extension import load

        print("building csrc/cuda with torch.utils.cpp_extension.load ...", flush=True)
        try:
            load(name="quarot_cuda", sources=[str(p) for p in sorted(CUDA_DIR.glob("*.cu"))],
                 extra_include_paths=[str(CUDA_DIR)], extra_cuda_cflags=["-O3"],
                 is_python_module=False)
        except Exception as exc:  # noqa: BLE001 - report and time the Triton path alone
            print(f"csrc/cuda did not build ({exc}); timing the Triton kernels only",
                  file=sys.stderr)
            return None
    return torch.ops.quarot_cuda


def time_ms(fn, iters: int) -> float:
    """Median time of fn() in milliseconds (CUDA events, after warm-up)."""
    for _ in range(max(3, iters // 10)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_shape(cuda_ops, k: int, n: int, m: int, iters: int, had: bool,
                dev: str = "cuda", time_ms=time_ms) -> dict:
    """One row of the table (dev/time_ms are swapped for a CPU smoke test in tests/)."""
    from vllm_quarot.hadamard import hadamard_factor
    from vllm_quarot.runtime.ops import triton as tk

    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    w_codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    w_scale = torch.rand(n, 1) * 1e-2
    r = {"k": k, "n": n, "m": m, "had": had}
    r["bf16"] = time_ms(lambda: torch.nn.functional.linear(x, w), iters)

    w_t = tk.repack_weight(w_codes, 4).to(dev)
    ws_t = tk.repack_scale(w_scale).to(dev)
    codes, scales = tk.quantize_impl(x, had, 4, 1.0)
    r["tq"] = time_ms(lambda: tk.quantize_impl(x, had, 4, 1.0), iters)
    # the Hadamard's float32 dots on tensor cores (3×TF32) instead of FMA units
    r["tq3"] = time_ms(lambda: tk.quantize_impl(x, had, 4, 1.0, "tf32x3"), iters)
    r["tg"] = time_ms(lambda: tk.gemm_impl(codes, scales, w_t, ws_t, None, 4, torch.bfloat16),
                      iters)

    def triton_layer():
        c, s = tk.quantize_impl(x, had, 4, 1.0)
        return tk.gemm_impl(c, s, w_t, ws_t, None, 4, torch.bfloat16)

    r["tl"] = time_ms(triton_layer, iters)
    r["w16"] = time_ms(lambda: tk.gemm_impl(x, None, w_t, ws_t, None, 4, torch.bfloat16),
                       iters)
    if cuda_ops is not None:
        hk = hadamard_factor(k).to(dev) if had else None
        w4 = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
        ws = w_scale.to(dev)
        c4, s4 = cuda_ops.hadamard_quantize(x, hk, 4, 1.0)
        r["cq"] = time_ms(lambda: cuda_ops.hadamard_quantize(x, hk, 4, 1.0), iters)
        r["cg"] = time_ms(
            lambda: cuda_ops.w4a4_gemm(c4, s4, w4, ws, None, torch.bfloat16), iters)

        def cuda_layer():
            c, s = cuda_ops.hadamard_quantize(x, hk, 4, 1.0)
            return cuda_ops.w4a4_gemm(c, s, w4, ws, None, torch.bfloat16)

        r["cl"] = time_ms(cuda_layer, iters)
    return r


def markdown(rows: list[dict], device: str) -> str:
    cuda = "cl" in rows[0]
    lines = [
        f"GPU kernels vs torch bf16 linear (cuBLAS) on {device} "
        f"(torch {torch.__version__}, CUDA {torch.version.cuda}); median of CUDA-event timings.",
        "",
        "quant = (online Hadamard only for 11008 -> 4096, K = 172 x 64 +) per-token quantize; "
        "W4A4 layer = quant + gemm, timed together; W4A16 = weight-only GEMM.",
        "",
        "| in -> out | M | bf16 ms | Triton quant ms | Triton gemm ms | Triton W4A4 layer ms "
        "| Triton vs bf16 | gemm-only vs bf16 | quant share | quant ms, tf32x3 "
        "| Triton W4A16 vs bf16 |"
        + (" CUDA C++ layer ms | CUDA C++ vs bf16 | CUDA C++ quant share |" if cuda else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|---:|" if cuda else ""),
    ]
    for r in rows:
        name = f"{r['k']} -> {r['n']}" + (" (+Had)" if r["had"] else "")
        line = (
            f"| {name} | {r['m']} | {r['bf16']:.4f} | {r['tq']:.4f} | {r['tg']:.4f} "
            f"| {r['tl']:.4f} | {r['bf16'] / r['tl']:.2f}x | {r['bf16'] / r['tg']:.2f}x "
            f"| {100 * r['tq'] / (r['tq'] + r['tg']):.0f}% | {r['tq3']:.4f} "
            f"| {r['bf16'] / r['w16']:.2f}x |"
        )
        if cuda:
            line += (f" {r['cl']:.4f} | {r['bf16'] / r['cl']:.2f}x "
                     f"| {100 * r['cq'] / (r['cq'] + r['cg']):.0f}% |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,16,256,2048,8192", help="batch sizes M, comma-separated")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="markdown file (default: results/)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/cuda_kernels.py: no CUDA device (torch.cuda.is_available() is "
              "False); the CUDA kernels can only be timed on a GPU.", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    cuda_ops = load_cuda_ops()
    rows = []
    for k, n in SHAPES:
        for m in (int(v) for v in args.ms.split(",")):
            r = bench_shape(cuda_ops, k, n, m, args.iters, had=k == 11008)
            rows.append(r)
            print(f"{k:>5} -> {n:<5} M={m:<5} bf16 {r['bf16']:.4f} ms | Triton quant "
                  f"{r['tq']:.4f} + gemm {r['tg']:.4f} = layer {r['tl']:.4f} ms | "
                  f"{r['bf16'] / r['tl']:.2f}x", flush=True)
    table = markdown(rows, device)
    print()
    print(table)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    out = args.out or ROOT / "benchmarks" / "results" / f"cuda_kernels_{slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
