"""Accuracy cost of tensor-parallel-ready checkpoints (``vllm-quarot quantize --tp N``).

SmolLM2-135M, W4A4KV4 QuaRot-GPTQ with the accuracy table's calibration (32×512 tokens
of TinyStories), quantized with N = 1, 2, 8 tensor-parallel blocks (block-diagonal R4,
per-(token, 1/N slice) activation scales on o_proj and down_proj); perplexity on
WikiText-2 through the simulation (the reference vLLM is tested against):

    .venv/bin/python benchmarks/tp_blocks_accuracy.py [--tp 1,2,8] [--max-windows 8]

Each step is the command line (printed); checkpoints are cached under --work. Prints a
markdown table and writes benchmarks/results/tp_blocks_smollm2.md (after every row).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
CALIB = DATA / "tinystories" / "validation_head.txt"
SEQLEN = 2048


def _run(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "vllm_quarot.cli", *args]
    print("$ vllm-quarot " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", default="1,2,8", help="comma-separated block counts")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--work", default=None, help="where quantized checkpoints are cached")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from models import default_cache_dir, smollm2_dir

    base = smollm2_dir()
    work = Path(a.work) if a.work else default_cache_dir() / "tp-blocks-smollm2"
    out = ROOT / "benchmarks" / "results" / "tp_blocks_smollm2.md"
    rows: list[tuple[int, float, float]] = []
    for n in (int(x) for x in a.tp.split(",")):
        ckpt = work / f"w4a4kv4-gptq-tp{n}"
        t = time.time()
        if not (ckpt / "config.json").is_file():
            _run(["quantize", str(base), str(ckpt), "--scheme", "w4a4kv4",
                  "--weight-method", "gptq", "--calib", str(CALIB), "--nsamples",
                  str(a.nsamples), "--seqlen", str(a.calib_seqlen), "--tp", str(n)])
        tq = time.time() - t
        got = _run(["eval", "ppl", str(ckpt), "--text", str(TEXT), "--backend", "sim",
                    "--seqlen", str(SEQLEN), "--max-windows", str(a.max_windows)])
        ppl = float(re.search(r"simulation perplexity \(float32\): ([\d.]+)", got).group(1))
        windows = int(re.search(r"(\d+) windows of", got).group(1))
        rows.append((n, ppl, tq))
        print(f"[tp-blocks] N={n}: ppl {ppl:.4f} (quantized in {tq:.0f} s)", flush=True)
        ref = next((p for m, p, _ in rows if m == 1), None)
        lines = [
            f"SmolLM2-135M, W4A4KV4 QuaRot-GPTQ (calibration {a.nsamples}×"
            f"{a.calib_seqlen} tokens of `tinystories/validation_head.txt`), perplexity on "
            f"`wikitext-2-raw/wiki.test.raw` ({windows}×{SEQLEN} tokens) through the "
            "simulation (float32). N: `vllm-quarot quantize --tp N` (block-diagonal R4 "
            "I_N ⊗ H_{1536/N}, per-(token, 1/N slice) scales on o_proj and down_proj).",
            "Printed by `.venv/bin/python benchmarks/tp_blocks_accuracy.py "
            f"--tp {a.tp} --max-windows {a.max_windows}`.",
            "",
            "| N | ppl (simulation) | vs N=1 |",
            "|---:|---:|---:|",
        ]
        for m, p, _ in rows:
            rel = f"{(p / ref - 1) * 100:+.2f}%" if ref else ""
            lines.append(f"| {m} | {p:.3f} | {rel} |")
        table = "\n".join(lines)
        out.write_text(table + "\n")
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
