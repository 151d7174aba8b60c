"""This machine's limits for the CPU kernels: the int8 multiply-accumulate peak of each
instruction sequence the GEMM uses, and the read bandwidth that bounds a decode step.

Sequences (csrc/cpu/peak.cpp, ``torch.ops.quarot_cpu.peak``), each with enough
independent accumulators to hide its latency, in the GEMM's shape (one weight vector
times several rows' activations), on 1 thread and on all threads at once:

* ``avx2_maddubs`` — vpmaddubsw + vpmaddwd + vpaddd on ymm (the AVX2 path): 32 MACs;
* ``avx2_maddubs_i16`` — vpmaddubsw + vpaddw, summing in int16 (the widening vpmaddwd
  once per 4 k-steps, left out here): the AVX2 path on 2+ rows;
* ``avx512_vnni`` — vpdpbusd zmm (the AVX512-VNNI path): 64 MACs;
* ``amx_int8`` — tdpbsud on 16×64 by 64×16 byte tiles (the AMX path, M ≥ 16): 16384 MACs.

Bandwidth: one pass of 64-byte vector loads over a buffer larger than the last-level
cache (default 2 GiB), split between the threads — what streaming a model's 4-bit
weights once per decode step costs at best. From it, the weight-streaming bound of a
batch-1 decode step for the 1.1B Llama shape and SmolLM2 (bytes of all linear weights
+ lm_head read once per token).

The machine is shared: each figure is measured ``--repeats`` times; the table shows the
best (the peak: interference only slows a run down) and the median. Writes
``cpu_peak.md`` and ``cpu_peak.json`` into the machine's results folder.

    .venv/bin/python benchmarks/cpu_peak.py [--repeats 7] [--out benchmarks/results/TAG]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from vllm_quarot.runtime.ops import cpu as cpu_ops

SEQS = {"avx2_maddubs": "avx2", "avx2_maddubs_i16": "avx2", "avx512_vnni": "avx512_vnni",
        "amx_int8": "amx"}
FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
         "amx_tile", "amx_int8", "amx_bf16")

# Linear-layer shapes per decoder layer (K, N) and the rest, per model: what a batch-1
# decode step reads once.
MODELS = {
    "Llama 1.1B (TinyLlama shape)": dict(hidden=2048, inter=5632, heads=32, kv_heads=4,
                                         layers=22, vocab=32000),
    "SmolLM2-135M": dict(hidden=576, inter=1536, heads=9, kv_heads=3, layers=30,
                         vocab=49152),
}


def machine_tag() -> str:
    """Results folder name: 'spr-avx512' (AVX-512 with AMX-INT8, Sapphire Rapids and
    later), 'avx512' (AVX512-VNNI, no AMX), 'avx2' or 'scalar'."""
    isas = cpu_ops.supported_isas()
    if "amx" in isas:
        return "spr-avx512"
    return next((i.split("_")[0] for i in isas if i != "scalar"), "scalar")


def machine_info() -> str:
    """'MODEL NAME, N cores; flags: ...' from lscpu (the flags the kernels care about)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = set(fields.get("Flags", "").split())
    have = [f for f in FLAGS if f in flags]
    return (f"{model}, {os.cpu_count()} cores; flags: {' '.join(have)}; "
            f"kernels: {', '.join(cpu_ops.supported_isas())}")


def header(command: str) -> str:
    return (f"Command: `{command}`\n\nMachine: {machine_info()}\n\n"
            f"Date: {datetime.date.today().isoformat()}\n")


def weight_bytes(cfg: dict, w_bits: float, head_bits: float) -> float:
    """Bytes of the linear layers' weights (+ the lm_head) read per decode step."""
    h, i, hd = cfg["hidden"], cfg["inter"], cfg["hidden"] // cfg["heads"]
    per_layer = h * (cfg["heads"] * hd + 2 * cfg["kv_heads"] * hd) + cfg["heads"] * hd * h \
        + 3 * h * i
    return (cfg["layers"] * per_layer * w_bits + cfg["vocab"] * h * head_bits) / 8


def _measure(fn, repeats: int) -> dict:
    vals = [fn() for _ in range(repeats)]
    return {"best": max(vals), "median": statistics.median(vals)}


def measure(repeats: int, buf_gib: float, threads: list[int]) -> dict:
    q = torch.ops.quarot_cpu
    res: dict = {"macs": {}, "read_bytes_per_s": {}}
    have = cpu_ops.supported_isas()
    for seq, isa in SEQS.items():
        if isa not in have:
            continue
        iters = 50_000 if seq == "amx_int8" else 1_000_000
        for t in threads:
            print(f"  {seq} × {t} threads ...", flush=True)
            q.peak(seq, t, iters // 10)  # warm-up (frequency, AMX state)
            res["macs"][f"{seq}/{t}"] = _measure(
                lambda s=seq, t=t, n=iters: q.peak(s, t, n), repeats)
    buf = torch.ones(int(buf_gib * 2**30), dtype=torch.uint8)
    for t in threads:
        print(f"  read bandwidth × {t} threads over {buf_gib:g} GiB ...", flush=True)
        res["read_bytes_per_s"][str(t)] = _measure(
            lambda t=t: q.read_bandwidth(buf, t, 1), repeats)
    return res


def table(res: dict, threads: list[int]) -> str:
    lines = ["| sequence | " + " | ".join(f"{t} thread{'s' * (t > 1)}: best (median) GMAC/s"
                                         for t in threads) + " |",
             "|---|" + "---:|" * len(threads)]
    for seq in SEQS:
        cells = [res["macs"].get(f"{seq}/{t}") for t in threads]
        if cells[0] is None:
            continue
        lines.append(f"| {seq} | " + " | ".join(
            f"{c['best'] / 1e9:.0f} ({c['median'] / 1e9:.0f})" for c in cells) + " |")
    bw = res["read_bytes_per_s"]
    lines.append("| read bandwidth (GB/s) | " + " | ".join(
        f"{bw[str(t)]['best'] / 1e9:.1f} ({bw[str(t)]['median'] / 1e9:.1f})" for t in threads)
        + " |")
    best_bw = max(v["best"] for v in bw.values())
    lines += ["", "Weight-streaming bound of a batch-1 decode step (linear weights + lm_head "
              f"read once per token, at the best read bandwidth, {best_bw / 1e9:.1f} GB/s):", "",
              "| model | weights | MB per token | bound (tok/s) |", "|---|---|---:|---:|"]
    for name, cfg in MODELS.items():
        for label, wb, hb in (("bf16", 16, 16), ("QuaRot W4 + W8 lm_head", 4, 8)):
            b = weight_bytes(cfg, wb, hb)
            lines.append(f"| {name} | {label} | {b / 1e6:.0f} | {best_bw / b:.1f} |")
    return "\n".join(lines)


def load(path: Path) -> dict:
    """The JSON a run wrote (cpu_layers.py reads the peaks from it)."""
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--buffer-gib", type=float, default=2.0)
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results/<machine tag>)")
    a = ap.parse_args()
    if not cpu_ops.AVAILABLE:
        raise SystemExit("the native CPU kernels are not built (vllm_quarot/_C_cpu missing)")
    out = a.out or Path("benchmarks/results") / machine_tag()
    print(f"# {machine_info()}", flush=True)
    res = measure(a.repeats, a.buffer_gib, a.threads)
    res["threads"] = a.threads
    res["machine"] = machine_info()
    tab = table(res, a.threads)
    print(tab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_peak.json").write_text(json.dumps(res, indent=1))
    cmd = ".venv/bin/python benchmarks/cpu_peak.py " + " ".join(sys.argv[1:])
    (out / "cpu_peak.md").write_text(
        f"# Int8 MAC peak and read bandwidth\n\n{header(cmd.strip())}\n"
        f"Best of {a.repeats} runs (median in brackets); 1 MAC = 2 int ops.\n\n{tab}\n")
    print(f"wrote {out / 'cpu_peak.md'} and {out / 'cpu_peak.json'}")


if __name__ == "__main__":
    main()
