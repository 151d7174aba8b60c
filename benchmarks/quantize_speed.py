"""How long `vllm-quarot quantize` takes and how much memory it needs: SmolLM2-135M and
random-weight Llama shapes of 1.1B (TinyLlama) and 7B (Llama-2-7B), QuaRot W4A4 with
RTN and GPTQ (the CLI's defaults otherwise), measured at small calibration sizes and
extrapolated to full depth and to the paper's 128 × 2048 calibration tokens.

Every model is *truncated* to --layers decoder layers (same hidden/intermediate/heads/
vocab; the real weights for SmolLM2, random bf16 ones for the Llama shapes), written
once under the cache dir as speed-<model>-L<k>. Each quantization runs in its own
subprocess (so its peak RSS is its own), timed by the quantizer's hook
(`quantize(..., on_step=...)`): each `layer.i` step (the layer's maths) and `save.i`
(its resumable-progress save: tensors plus the calibration activations, then the
hand-over to the checkpoint writer).

Extrapolation model (stated again under the tables):
  * per-layer seconds y(T) = a + b·T and fixed seconds f(T) = c + d·T, least-squares
    fits over the calibration sizes (T = samples × seqlen tokens); "per layer" is the
    mean over the measured layers after the first (the first layer's one-time warm-up
    is counted in the fixed part); total(L, T) = f(T) + L·y(T) at the real depth L;
  * peak RSS(T) = e + g·T fitted the same way, plus the checkpoint writer's growth
    with depth (it holds the output until a 5 GB shard is full): + min(ckpt(L), 5 GB)
    − min(ckpt(k), 5 GB), ckpt(L) from the measured bytes per layer;
  * Llama-2-70B: the 7B fit's per-layer seconds × the per-layer parameter ratio
    (4.23), fixed seconds × the embedding ratio (2): a rough scale-up.
RTN (w4a4) uses no calibration data, so it is run once per model, at no calibration.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantize_speed.py \\
        --models smollm2,1.1b,7b --methods rtn,gptq --layers 2 --calib-sizes 4x512,8x512

Writes benchmarks/results/quantize_speed_<device>.md and prints the same tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))
STORIES_HF = DATA / "stories260K" / "hf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
PAPER_CALIB = (128, 2048)  # QuaRot's GPTQ calibration: 128 windows of 2048 tokens
SHARD_BYTES = 5 * 10**9  # the CLI's --max-shard-size 5GB: the writer's in-memory buffer

# Llama shapes (random weights). "tiny" only tests this script.
SHAPES: dict[str, dict] = {
    "tiny": dict(label="tiny test shape", hidden=256, inter=512, layers=4, heads=4,
                 kv_heads=2, vocab=512, max_pos=2048),
    "1.1b": dict(label="TinyLlama-1.1B shape", hidden=2048, inter=5632, layers=22,
                 heads=32, kv_heads=4, vocab=32000, max_pos=4096),
    "7b": dict(label="Llama-2-7B shape", hidden=4096, inter=11008, layers=32, heads=32,
               kv_heads=32, vocab=32000, max_pos=4096),
}
LLAMA_70B = dict(label="Llama-2-70B shape", hidden=8192, inter=28672, layers=80, heads=64,
                 kv_heads=8, vocab=32000)
SMOLLM2 = dict(label="SmolLM2-135M", hidden=576, inter=1536, layers=30, heads=9, kv_heads=3,
               vocab=49152)


# ---------------------------------------------------------------------------- models

def layer_params(s: dict) -> int:
    """Weights of one decoder layer's linears (norms are negligible)."""
    hd = s["hidden"] // s["heads"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    return s["hidden"] * (q + 2 * kv) + q * s["hidden"] + 3 * s["hidden"] * s["inter"]


def _finish_dir(staging: Path, out: Path) -> Path:
    (staging / ".complete").write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return out


def random_llama(name: str, k: int, cache: Path) -> Path:
    """A random bf16 Llama with SHAPES[name] and k decoder layers (tokenizer:
    stories260K's, 512 tokens: ids fit any vocab, and only calibration is tokenized)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[name]
    out = cache / f"speed-{name}-L{k}"
    if (out / ".complete").is_file():
        return out
    print(f"building random {s['label']} with {k} layers in {out} ...", flush=True)
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=k, num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                      max_position_embeddings=s["max_pos"], rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for n, shape in shapes.items():
        if n.endswith("norm.weight"):
            tensors[n] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[n] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".speed-{name}-", dir=cache))
    save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(staging)
    _bf16_config(staging / "config.json")
    for f in TOKENIZER_FILES:
        shutil.copyfile(STORIES_HF / f, staging / f)
    return _finish_dir(staging, out)


def _bf16_config(path: Path) -> None:
    c = json.loads(path.read_text())
    c["dtype"] = c["torch_dtype"] = "bfloat16"
    path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


def smollm2(k: int, cache: Path) -> tuple[Path, int]:
    """SmolLM2-135M (real weights) truncated to its first k layers; (dir, real depth)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vllm_quarot.eval.zoo import smollm2_dir

    src = smollm2_dir(cache)
    full = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    if k <= 0 or k >= full:
        return src, full
    out = cache / f"speed-smollm2-L{k}"
    if (out / ".complete").is_file():
        return out, full
    print(f"writing SmolLM2-135M truncated to {k} layers in {out} ...", flush=True)
    keep = {}
    with safe_open(src / "model.safetensors", "pt") as f:
        for n in f.keys():
            if n.startswith("model.layers.") and int(n.split(".")[2]) >= k:
                continue
            keep[n] = f.get_tensor(n)
    staging = Path(tempfile.mkdtemp(prefix=".speed-smollm2-", dir=cache))
    save_file(keep, staging / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != ".complete":
            shutil.copyfile(f, staging / f.name)
    c = json.loads((staging / "config.json").read_text())
    c["num_hidden_layers"] = k
    (staging / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    return _finish_dir(staging, out), full


def model_shape(model_dir: Path) -> dict:
    c = json.loads((model_dir / "config.json").read_text())
    return dict(hidden=c["hidden_size"], inter=c["intermediate_size"],
                heads=c["num_attention_heads"],
                kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                vocab=c["vocab_size"])


# ----------------------------------------------------------------- child: one run

def child(spec: dict) -> None:
    """Runs in the subprocess: one quantize() with the layer steps timed."""
    import resource

    import torch

    from vllm_quarot.offline import quantize as qmod

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda = spec["device"] == "cuda"
    rec: dict[str, list] = {"layer_s": [], "save_s": [], "layer_bytes": []}

    def on_step(name: str, seconds: float, info: dict) -> None:
        """quantize()'s timing hook: each layer's maths and its progress save."""
        if name.startswith("layer."):
            rec["layer_s"].append(seconds)
        elif name.startswith("save."):
            rec["save_s"].append(seconds)
            rec["layer_bytes"].append(info["bytes"])

    o = qmod.QuantizeOptions(scheme="w4a4", weight_method=spec["method"],
                             calib=spec["calib"], nsamples=spec["nsamples"],
                             seqlen=spec["seqlen"], device=spec["device"])
    assert o.needs_calibration == (spec["calib"] is not None), "calibration use changed"
    s = qmod.quantize(spec["model"], spec["out"], o, on_step=on_step)
    res = dict(seconds=s.seconds, peak_rss_gib=s.peak_rss_gib, rss_imports_gib=rss_imports,
               checkpoint_bytes=s.checkpoint_bytes, torch_threads=torch.get_num_threads(),
               **rec)
    if cuda:
        res["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["gpu"] = torch.cuda.get_device_name()
    print("RESULT_JSON " + json.dumps(res), flush=True)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line.removeprefix("RESULT_JSON "))
    raise SystemExit(f"quantize run {spec} failed (exit {proc.returncode}):\n"
                     f"{proc.stdout[-6000:]}")


# ------------------------------------------------------------------- analysis

def steady(r: dict) -> float:
    """Seconds per decoder layer (compute + progress save), the first layer left out
    when there are more (its one-time warm-up goes to the fixed part)."""
    per = [a + b for a, b in zip(r["layer_s"], r["save_s"], strict=True)]
    rest = per[1:] or per
    return sum(rest) / len(rest)


def linfit(xs: list[float], ys: list[float]) -> tuple | None:
    """Least-squares y = a + b·x, as (a, b) or, when the fitted b is negative (timing
    noise on a busy machine larger than the growth), (mean y, 0, True); None with
    fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    if b < 0:  # noise larger than the growth: no growth, flagged in the tables
        return my, 0.0, True
    return my - b * mx, b


def at(fit: tuple, x: float) -> float:
    return fit[0] + fit[1] * x


def flag(*fits: tuple) -> str:
    """"*" after a figure resting on a fit whose negative slope was set to 0."""
    return "*" if any(len(f) > 2 for f in fits) else ""


def fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"


def floor_note() -> str:
    return " ".join((floor_table.__doc__ or "").split())


def floor_table(models: list[str], device: str) -> str:
    """The least time any layer-streamed GPTQ run can take at 128×2048 on this device:
    one float32 forward of every decoder layer over the calibration tokens (each layer's
    output is the next one's input), at the measured GEMM rate. The real run adds the
    Hessians (≈ 0.5 forward), the sequential pass's second MLP forward, GPTQ and I/O."""
    big_t = PAPER_CALIB[0] * PAPER_CALIB[1]
    lines = ["| model | float32 GEMM rate | one forward of a layer @ 128×2048 | "
             "floor, full depth @ 128×2048 |", "|---|---:|---:|---:|"]
    shapes = {"smollm2": SMOLLM2, **SHAPES, "70b": LLAMA_70B}
    for m in models:
        sh = shapes[m]
        from vllm_quarot.offline.plan import gemm_tflops

        rate = gemm_tflops(device, sh["hidden"], sh["inter"])
        per_layer = 2 * layer_params(sh) * big_t / (rate * 1e12)
        lines.append(f"| {m} | {rate:.2f} TFLOP/s | {fmt_s(per_layer)} | "
                     f"{fmt_s(sh['layers'] * per_layer)} |")
    return "\n".join(lines)


def machine(device: str, child_info: dict) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    text = (f"{cpu}, {cores} cores ({usable} usable), torch threads "
            f"{child_info.get('torch_threads', '?')}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at start "
            f"{child_info.get('load', '?')}")
    if device == "cuda":
        text += f"; GPU {child_info.get('gpu', '?')}"
    return text


# ------------------------------------------------------------------------- main

def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, s = part.lower().split("x")
        out.append((int(n), int(s)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,1.1b,7b",
                    help="comma-separated: smollm2, 1.1b, 7b (tiny: a test shape)")
    ap.add_argument("--methods", default="rtn,gptq", help="comma-separated: rtn, gptq")
    ap.add_argument("--layers", type=int, default=2,
                    help="decoder layers of each measured model (0: full depth)")
    ap.add_argument("--calib-sizes", default="4x512,8x512",
                    help="GPTQ calibration sizes, SAMPLESxSEQLEN, comma-separated (two or "
                         "more for the extrapolation)")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                    help="the quantizer's --device")
    ap.add_argument("--calib", type=Path, default=DATA / "wikitext-2-raw" / "wiki.test.raw",
                    help="calibration text (default: WikiText-2 test, $QUAROT_DATA_DIR)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where the truncated models live (default: vllm_quarot.eval.zoo's cache)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/quantize_speed_<device>.md")
    ap.add_argument("--floor-only", action="store_true",
                    help="print only the floor table (measured GEMM rate; no quantization); "
                    "--models may include 70b")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return

    import torch

    from vllm_quarot.eval.zoo import default_cache_dir

    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out_md = a.out or ROOT / "benchmarks" / "results" / f"quantize_speed_{device}.md"
    cache = (a.cache_dir or default_cache_dir()).expanduser()
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    sizes = parse_sizes(a.calib_sizes)
    if a.floor_only:
        unknown = [m for m in models if m not in ("smollm2", "70b", *SHAPES)]
        if unknown:
            ap.error(f"unknown model {unknown[0]!r}")
        text = (f"{floor_note()}\n\n"
                f"Machine: {device}, torch threads {torch.get_num_threads()}.\n\n"
                f"{floor_table(models, device)}")
        print(text)
        return
    for m in models:
        if m != "smollm2" and m not in SHAPES:
            ap.error(f"unknown model {m!r}")
    for m in methods:
        if m not in ("rtn", "gptq"):
            ap.error(f"unknown method {m!r}")
    if "gptq" in methods and not a.calib.is_file():
        ap.error(f"calibration text {a.calib} not found")
    py = sys.executable
    if py.startswith(str(ROOT) + os.sep):
        py = os.path.relpath(py, ROOT)
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (f"{'OMP_NUM_THREADS=' + omp + ' ' if omp else ''}{py} "
               f"benchmarks/quantize_speed.py {shlex.join(sys.argv[1:])}").strip()
    info: dict = {"load": " ".join(Path("/proc/loadavg").read_text().split()[:3])
                  if Path("/proc/loadavg").is_file() else "?"}

    # the models, built once
    dirs: dict[str, tuple[Path, int, str]] = {}
    for m in models:
        if m == "smollm2":
            d, full = smollm2(a.layers, cache)
            dirs[m] = (d, full, "SmolLM2-135M (real weights)")
        else:
            k = a.layers if a.layers > 0 else SHAPES[m]["layers"]
            dirs[m] = (random_llama(m, k, cache), SHAPES[m]["layers"],
                       f"{SHAPES[m]['label']} (random weights)")

    runs = [(m, meth, size) for m in models for meth in methods
            for size in ([None] if meth == "rtn" else sizes)]
    results: dict[tuple, dict] = {}
    cache.mkdir(parents=True, exist_ok=True)
    for n, (m, meth, size) in enumerate(runs, 1):
        d = dirs[m][0]
        label = f"{m} {meth}" + (f" {size[0]}x{size[1]}" if size else "")
        print(f"[{n}/{len(runs)}] quantizing {label} ({d.name}) ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=".quantize-speed-", dir=cache) as tmp:
            spec = dict(model=str(d), out=str(Path(tmp) / "out"), method=meth,
                        calib=str(a.calib) if size else None,
                        nsamples=size[0] if size else 128, seqlen=size[1] if size else 2048,
                        device=device)
            r = run_child(spec)
        results[(m, meth, size)] = r
        info.update({k: r[k] for k in ("torch_threads", "gpu") if k in r})
        gpu = f", GPU peak {r['gpu_peak_gib']:.2f} GiB" if "gpu_peak_gib" in r else ""
        print(f"    {r['seconds']:.2f} s, {len(r['layer_s'])} layers at "
              f"{steady(r):.2f} s, peak RSS {r['peak_rss_gib']:.2f} GiB{gpu}", flush=True)

    # table 1: the measurements
    gpu_col = device == "cuda"
    head = ("| model | layers run / real | method | calibration | total | fixed (total − "
            "Σ layers) | mean s / layer | s / layer after the first | peak RSS GiB "
            "(after imports) |" + (" GPU peak GiB |" if gpu_col else "")
            + " checkpoint MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (m, meth, size), r in results.items():
        per = [x + y for x, y in zip(r["layer_s"], r["save_s"], strict=True)]
        k, full = len(per), dirs[m][1]
        cal = f"{size[0]}×{size[1]}" if size else "none"
        lines.append(
            f"| {m} | {k} / {full} | {meth} | {cal} | {r['seconds']:.2f} s | "
            f"{r['seconds'] - sum(per):.2f} s | {sum(per) / k:.3f} s | {steady(r):.3f} s | "
            f"{r['peak_rss_gib']:.2f} ({r['rss_imports_gib']:.2f}) |"
            + (f" {r['gpu_peak_gib']:.2f} |" if gpu_col else "")
            + f" {r['checkpoint_bytes'] / 2**20:.1f} |")
    table1 = "\n".join(lines)

    # table 2: the extrapolation
    big_t = PAPER_CALIB[0] * PAPER_CALIB[1]
    small = max(sizes, key=lambda s: s[0] * s[1])
    small_t = small[0] * small[1]
    head2 = ("| model | method | s / layer @ {s} | s / layer @ 128×2048 | full depth @ {s} | "
             "full depth @ 128×2048 | peak RSS @ 128×2048, full depth |"
             .format(s=f"{small[0]}×{small[1]}"))
    if gpu_col:
        head2 += " GPU peak @ 128×2048 |"
    lines = [head2, "|" + "---|" * (head2.count("|") - 1)]
    fits: dict[tuple[str, str], tuple] = {}
    for m in models:
        full = dirs[m][1]
        for meth in methods:
            rs = [(s, results[(m, meth, s)]) for s in ([None] if meth == "rtn" else sizes)]
            k = len(rs[0][1]["layer_s"])
            layer_bytes = sum(rs[0][1]["layer_bytes"]) / k
            if meth == "rtn":  # no calibration: constant in T
                r = rs[0][1]
                y_fit, f_fit = (steady(r), 0.0), (r["seconds"] - k * steady(r), 0.0)
                rss_fit = (r["peak_rss_gib"], 0.0)
                gpu_fit = (r.get("gpu_peak_gib", 0.0), 0.0)
            else:
                ts = [s[0] * s[1] for s, _ in rs]
                y_fit = linfit(ts, [steady(r) for _, r in rs])
                f_fit = linfit(ts, [r["seconds"] - k * steady(r) for _, r in rs])
                rss_fit = linfit(ts, [r["peak_rss_gib"] for _, r in rs])
                gpu_fit = linfit(ts, [r.get("gpu_peak_gib", 0.0) for _, r in rs])
            if y_fit is None:
                lines.append(f"| {m} | {meth} | (needs two calibration sizes) |"
                             + " |" * (head2.count("|") - 4))
                continue
            fits[(m, meth)] = (y_fit, f_fit, k)
            ckpt_k = rs[0][1]["checkpoint_bytes"]
            ckpt_full = ckpt_k + (full - k) * layer_bytes
            writer = (min(ckpt_full, SHARD_BYTES) - min(ckpt_k, SHARD_BYTES)) / 2**30
            fy, ft = flag(y_fit), flag(y_fit, f_fit)
            row = (f"| {m} | {meth} | {fmt_s(at(y_fit, small_t))} | "
                   f"{fmt_s(at(y_fit, big_t))}{fy} "
                   f"| {fmt_s(at(f_fit, small_t) + full * at(y_fit, small_t))} "
                   f"| {fmt_s(at(f_fit, big_t) + full * at(y_fit, big_t))}{ft} "
                   f"| {at(rss_fit, big_t) + writer:.1f} GiB{flag(rss_fit)} |")
            if gpu_col:
                row += f" {at(gpu_fit, big_t):.1f} GiB{flag(gpu_fit)} |"
            lines.append(row)
    table2 = "\n".join(lines)

    # Llama-2-70B, scaled from the largest random Llama shape measured (7b normally)
    src70 = next((m for m in ("7b", "1.1b", "tiny") if m in models), None)
    lines70 = []
    if src70:
        s_src = SHAPES[src70]
        ratio = layer_params(LLAMA_70B) / layer_params(s_src)
        emb = LLAMA_70B["hidden"] * LLAMA_70B["vocab"] / (s_src["hidden"] * s_src["vocab"])
        for meth in methods:
            if (src70, meth) not in fits:
                continue
            y_fit, f_fit, _ = fits[(src70, meth)]
            tot = [emb * at(f_fit, t) + LLAMA_70B["layers"] * ratio * at(y_fit, t)
                   for t in (small_t, big_t)]
            lines70.append(f"| 70b (from {src70}) | {meth} | {fmt_s(ratio * at(y_fit, small_t))} "
                           f"| {fmt_s(ratio * at(y_fit, big_t))}{flag(y_fit)} | "
                           f"{fmt_s(tot[0])} | {fmt_s(tot[1])}{flag(y_fit, f_fit)} | "
                           "not estimated |" + (" |" if gpu_col else ""))
    if lines70:
        table2 += "\n" + "\n".join(lines70)

    models_text = "\n".join(
        f"* {m}: {desc}, hidden {sh['hidden']}, intermediate {sh['inter']}, {sh['heads']} "
        f"heads / {sh['kv_heads']} KV heads, vocab {sh['vocab']}, {full} layers "
        f"({layer_params(sh) / 1e6:.1f} M linear weights per layer); measured as "
        f"`{d.name}`" for m, (d, full, desc) in dirs.items() for sh in [model_shape(d)])
    note70 = (f"Llama-2-70B (hidden 8192, intermediate 28672, 80 layers, 64 heads / 8 KV "
              f"heads): {src70}'s fitted seconds per layer × the per-layer parameter ratio "
              f"{layer_params(LLAMA_70B) / layer_params(SHAPES[src70]):.2f}, fixed seconds × "
              "the embedding-size ratio: a rough scale-up (GPTQ's solve grows as "
              "d_in²·d_out, faster than the parameter count; memory not estimated)."
              if src70 else "")
    warm = ("\n\nWith one layer per run the first layer's one-time warm-up cannot be told "
            "apart from the per-layer time, which the extrapolation then overstates: use "
            "--layers 2 or more." if 0 < a.layers < 2 else "")
    md = f"""# `vllm-quarot quantize` speed and memory ({device})

Machine: {machine(device, info)}.

Command: `{command}`

Scheme w4a4, CLI defaults otherwise (GPTQ: act-order, weight clip search, damp 0.01;
calibration forward passes in float32, GPTQ in float64; --device {device}). GPTQ
calibrates on `{a.calib.name}`; RTN uses no calibration data. Random Llama shapes carry
stories260K's tokenizer (512 tokens, only used to tokenize the calibration text; the
vocab stays the model's); SmolLM2 keeps its own weights and tokenizer. Models are
truncated to the first {a.layers if a.layers > 0 else 'all'} decoder layers (same
widths); the real depth is used in the extrapolation.{warm}

{models_text}

## Measured

Per layer = the `layer.i` step (fold, rotate, quantize, calibration forward) + the
layer's progress save (the `save.i` step: its tensors and calibration activations to disk,
handed to the checkpoint writer). Fixed = total − Σ layers (config, tokenizer,
calibration tokenization, embedding and head rotation, writing the checkpoint). Peak
RSS is the subprocess's own (in parentheses: after importing torch and the quantizer).

{table1}

## Extrapolated

Per layer y(T) = a + b·T and fixed f(T) = c + d·T (T = calibration tokens), fitted
over {', '.join(f'{n}×{s}' for n, s in sizes)} with the per-layer time taken after the
first layer (its warm-up counted as fixed); full depth = f(T) + L·y(T) at the real
layer count L. The seqlen² part of attention is not modelled (the windows are longer
at 128×2048 than measured; a few % of a layer's work). Peak RSS = the linear fit in T
plus the checkpoint writer's growth with depth (it buffers up to one 5 GB shard):
min(checkpoint at L layers, 5 GB) − min(measured checkpoint, 5 GB). A figure marked *
rests on a fit whose slope came out negative (timing noise larger than the growth
between the calibration sizes) and was set to 0: widen --calib-sizes. {note70}

{table2}
"""
    md += f"""
## Floor

{floor_note()}

{floor_table(models, device)}
"""
    print("\n" + md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    print(f"wrote {out_md}")


if __name__ == "__main__":
    main()
