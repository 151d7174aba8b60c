"""The online Hadamard on the native CPU kernels: the fused per-token quantizer with and
without R4 (``torch.ops.quarot_cpu.quantize``, as every W4A4 / W4A8 linear runs it) and
the Hadamard op alone, per dispatch path, for the sizes that matter (Llama-2-7B's 4096
and 11008 = 172·64, SmolLM2's 1536 = 12·128). Prints a Markdown table of medians (ms)
and the K-part's GFMA/s (the dense K×K factor of 11008 is most of its cost).

    .venv/bin/python benchmarks/cpu_hadamard.py [--rows 128 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vllm_quarot.hadamard import hadamard_factor
from vllm_quarot.runtime.ops import cpu as cpu_ops


def _median_ms(fn, seconds: float) -> float:
    fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1536, 4096, 11008])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=1.0)
    a = ap.parse_args()
    if not cpu_ops.AVAILABLE:
        raise SystemExit("the native CPU kernels are not built (bash scripts/setup.sh)")
    torch.set_num_threads(a.threads)
    q = torch.ops.quarot_cpu
    isas = [i for i in q.supported_isas() if i != "scalar"]
    print(f"threads {a.threads}; paths {', '.join(isas)}; bf16 input; medians of "
          f"{a.seconds:g} s each\n")
    print("| size (K×2^k) | rows | path | quantize ms | quantize + R4 ms | R4 share | "
          "hadamard op ms | K-part GFMA/s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    default = q.isa()
    try:
        for n in a.sizes:
            had = hadamard_factor(n, torch.float32)
            kh = had.shape[0]
            for m in a.rows:
                x = torch.randn(m, n, dtype=torch.bfloat16)
                for isa in isas:
                    q.set_isa(isa)
                    t_q = _median_ms(lambda x=x: q.quantize(x, None, 4, 0.9, None, 1),
                                     a.seconds)
                    t_r4 = _median_ms(lambda x=x, h=had: q.quantize(x, h, 4, 0.9, None, 1),
                                      a.seconds)
                    t_h = _median_ms(lambda x=x, h=had: q.hadamard(x, h), a.seconds)
                    gfma = f"{m * n * kh / t_r4 / 1e6:.0f}" if kh > 1 else "–"
                    print(f"| {n} ({kh}×{n // kh}) | {m} | {isa} | {t_q:.2f} | {t_r4:.2f} | "
                          f"{(t_r4 - t_q) / t_r4:.0%} | {t_h:.2f} | {gfma} |")
    finally:
        q.set_isa(default)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
