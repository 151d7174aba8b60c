"""Per-layer CPU speed of Rotated Runtime Smooth (``--smooth runtime``) next to plain
W4A4, both on the native kernels, side by side in one run.

Each layer is timed as the plugin runs it: plain W4A4 = ``quarot_cpu.linear`` ((R4 +)
per-token quantization + the integer GEMM of csrc/cpu/quarot_cpu.cpp); RRS =
``quarot_cpu.rrs_linear`` ((R4 +) gather into the smoothing order + smoothing +
quantization + the GEMM): with float factors (``factor_levels`` 0, format v7-v8) the
GEMM of csrc/cpu/rrs.cpp scales each group's partial sum; with integer factors (L = 16,
the v9 default) the codes carry the factors and the plain GEMM runs. Weights are cycled
over enough copies to exceed the last-level cache; the contenders alternate call by
call (same noise from the machine's other jobs), and each cell is the median of
per-round ratios and of times.

    .venv/bin/python benchmarks/rrs_layers.py --model smollm2 --group 64 --m 1 2048
    .venv/bin/python benchmarks/rrs_layers.py --model llama2-7b --group 128 --m 1 2048

Writes benchmarks/results/rrs_layers_<model>_g<G>.md and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch

from vllm_quarot.hadamard import hadamard_factor
from vllm_quarot.runtime.ops import cpu as cpu_ops

# (label, K, N, online R4): the linears vLLM runs (q/k/v and gate/up merged)
MODELS = {
    "smollm2": [("qkv_proj", 576, 960, False), ("o_proj", 576, 576, False),
                ("gate_up_proj", 576, 3072, False), ("down_proj (+R4)", 1536, 576, True)],
    "llama2-7b": [("qkv_proj", 4096, 12288, False), ("o_proj", 4096, 4096, False),
                  ("gate_up_proj", 4096, 22016, False),
                  ("down_proj (+R4)", 11008, 4096, True)],
}
CACHE_BYTES = 160 << 20


def _layer_fns(k: int, n: int, r4: bool, group: int, copies: int, levels: list[int]):
    """[plain, RRS at each of levels], each a list of ``copies`` callables."""
    g = torch.Generator().manual_seed(k + n)
    had = hadamard_factor(k, torch.float32) if r4 else None
    fns: list[list] = [[] for _ in range(1 + len(levels))]
    Q = torch.ops.quarot_cpu
    for _ in range(copies):
        w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, 1, generator=g) * 1e-2
        perm = torch.randperm(k, generator=g).int()
        wp, st = Q.repack_weight(w, 4), Q.repack_scale(s)
        fns[0].append(lambda x, wp=wp, st=st: Q.linear(x, had, wp, st, None, n, 4, 4, 0.9, None))
        for i, lv in enumerate(levels, 1):  # each contender streams its own copy
            rp = Q.rrs_repack_weight(w, perm)
            rs = Q.repack_scale(s) if lv else s.reshape(-1).contiguous()
            fns[i].append(lambda x, rp=rp, rs=rs, perm=perm, lv=lv: Q.rrs_linear(
                x, had, perm, rp, rs, None, n, 4, 0.9, group, lv))
    return fns


def _time(fns: list[list], x: torch.Tensor, seconds: float) -> list[tuple[float, float]]:
    """Alternating calls; per contender (median ms, median of per-round time ratios
    plain / contender = its speed relative to plain)."""
    for f in fns:
        for g in f[:2]:
            g(x)
    times: list[list[float]] = [[] for _ in fns]
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(times[0]) < 5:
        for j, f in enumerate(fns):
            a = time.perf_counter()
            f[i % len(f)](x)
            times[j].append(time.perf_counter() - a)
        i += 1

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]
    return [(med(t) * 1e3, med([p / q for p, q in zip(times[0], t, strict=True)])) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--group", type=int, default=64, help="smoothing group size")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2048])
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per cell")
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 16],
                    help="RRS contenders: 0 float factors, L integer factors 1..L")
    ap.add_argument("--isa", default=None, help="force a native path (avx2, scalar, ...)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    if not cpu_ops.AVAILABLE:
        raise SystemExit("the native CPU kernels are not built (vllm_quarot/_C_cpu missing)")
    if a.isa:
        cpu_ops.set_isa(a.isa)
    torch.manual_seed(0)
    head = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads, native path {cpu_ops.isa()}, {datetime.date.today()}")
    print(f"# RRS vs plain W4A4 per layer: {head}", flush=True)
    names = [f"RRS g{a.group} " + (f"int factors 1..{lv}" if lv else "float factors")
             for lv in a.levels]
    rows = []
    for label, k, n, r4 in MODELS[a.model]:
        copies = max(2, math.ceil(CACHE_BYTES / (k * n // 2)))
        fns = _layer_fns(k, n, r4, a.group, copies, a.levels)
        for m in a.m:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            res = _time(fns, x, a.seconds)
            rows.append((label, k, n, m, res))
            print(f"{label:16s} M={m:<5d} plain {res[0][0]:8.3f} ms  " + "  ".join(
                f"{nm} {t:8.3f} ms ({r:.3f}×)" for nm, (t, r) in zip(names, res[1:], strict=True)),
                flush=True)
    lines = [f"| layer ({a.model}) | K→N | M | plain W4A4 ms | "
             + " | ".join(f"{nm} ms | speed / plain" for nm in names) + " |",
             "|---|---|---:|---:|" + "---:|---:|" * len(names)]
    lines += [f"| {lb} | {k}→{n} | {m} | {res[0][0]:.3f} | "
              + " | ".join(f"{t:.3f} | {r:.3f}×" for t, r in res[1:]) + " |"
              for lb, k, n, m, res in rows]
    table = "\n".join(lines)
    print("\n" + table)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"rrs_layers_{a.model}_g{a.group}{'_' + a.isa if a.isa else ''}.md"
    path.write_text(
        f"# Rotated Runtime Smooth vs plain W4A4, per layer ({head})\n\n"
        f"Command: `.venv/bin/python benchmarks/rrs_layers.py {' '.join(sys.argv[1:])}`\n\n"
        "Both native (csrc/cpu); each time includes the activation quantization (and the "
        "fused R4 Hadamard for down_proj); the contenders alternate call by call, medians; "
        "'speed / plain' is the median of per-round time ratios plain/RRS (> 1: RRS faster). "
        "The machine is shared with other jobs.\n\n" + table + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
