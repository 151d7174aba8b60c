"""Per-layer CPU speed: our native W4A4, W4A8 and W8A8 linears vs bf16 and vLLM's int8 W8A8,
side by side; also QuaRot W4A16 as the plugin serves it on this CPU (the kernel its
chooser picks: vLLM's CPUWNA16 where this vLLM build has it, else the reference ops).

Llama-2-7B shapes (4096→4096 q/k/v/o, 4096→11008 gate/up, 11008→4096 down_proj with
the online R4 Hadamard of 11008 = 172·64 fused into quantization). Every contender's
time includes its activation quantization. Weights are cycled over enough copies to
exceed the last-level cache, as in a real model where each layer's weights are read
once per step. Prints a markdown table of times and speed-ups and saves a PNG plot.

    .venv/bin/python benchmarks/cpu_layers.py [--m 1 16 128 2048] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import vllm._custom_ops as vops
from common import kernel_layer, single_process_group

from vllm_quarot.hadamard import hadamard_factor
from vllm_quarot.runtime.kernels import LinearConfig, NativeCPULinearKernel
from vllm_quarot.runtime.ops import cpu as cpu_ops
from vllm_quarot.runtime.ops import reference as ops

SHAPES = [("q/k/v/o", 4096, 4096), ("gate/up", 4096, 11008), ("down (+R4)", 11008, 4096)]
CACHE_BYTES = 160 << 20  # > 32 MiB L3 several times over


def _timeit(fns, seconds: float) -> float:
    """Median ms per call, cycling through fns (one per weight copy)."""
    for f in fns[:2]:
        f()
    times = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(times) < 3:
        t = time.perf_counter()
        fns[i % len(fns)]()
        times.append(time.perf_counter() - t)
        i += 1
    times.sort()
    return times[len(times) // 2] * 1e3


def contenders(k: int, n: int, copies: int, r4: bool):
    """name -> list of closures x -> y, one per weight copy."""
    g = torch.Generator().manual_seed(0)
    had = hadamard_factor(k, torch.float32) if r4 else None
    out = {"torch bf16": [], "vLLM oneDNN bf16": [], "vLLM W8A8 (int8)": [],
           "QuaRot W8A8 native": [], "QuaRot W4A4 torch ops": [], "QuaRot W4A4 native": [],
           "QuaRot W4A8 native": [], "QuaRot W4A16": []}

    def cfg(w_bits: int, a_bits: int | None) -> LinearConfig:
        return LinearConfig(w_bits, -1, a_bits, 1.0, False, k, n, torch.bfloat16,
                            k if r4 else 0, "cpu")
    w16_kernel = ""
    for _ in range(copies):
        w = torch.randn(n, k, generator=g, dtype=torch.bfloat16) * 0.02
        out["torch bf16"].append(lambda x, w=w: torch.nn.functional.linear(x, w))
        try:  # oneDNN has no bf16 matmul on CPUs without AVX-512 BF16 / AMX
            h = vops.create_onednn_mm(w.t(), 32)
            out["vLLM oneDNN bf16"].append(lambda x, h=h: vops.onednn_mm(h, x, None))
        except RuntimeError:
            out.pop("vLLM oneDNN bf16", None)
        w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s8 = torch.rand(n, generator=g) * 1e-3
        h8 = vops.create_onednn_scaled_mm(w8.t(), s8, torch.bfloat16, True, False, 32)

        def w8a8(x, h8=h8):
            xq, xs, _ = vops.onednn_scaled_int8_quant(x, None, None, True)
            o = torch.empty((x.shape[0], n), dtype=x.dtype)
            vops.onednn_scaled_mm(h8, xq, o, xs, None, None, None)
            return o
        out["vLLM W8A8 (int8)"].append(w8a8)
        out["QuaRot W8A8 native"].append(kernel_layer(
            NativeCPULinearKernel, cfg(8, 8), w8, s8.reshape(n, 1).float())[0])
        w4 = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        s4 = torch.rand(n, 1, generator=g) * 1e-2

        def ref(x, w4=w4, s4=s4):
            xr = ops.hadamard(x, had) if r4 else x
            return ops.int_linear(*ops.quantize_per_token(xr, 4, 1.0), w4, s4, None, x.dtype)
        out["QuaRot W4A4 torch ops"].append(ref)
        wp, st = torch.ops.quarot_cpu.repack_weight(w4, 4), torch.ops.quarot_cpu.repack_scale(s4)
        out["QuaRot W4A4 native"].append(
            lambda x, wp=wp, st=st: torch.ops.quarot_cpu.linear(x, had, wp, st, None, n, 4, 4,
                                                                1.0, None))
        out["QuaRot W4A8 native"].append(
            lambda x, wp=wp, st=st: torch.ops.quarot_cpu.linear(x, had, wp, st, None, n, 4, 8,
                                                                1.0, None))
        w4a16, w16_kernel = kernel_layer(None, cfg(4, None), w4, s4)  # as the plugin serves
        out["QuaRot W4A16"].append(w4a16)
    print(f"{k}→{n}: QuaRot W4A16 runs on {w16_kernel}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 2048])
    ap.add_argument("--seconds", type=float, default=2.0, help="time budget per cell")
    ap.add_argument("--shapes", nargs="+", default=[label for label, _, _ in SHAPES],
                    help="subset of: " + ", ".join(label for label, _, _ in SHAPES))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if not cpu_ops.AVAILABLE:
        raise SystemExit("the native CPU kernels are not built (vllm_quarot/_C_cpu missing)")
    with single_process_group():
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    print(f"# CPU per-layer benchmark: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, kernels: {cpu_ops.isa()}")
    rows, speedups = [], {}
    for label, k, n in [sh for sh in SHAPES if sh[0] in args.shapes]:
        copies = max(2, math.ceil(CACHE_BYTES / (2 * k * n)))
        cands = contenders(k, n, copies, r4=label.startswith("down"))
        for m in args.m:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            t = {name: _timeit([lambda f=f, x=x: f(x) for f in fns], args.seconds)
                 for name, fns in cands.items()}
            base = t["torch bf16"]
            rows.append((f"{k}→{n}", m, t, base))
            speedups.setdefault(label, []).append(base / t["QuaRot W4A4 native"])
            print(f"{label:11s} M={m:<5d} " + "  ".join(f"{nm}: {v:8.3f} ms"
                                                      for nm, v in t.items()), flush=True)
    names = list(rows[0][2])
    nan = float("nan")
    lines = ["| layer | M | " + " | ".join(f"{nm} ms" for nm in names)
             + " | W4A4 native vs torch bf16 | vs vLLM oneDNN bf16 | vs vLLM W8A8 "
             "| QuaRot W8A8 native vs vLLM W8A8 | W4A16 vs torch bf16 | W4A8 / W4A4 time |",
             "|---|---:|" + "---:|" * (len(names) + 6)]
    for shape, m, t, base in rows:
        ours = t["QuaRot W4A4 native"]
        lines.append(f"| {shape} | {m} | " + " | ".join(f"{t[nm]:.3f}" for nm in names)
                     + f" | {base / ours:.2f}× | {t.get('vLLM oneDNN bf16', nan) / ours:.2f}× | "
                     f"{t['vLLM W8A8 (int8)'] / ours:.2f}× "
                     f"| {t['vLLM W8A8 (int8)'] / t['QuaRot W8A8 native']:.2f}× "
                     f"| {base / t['QuaRot W4A16']:.2f}× "
                     f"| {t['QuaRot W4A8 native'] / ours:.2f} |")
    table = "\n".join(lines)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_layers.md").write_text(
        f"# CPU per-layer benchmark ({torch.get_num_threads()} threads, "
        f"kernels {cpu_ops.isa()})\n\nCommand: `.venv/bin/python benchmarks/cpu_layers.py "
        f"{' '.join(sys.argv[1:])}`"
        f"\n\nTimes are medians; each includes the activation quantization (and the R4 "
        f"Hadamard for down_proj).\n\n{table}\n")
    _plot(speedups, args.m, args.out / "cpu_layers.png")
    print(f"\nsaved {args.out / 'cpu_layers.md'} and {args.out / 'cpu_layers.png'}")


def _plot(speedups: dict[str, list[float]], ms: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, s in speedups.items():
        ax.plot(ms, s, marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per call (M)")
    ax.set_ylabel("speed-up vs torch bf16")
    ax.set_title("QuaRot W4A4 native CPU linear (Llama-2-7B shapes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
