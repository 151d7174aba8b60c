"""Regenerates the README's accuracy table (QuaRot paper's Table 1, on small models).

For every row: quantize with `vllm-quarot quantize` (cached under --work), then
measure perplexity through vLLM (the serving path, when vLLM can serve the row) and
through the pure-PyTorch simulation, and report the checkpoint size.

    .venv/bin/python benchmarks/accuracy.py --model smollm2      # WikiText-2
    .venv/bin/python benchmarks/accuracy.py --model stories260k  # TinyStories, sim only

Writes benchmarks/results/accuracy_<model>.md and prints the same table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))

# (label, quantize options or None for the 16-bit original)
ROWS: list[tuple[str, dict | None]] = [
    ("bf16", None),
    ("W8A8, no rotation", dict(scheme="w8a8", weight_method="rtn", rotate="none")),
    ("W8A8, QuaRot", dict(scheme="w8a8", weight_method="rtn")),
    ("W8A8 static, no rotation", dict(scheme="w8a8-static", weight_method="rtn",
                                      rotate="none")),
    ("W8A8 static, R1+R2", dict(scheme="w8a8-static", weight_method="rtn", rotate="r1r2")),
    ("W8A8 static, QuaRot", dict(scheme="w8a8-static", weight_method="rtn")),
    ("W4A16 RTN, QuaRot", dict(scheme="w4a16", weight_method="rtn", w_clip=True)),
    ("W4A16 GPTQ, QuaRot", dict(scheme="w4a16", weight_method="gptq")),
    ("W4A4KV4 RTN, no rotation", dict(scheme="w4a4kv4", weight_method="rtn",
                                      rotate="none")),
    ("W4A4KV4 QuaRot-RTN", dict(scheme="w4a4kv4", weight_method="rtn", w_clip=True)),
    ("W4A4KV4 QuaRot-GPTQ", dict(scheme="w4a4kv4", weight_method="gptq")),
    ("W4A4 (KV16) QuaRot-GPTQ", dict(scheme="w4a4", weight_method="gptq")),
    ("KV4 only, QuaRot R3", dict(scheme="kv4", weight_method="rtn")),
]

MODELS = {
    # name: (text, seqlen, vLLM can serve it, calibration text)
    "smollm2": ("wikitext-2-raw/wiki.test.raw", 2048, True, "tinystories/validation_head.txt"),
    "stories260k": ("tinystories/validation_head.txt", 512, False,
                    "tinystories/validation_head.txt"),
}


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from models import smollm2_dir

        return smollm2_dir()
    return DATA / "stories260K" / "hf"


def size_mib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--max-windows", type=int, default=16,
                    help="perplexity windows of seqlen tokens (None: the whole text)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--rows", default=None, help="comma-separated row numbers (default all)")
    ap.add_argument("--work", default=None, help="where quantized checkpoints are cached")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--sim-rows", default="2,10,11",
                    help="rows also scored by the simulation when vLLM serves them "
                    "('all' for every row); rows vLLM cannot serve always are")
    a = ap.parse_args()

    from models import default_cache_dir
    from transformers import AutoTokenizer

    from vllm_quarot.eval.perplexity import (
        hf_perplexity,
        load_reference,
        serve_perplexity,
        token_windows,
    )
    from vllm_quarot.offline.quantize import QuantizeOptions, quantize

    text, seqlen, servable, calib = MODELS[a.model]
    base = model_dir(a.model)
    work = Path(a.work) if a.work else default_cache_dir() / f"accuracy-{a.model}"
    tok = AutoTokenizer.from_pretrained(base)
    windows = token_windows(tok, DATA / text, seqlen, a.max_windows)
    picked = [int(i) for i in a.rows.split(",")] if a.rows else range(len(ROWS))
    results = []
    for i in picked:
        label, opts = ROWS[i]
        ckpt = base
        if opts is not None:
            ckpt = work / (f"row{i:02d}-" + "".join(c if c.isalnum() else "_" for c in label))
            if not (ckpt / "config.json").is_file():
                print(f"[accuracy] quantizing: {label}", flush=True)
                t = time.time()
                s = quantize(base, ckpt, QuantizeOptions(
                    **opts, calib=str(DATA / calib), nsamples=a.nsamples,
                    seqlen=a.calib_seqlen))
                print(f"[accuracy]   {time.time() - t:.0f} s; worst layer error "
                      f"{max(s.layer_errors.values(), default=0):.4f}", flush=True)
        serve = servable and not a.no_vllm
        v = serve_perplexity(ckpt, windows, "quarot" if opts else None) if serve else None
        with_sim = v is None or a.sim_rows == "all" or str(i) in a.sim_rows.split(",")
        sim = hf_perplexity(load_reference(ckpt), windows) if with_sim else None
        results.append((i, label, v, sim, size_mib(ckpt)))
        print(f"[accuracy] {label}: vLLM {v} sim {sim}", flush=True)

    bf16 = [r for r in results if r[1] == "bf16"]
    ref_ppl = (bf16[0][2] or bf16[0][3]) if bf16 else None
    n_tok = len(windows) * (seqlen - 1)
    lines = [
        f"{a.model}: perplexity on `{text}` ({len(windows)}×{seqlen} tokens, {n_tok} scored); "
        f"GPTQ/static calibration: {a.nsamples}×{a.calib_seqlen} tokens of `{calib}`.",
        "",
        "| # | configuration | ppl (vLLM) | ppl (simulation) | vs bf16 | vLLM/sim | size MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for i, label, v, sim, mib in results:
        main_ppl = v if v is not None else sim
        rel = f"{(main_ppl / ref_ppl - 1) * 100:+.1f}%" if ref_ppl else ""
        vs = f"{v:.2f}" if v is not None else "—"
        ss = f"{sim:.2f}" if sim is not None else "—"
        ratio = f"{v / sim:.4f}" if v is not None and sim is not None else ""
        lines.append(f"| {i} | {label} | {vs} | {ss} | {rel} | {ratio} | {mib:.1f} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results" / f"accuracy_{a.model}.md"
    out.write_text(table + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
