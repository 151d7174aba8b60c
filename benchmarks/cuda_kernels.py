"""W4A4 CUDA kernels (csrc/cuda) versus torch's bf16 matmul at Llama-2-7B linear shapes.

    .venv/bin/python benchmarks/cuda_kernels.py [--ms 1,16,256,2048,8192] [--iters 50]

Needs a CUDA GPU (exits with status 1 without one). Builds the extension with
torch.utils.cpp_extension.load unless `vllm_quarot._C_cuda` is installed. For each
(in -> out) shape and batch M it times, with CUDA events (median of --iters runs):
  * bf16: torch.nn.functional.linear(x, w) with x, w in bfloat16;
  * quant: quarot_cuda.hadamard_quantize(x) -> packed int4 codes and per-token scales,
    with the online Hadamard (K = 172 × 64) only for 11008 -> 4096 (down_proj, R4);
  * gemm: quarot_cuda.w4a4_gemm(codes, scales, w4, w_scale) -> bf16;
and prints the W4A4 layer time (quant + gemm), the speedup over bf16 and the share of
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


def load_ops():
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
        load(name="quarot_cuda", sources=[str(p) for p in sorted(CUDA_DIR.glob("*.cu"))],
             extra_include_paths=[str(CUDA_DIR)], extra_cuda_cflags=["-O3"],
             is_python_module=False)
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


def bench_shape(qops, k: int, n: int, m: int, iters: int) -> dict:
    from vllm_quarot.hadamard import hadamard_factor

    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    w4 = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
    w_scale = torch.rand(n, 1, device=dev) * 1e-2
    had = hadamard_factor(k).to(dev) if k == 11008 else None

    t_bf16 = time_ms(lambda: torch.nn.functional.linear(x, w), iters)
    codes, scales = qops.hadamard_quantize(x, had, 4, 1.0)
    t_quant = time_ms(lambda: qops.hadamard_quantize(x, had, 4, 1.0), iters)
    t_gemm = time_ms(
        lambda: qops.w4a4_gemm(codes, scales, w4, w_scale, None, torch.bfloat16), iters
    )

    def layer():
        c, s = qops.hadamard_quantize(x, had, 4, 1.0)
        return qops.w4a4_gemm(c, s, w4, w_scale, None, torch.bfloat16)

    t_layer = time_ms(layer, iters)
    return {"k": k, "n": n, "m": m, "had": had is not None, "bf16": t_bf16, "quant": t_quant,
            "gemm": t_gemm, "layer": t_layer}


def tops(m: int, n: int, k: int, ms: float) -> float:
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"W4A4 CUDA kernels vs torch bf16 linear on {device} "
        f"(torch {torch.__version__}, CUDA {torch.version.cuda}); median of CUDA-event timings.",
        "",
        "quant = hadamard_quantize (online Hadamard only for 11008 -> 4096, K = 172 x 64); "
        "W4A4 layer = quant + w4a4_gemm, timed together.",
        "",
        "| in -> out | M | bf16 ms | bf16 TFLOP/s | quant ms | gemm ms | W4A4 layer ms "
        "| W4A4 TOP/s (gemm) | speedup (bf16 / layer) | gemm-only speedup | quant share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{r['k']} -> {r['n']}" + (" (+Had)" if r["had"] else "")
        lines.append(
            f"| {name} | {r['m']} | {r['bf16']:.4f} "
            f"| {tops(r['m'], r['n'], r['k'], r['bf16']):.1f} "
            f"| {r['quant']:.4f} | {r['gemm']:.4f} | {r['layer']:.4f} "
            f"| {tops(r['m'], r['n'], r['k'], r['gemm']):.1f} "
            f"| {r['bf16'] / r['layer']:.2f}x | {r['bf16'] / r['gemm']:.2f}x "
            f"| {100 * r['quant'] / (r['quant'] + r['gemm']):.0f}% |"
        )
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
    qops = load_ops()
    rows = []
    for k, n in SHAPES:
        for m in (int(v) for v in args.ms.split(",")):
            r = bench_shape(qops, k, n, m, args.iters)
            rows.append(r)
            print(f"{k:>5} -> {n:<5} M={m:<5} bf16 {r['bf16']:.4f} ms | quant {r['quant']:.4f} "
                  f"+ gemm {r['gemm']:.4f} = layer {r['layer']:.4f} ms | "
                  f"{r['bf16'] / r['layer']:.2f}x", flush=True)
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
