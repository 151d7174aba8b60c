"""A/B of two builds of the native CPU GEMM (``torch.ops.quarot_cpu.gemm``, or with
``--op rrs`` the RRS GEMM ``rrs_gemm`` of csrc/cpu/rrs.cpp), interleaved.

A kernel change is measured against the build before it on the same machine in one run:
each build is a checkout with its own ``vllm_quarot/_C_cpu*.so`` (``setup.py build_ext
--inplace`` there); the script times every shape in one subprocess per build and round,
alternating the builds ``--rounds`` times so that the load of a shared machine falls on
both alike, and prints the medians and B's speed-up over A.

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && \\
        ../path/.venv/bin/python setup.py build_ext --inplace)
    .venv/bin/python benchmarks/cpu_gemm_ab.py --a /tmp/before --b . [--threads 1] [--op rrs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

# (M, K, N, groups, weight bits, activation bits): Llama-2-7B q/k/v/o and gate/up, the
# 1.1B Llama's gate/up at 32 sequences, group-wise weights, a decode row
SHAPES = [(1, 4096, 4096, 1, 4, 8), (16, 4096, 4096, 1, 4, 8), (128, 4096, 4096, 1, 4, 8),
          (128, 4096, 11008, 1, 4, 8), (1024, 4096, 4096, 1, 4, 4),
          (32, 2048, 5632, 1, 4, 8), (128, 4096, 4096, 64, 4, 8), (128, 4096, 4096, 1, 8, 8)]
# RRS (M, K, N, group size, activation bits): SmolLM2's (576) and a 4096-wide layer's
# inputs, groups of 64 and 128, 4-bit codes (the RRS default) and 8-bit ones
RRS_SHAPES = [(1, 4096, 4096, 128, 4), (16, 4096, 4096, 128, 4), (128, 4096, 4096, 128, 4),
              (1024, 4096, 4096, 128, 4), (128, 576, 1536, 64, 4), (2048, 1536, 576, 64, 4),
              (128, 4096, 4096, 64, 8)]


def _time(fn, m: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(max(5, 256 // m)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _time_rrs(q) -> dict[str, float]:
    import torch

    out = {}
    for m, k, n, gs, ab in RRS_SHAPES:
        gen = torch.Generator().manual_seed(0)
        w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
        perm = torch.randperm(k, generator=gen).int()
        pk, ws = q.rrs_repack_weight(w, perm), torch.rand(n, generator=gen)
        codes, scales, asums = q.rrs_quantize(torch.randn(m, k, generator=gen), None, perm, ab,
                                              1.0, gs)
        out[f"RRS {m}x{k}x{n} gs{gs} W4A{ab}"] = _time(
            partial(q.rrs_gemm, codes, scales, asums, pk, ws, None, n, torch.bfloat16), m)
    return out


def _time_shapes(threads: int, op: str) -> dict[str, float]:
    """Median ms of each shape with the build on sys.path (the child's side)."""
    import torch

    import vllm_quarot.runtime.ops.cpu as cpu_ops

    if not cpu_ops.AVAILABLE:
        raise SystemExit(f"no native kernels in {Path(cpu_ops.__file__).parents[2]}")
    q = torch.ops.quarot_cpu
    torch.set_num_threads(threads)
    if op == "rrs":
        return _time_rrs(q)
    out = {}
    for m, k, n, g, wb, ab in SHAPES:
        gen = torch.Generator().manual_seed(0)
        lo = -(1 << (wb - 1))
        w = torch.randint(lo, -lo, (n, k), dtype=torch.int8, generator=gen)
        pk, sc = q.repack_weight(w, wb), q.repack_scale(torch.rand(n, g, generator=gen))
        codes, scales, asums = q.quantize(torch.randn(m, k, generator=gen), None, ab, 1.0,
                                          None, g)
        out[f"{m}x{k}x{n} g{g} W{wb}A{ab}"] = _time(
            partial(q.gemm, codes, scales, asums, pk, sc, None, n, wb, torch.bfloat16), m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, help="checkout of the build before (A)")
    ap.add_argument("--b", type=Path, help="checkout of the build after (B)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--op", choices=("gemm", "rrs"), default="gemm",
                    help="the plain GEMM (quarot_cpu.gemm) or the RRS one (rrs_gemm)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (Markdown)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_time_shapes(a.threads, a.op)))
        return
    if a.a is None or a.b is None:
        ap.error("--a and --b are required")
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for r in range(a.rounds):
        for tag, root in (("A", a.a), ("B", a.b)):
            print(f"round {r + 1}/{a.rounds}: build {tag} ({root})", flush=True)
            env = {**os.environ, "PYTHONPATH": str(root.resolve())}
            res = subprocess.run([sys.executable, __file__, "--child", "--threads",
                                  str(a.threads), "--op", a.op], env=env, capture_output=True,
                                 text=True)
            if res.returncode != 0:
                raise SystemExit(f"build {tag} failed: {res.stderr.strip().splitlines()[-1]}")
            runs[tag].append(json.loads(res.stdout.strip().splitlines()[-1]))
    lines = [f"{a.threads} thread(s), medians over {a.rounds} interleaved rounds; "
             f"A = {a.a}, B = {a.b}", "",
             "| shape (M×K×N, groups, bits) | A ms | B ms | B speed-up |", "|---|---:|---:|---:|"]
    for shape in runs["A"][0]:
        ta = statistics.median(r[shape] for r in runs["A"])
        tb = statistics.median(r[shape] for r in runs["B"])
        lines.append(f"| {shape} | {ta:.2f} | {tb:.2f} | {ta / tb:.2f}× |")
    print("\n" + "\n".join(lines))
    if a.out:
        from cpu_peak import header

        cmd = ".venv/bin/python benchmarks/cpu_gemm_ab.py " + " ".join(sys.argv[1:])
        a.out.write_text(f"# Native GEMM, two builds\n\n{header(cmd)}\n" + "\n".join(lines)
                         + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
