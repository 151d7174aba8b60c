"""Tensor parallelism on CPU: the 1.1B random Llama of cpu_e2e.py (32 heads, 4 KV heads)
in bf16 and quantized with `--tp 2` to QuaRot W4A4 (RTN), each at TP = 1 (both cores
computing) and TP = 2 (one core per rank, vLLM's mp executor), side by side in one run.

On 2 cores TP = 2 cannot beat TP = 1 (the same cores, plus an all-reduce per layer);
the point is that QuaRot serves under TP and keeps its ratio to bf16 there.

    .venv/bin/python benchmarks/cpu_tp.py [--decode-tokens 16] [--prefill]

bf16 GEMMs are slow on CPUs without AVX-512 BF16 (minutes per engine for the full
cpu_e2e.py measurement), so by default this decodes 16 tokens at batch 1 and 32 and
skips the 1024-token prefill.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cpu_e2e import CACHE, make_model, quantize_model, run_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--prefill", action="store_true", help="also a 1024-token prefill")
    a = ap.parse_args()
    bf16 = make_model(CACHE / "random-llama-1.1b")
    quarot = quantize_model(bf16, CACHE / "random-llama-1.1b-quarot-w4a4-rtn-tp2", tp=2)
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    res: dict[tuple[str, int], dict] = {}
    for tp, bind in ((1, "0-1"), (2, "0|1")):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        for name, model, q in (("bf16", bf16, None), ("QuaRot W4A4", quarot, "quarot")):
            print(f"running vLLM on {name} at TP = {tp} ...", flush=True)
            res[name, tp] = run_engine(model, q, False, tp, a.decode_tokens, a.prefill)
            print(name, tp, res[name, tp], flush=True)
    lines = ["| 1.1B Llama, vLLM CPU eager, 2 cores | bf16 TP=1 | W4A4 TP=1 | ratio | "
             "bf16 TP=2 | W4A4 TP=2 | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("decode tokens/s, batch 1", "decode_b1"),
            ("decode tokens/s, batch 32", "decode_b32"),
            ("peak RSS, all engine processes (GiB)", "peak_rss_gib")]
    if a.prefill:
        rows.insert(2, ("prefill tokens/s, 1024-token prompt", "prefill"))
    for label, key in rows:
        cells = []
        for tp in (1, 2):
            b, q = res["bf16", tp][key], res["QuaRot W4A4", tp][key]
            cells += [f"{b:.1f}", f"{q:.1f}", f"{q / b:.2f}×"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\n{table}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cpu_tp.md").write_text(
        "# Tensor parallelism on CPU (eager, 2 cores: TP=1 binds both, TP=2 one per rank)"
        f"\n\nCommand: `.venv/bin/python benchmarks/cpu_tp.py --decode-tokens "
        f"{a.decode_tokens}{' --prefill' if a.prefill else ''}`\n\n{table}\n")


if __name__ == "__main__":
    main()
