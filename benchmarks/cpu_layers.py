"""Per-layer CPU speed: our native W4A4, W4A8 and W8A8 linears vs bf16 and vLLM's int8 W8A8,
side by side; also (--slow) QuaRot W4A16 as the plugin serves it on this CPU (the kernel
its chooser picks: vLLM's CPUWNA16 where this vLLM build has it, else the reference ops)
and the W4A4 PyTorch reference ops. Native W4A4 runs once per dispatch path the machine
has (amx, avx512_vnni, avx2), and each is given as a fraction of this machine's measured
int8 MAC peak for the instruction sequence it runs (benchmarks/cpu_peak.py's JSON, same
thread count) and of its read bandwidth (the layer's weight bytes over its time).

Llama-2-7B shapes (4096→4096 q/k/v/o, 4096→11008 gate/up, 11008→4096 down_proj with
the online R4 Hadamard of 11008 = 172·64 fused into quantization). Every contender's
time includes its activation quantization. Weights are cycled over enough copies to
exceed the last-level cache, as in a real model where each layer's weights are read
once per step. Prints a markdown table of times and speed-ups and saves a PNG plot.

``--decode MODEL`` instead times the linear layers of one batch-1 decode step of a model
shape (every decoder layer's merged qkv_proj, o_proj, merged gate_up_proj and down_proj
with its online R4, then the 8-bit lm_head, each with its own weights: the whole set is
read once per step, from DRAM) on each dispatch path, against the weight-streaming bound
(the step's weight bytes at cpu_peak.py's read bandwidth).

Contenders are timed round-robin (one call each in turn, medians), so that the load of
a shared machine falls on all of them alike.

    .venv/bin/python benchmarks/cpu_layers.py [--m 1 16 128 2048] [--threads 2]
        [--peak benchmarks/results/TAG/cpu_peak.json] [--out benchmarks/results/TAG]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import vllm._custom_ops as vops
from common import kernel_layer, single_process_group
from cpu_peak import header, machine_tag

from vllm_quarot.hadamard import hadamard_factor
from vllm_quarot.runtime.kernels import LinearConfig, NativeCPULinearKernel
from vllm_quarot.runtime.ops import cpu as cpu_ops
from vllm_quarot.runtime.ops import reference as ops

SHAPES = [("q/k/v/o", 4096, 4096), ("gate/up", 4096, 11008), ("down (+R4)", 11008, 4096)]
CACHE_BYTES = 160 << 20  # > 32 MiB L3 several times over


def _timeit_all(cands: dict[str, list], x: torch.Tensor, seconds: float,
                min_runs: int = 5) -> dict[str, float]:
    """Median ms per call of each contender, timed round-robin: one call of each in turn
    (cycling through its weight copies) until the budget is spent."""
    times: dict[str, list[float]] = {name: [] for name in cands}
    for fns in cands.values():  # warm-up
        fns[0](x)
    deadline = time.perf_counter() + seconds * len(cands)
    i = 0
    while time.perf_counter() < deadline or i < min_runs:
        for name, fns in cands.items():
            t = time.perf_counter()
            fns[i % len(fns)](x)
            times[name].append(time.perf_counter() - t)
        i += 1
    return {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}


def _with_isa(isa: str, f):
    def run(x, f=f):
        previous = cpu_ops.set_isa(isa)
        try:
            return f(x)
        finally:
            cpu_ops.set_isa(previous)
    return run


NATIVE = "QuaRot W4A4 native"


def contenders(k: int, n: int, copies: int, r4: bool, slow: bool):
    """name -> list of closures x -> y, one per weight copy."""
    g = torch.Generator().manual_seed(0)
    had = hadamard_factor(k, torch.float32) if r4 else None
    isas = [i for i in cpu_ops.supported_isas() if i != "scalar"]
    out: dict[str, list] = {"torch bf16": [], "vLLM oneDNN bf16": [], "vLLM W8A8 (int8)": [],
                            "QuaRot W8A8 native": []}
    out.update({f"{NATIVE} [{isa}]": [] for isa in isas})
    out["QuaRot W4A8 native"] = []
    if slow:
        out.update({"QuaRot W4A4 torch ops": [], "QuaRot W4A16": []})

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
        wp, st = torch.ops.quarot_cpu.repack_weight(w4, 4), torch.ops.quarot_cpu.repack_scale(s4)

        def native(x, wp=wp, st=st, a_bits=4):
            return torch.ops.quarot_cpu.linear(x, had, wp, st, None, n, 4, a_bits, 1.0, None)
        for isa in isas:
            out[f"{NATIVE} [{isa}]"].append(_with_isa(isa, native))
        out["QuaRot W4A8 native"].append(lambda x, f=native: f(x, a_bits=8))
        if slow:
            def ref(x, w4=w4, s4=s4):
                xr = ops.hadamard(x, had) if r4 else x
                return ops.int_linear(*ops.quantize_per_token(xr, 4, 1.0), w4, s4, None,
                                      x.dtype)
            out["QuaRot W4A4 torch ops"].append(ref)
            w4a16, w16_kernel = kernel_layer(None, cfg(4, None), w4, s4)  # as the plugin serves
            out["QuaRot W4A16"].append(w4a16)
    if slow:
        print(f"{k}→{n}: QuaRot W4A16 runs on {w16_kernel}", flush=True)
    return out


def _peak_seq(isa: str, m: int) -> str:
    """The instruction sequence the native GEMM runs on `isa` at M rows."""
    if isa == "amx":
        return "amx_int8" if m >= 16 else "avx512_vnni"
    if isa == "avx512_vnni":
        return "avx512_vnni"
    # tiles of 2+ rows sum vpmaddubsw's pairs in int16 (dot_avx2_w4_i16 / _w8_i16)
    return "avx2_maddubs_i16" if m >= 2 else "avx2_maddubs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 2048])
    ap.add_argument("--seconds", type=float, default=2.0, help="time budget per cell")
    ap.add_argument("--shapes", nargs="+", default=[label for label, _, _ in SHAPES],
                    help="subset of: " + ", ".join(label for label, _, _ in SHAPES))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--decode", choices=sorted(DECODE_MODELS), default=None,
                    help="time a batch-1 decode step's linear layers of this model shape")
    ap.add_argument("--steps", type=int, default=9, help="--decode: timed steps per path")
    ap.add_argument("--slow", action="store_true",
                    help="also QuaRot W4A16 and the W4A4 PyTorch reference ops")
    ap.add_argument("--peak", type=Path, default=None,
                    help="cpu_peak.py's JSON (default: the machine folder's cpu_peak.json)")
    ap.add_argument("--name", default="cpu_layers", help="result files' name (.md, .png)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results/<machine tag>)")
    args = ap.parse_args()
    args.out = args.out or Path("benchmarks/results") / machine_tag()
    torch.set_num_threads(args.threads)
    if args.decode:
        return decode_step(args)
    if not cpu_ops.AVAILABLE:
        raise SystemExit("the native CPU kernels are not built (vllm_quarot/_C_cpu missing)")
    with single_process_group():
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    peak_file = args.peak or args.out / "cpu_peak.json"
    peak = json.loads(peak_file.read_text()) if peak_file.is_file() else None
    if peak is None:
        print(f"({peak_file} missing: run benchmarks/cpu_peak.py first for the fractions)")
    t_key = str(args.threads)
    print(f"# CPU per-layer benchmark: {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, kernels: {cpu_ops.supported_isas()}")
    rows, speedups = [], {}
    for label, k, n in [sh for sh in SHAPES if sh[0] in args.shapes]:
        copies = max(2, math.ceil(CACHE_BYTES / (2 * k * n)))
        cands = contenders(k, n, copies, r4=label.startswith("down"), slow=args.slow)
        for m in args.m:
            if args.slow and m > 128:
                cands = {nm: f for nm, f in cands.items()
                         if nm not in ("QuaRot W4A4 torch ops", "QuaRot W4A16")}
            x = torch.randn(m, k, dtype=torch.bfloat16)
            t = _timeit_all(cands, x, args.seconds)
            best_isa = min((nm for nm in t if nm.startswith(NATIVE)), key=t.get)
            rows.append((f"{k}→{n}", m, k, n, t))
            speedups.setdefault(label, []).append(t["torch bf16"] / t[best_isa])
            print(f"{label:11s} M={m:<5d} " + "  ".join(f"{nm}: {v:8.3f} ms"
                                                      for nm, v in t.items()), flush=True)
    names = list(rows[0][4])
    lines = ["| layer | M | " + " | ".join(f"{nm} ms" for nm in names)
             + " | best W4A4 native vs torch bf16 | vs vLLM oneDNN bf16 | vs vLLM W8A8 "
             "| QuaRot W8A8 native vs vLLM W8A8 | W4A8 / W4A4 time |",
             "|---|---:|" + "---:|" * (len(names) + 5)]
    frac = ["| layer | M | path | ms | G int-op/s | instruction sequence | fraction of its "
            f"peak ({args.threads} threads) | weight GB/s | fraction of read bandwidth |",
            "|---|---:|---|---:|---:|---|---:|---:|---:|"]
    nan = float("nan")
    for shape, m, k, n, t in rows:
        natives = {nm: v for nm, v in t.items() if nm.startswith(NATIVE)}
        ours = min(natives.values())
        lines.append(f"| {shape} | {m} | " + " | ".join(f"{t[nm]:.3f}" for nm in names)
                     + f" | {t['torch bf16'] / ours:.2f}× "
                     f"| {t.get('vLLM oneDNN bf16', nan) / ours:.2f}× "
                     f"| {t['vLLM W8A8 (int8)'] / ours:.2f}× "
                     f"| {t['vLLM W8A8 (int8)'] / t['QuaRot W8A8 native']:.2f}× "
                     f"| {t['QuaRot W4A8 native'] / ours:.2f} |")
        for nm, ms in natives.items():
            isa = nm[nm.index("[") + 1:-1]
            seq = _peak_seq(isa, m)
            ops_s = 2 * m * k * n / (ms * 1e-3)
            gbs = k * n / 2 / (ms * 1e-3) / 1e9
            p = (peak or {}).get("macs", {}).get(f"{seq}/{t_key}")
            bw = (peak or {}).get("read_bytes_per_s", {}).get(t_key)
            frac.append(f"| {shape} | {m} | {isa} | {ms:.3f} | {ops_s / 1e9:.0f} | {seq} | "
                        + (f"{ops_s / (2 * p['best']):.1%}" if p else "n/a") + f" | {gbs:.1f} | "
                        + (f"{gbs * 1e9 / bw['best']:.1%}" if bw else "n/a") + " |")
    table, ftable = "\n".join(lines), "\n".join(frac)
    print()
    print(table)
    print()
    print(ftable)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = ".venv/bin/python benchmarks/cpu_layers.py " + " ".join(sys.argv[1:])
    peak_note = (f"Peaks: `{peak_file}` (best of its runs, {args.threads} threads: "
                 + ", ".join(f"{k.split('/')[0]} {v['best'] / 1e9:.0f} GMAC/s"
                             for k, v in peak["macs"].items() if k.endswith(f"/{t_key}"))
                 + f"; read {peak['read_bytes_per_s'][t_key]['best'] / 1e9:.1f} GB/s)."
                 if peak and t_key in peak.get("read_bytes_per_s", {}) else "Peaks: not measured.")
    (args.out / f"{args.name}.md").write_text(
        f"# CPU per-layer benchmark ({args.threads} threads)\n\n{header(cmd.strip())}\n"
        f"Times are medians of round-robin runs; each includes the activation quantization "
        f"(and the R4 Hadamard for down_proj). 1 MAC = 2 int ops.\n\n{table}\n\n"
        f"## Native W4A4 against this machine's limits\n\n{peak_note}\n\n{ftable}\n")
    _plot(speedups, args.m, args.out / f"{args.name}.png")
    print(f"\nsaved {args.out / args.name}.md and .png")


DECODE_MODELS = {"1.1b": "Llama 1.1B (TinyLlama shape)", "smollm2": "SmolLM2-135M"}


def decode_step(args: argparse.Namespace) -> None:
    """One batch-1 decode step's linear layers, per dispatch path, vs the weight bound."""
    from cpu_peak import MODELS, weight_bytes

    name = DECODE_MODELS[args.decode]
    cfg = MODELS[name]
    peak_file = args.peak or args.out / "cpu_peak.json"
    bw = json.loads(peak_file.read_text())["read_bytes_per_s"][str(args.threads)]["best"]
    h, i, hd = cfg["hidden"], cfg["inter"], cfg["hidden"] // cfg["heads"]
    shapes = [(h, (cfg["heads"] + 2 * cfg["kv_heads"]) * hd, 0), (cfg["heads"] * hd, h, 0),
              (h, 2 * i, 0), (i, h, i)] * cfg["layers"]
    q = torch.ops.quarot_cpu
    g = torch.Generator().manual_seed(0)
    layers = []
    print(f"building {len(shapes)} W4A4 layers + the W8A8 lm_head of {name} ...", flush=True)
    for k, n, r4 in shapes + [(h, cfg["vocab"], 0)]:
        bits = 8 if n == cfg["vocab"] else 4
        w = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8,
                          generator=g)
        had = hadamard_factor(k, torch.float32) if r4 else None
        layers.append((q.repack_weight(w, bits), q.repack_scale(torch.rand(n, 1, generator=g)),
                       n, bits, had, torch.randn(1, k, dtype=torch.bfloat16, generator=g)))
    nbytes = weight_bytes(cfg, 4, 8)

    def step() -> float:
        t = time.perf_counter()
        for wp, st, n, bits, had, x in layers:
            q.linear(x, had, wp, st, None, n, bits, 8 if bits == 8 else 4, 1.0, None)
        return time.perf_counter() - t

    isas = [i for i in cpu_ops.supported_isas() if i != "scalar"]
    times: dict[str, list[float]] = {isa: [] for isa in isas}
    for _ in range(args.steps):  # round-robin over the paths
        for isa in isas:
            previous = cpu_ops.set_isa(isa)
            times[isa].append(step())
            cpu_ops.set_isa(previous)
    lines = [f"Weights read per step: {nbytes / 1e6:.0f} MB; read bandwidth "
             f"{bw / 1e9:.1f} GB/s ({args.threads} threads, {peak_file}): bound "
             f"{bw / nbytes:.1f} steps/s.", "",
             "| path | step ms (median) | best | steps/s (median) | fraction of the bound |",
             "|---|---:|---:|---:|---:|"]
    for isa, ts in times.items():
        ts.sort()
        med = ts[len(ts) // 2]
        lines.append(f"| {isa} | {med * 1e3:.1f} | {ts[0] * 1e3:.1f} | {1 / med:.1f} | "
                     f"{nbytes / med / bw:.0%} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = ".venv/bin/python benchmarks/cpu_layers.py " + " ".join(sys.argv[1:])
    out = args.out / f"decode_step_{args.decode}_{args.threads}thread.md"
    out.write_text(f"# Batch-1 decode step, linear layers only: {name} (QuaRot W4A4, 8-bit "
                   f"lm_head)\n\n{header(cmd.strip())}\nEach step: every layer's own "
                   f"weights, read once (the set exceeds the caches); quantization and the "
                   f"online R4 included; medians of {args.steps} steps per path, "
                   f"round-robin.\n\n{table}\n")
    print(f"wrote {out}")


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
    ax.set_title("QuaRot W4A4 native CPU linear, fastest path (Llama-2-7B shapes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
