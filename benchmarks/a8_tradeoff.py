"""Perplexity of keeping 0, 2, 4, ... sub-blocks' activations at 8 bits (--a8-layers N)
next to `auto`, from one W4A4(KV4) checkpoint quantized with --a8-layers.

GPTQ's weights do not depend on the activation bits, so the variants share the
checkpoint's weights (symlinked) and differ only in ``activation.layer_bits``, chosen
by the activation errors the quantizer measured (``quantizer.activation_errors``) exactly
as ``--a8-layers N`` chooses. On CPU the 8-bit layers run the same integer GEMM as the
4-bit ones (int8 activation codes either way), so the speed is the same; the table
reports perplexity only.

    .venv/bin/python benchmarks/a8_tradeoff.py CKPT --counts 0,2,4 [--backend vllm|sim]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))


def variant(ckpt: Path, out: Path, n: int) -> Path:
    """ckpt with the n highest-scoring sub-blocks at 8 bits (weights symlinked)."""
    from vllm_quarot.offline.quantize import select_a8_layers

    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg["quantization_config"]
    errors = qc["quantizer"].get("activation_errors")
    if not errors:
        raise SystemExit(f"{ckpt} was not quantized with --a8-layers (no activation_errors)")
    layer_bits = select_a8_layers(errors, str(n), cfg["num_hidden_layers"])
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    qc["activation"]["layer_bits"] = dict(sorted(layer_bits.items()))
    qc["quantizer"]["a8_layers"] = str(n)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="a checkpoint made with --a8-layers (any choice)")
    ap.add_argument("--counts", default="0,2,4")
    ap.add_argument("--text", default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--backend", choices=("vllm", "sim"), default="vllm")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "a8_tradeoff.md")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_quarot.eval.perplexity import (
        hf_perplexity,
        load_reference,
        serve_perplexity,
        token_windows,
    )

    windows = token_windows(AutoTokenizer.from_pretrained(a.ckpt), a.text, a.seqlen,
                            a.max_windows)
    work = a.ckpt.parent / f"{a.ckpt.name}-a8variants"
    rows = []
    own = json.loads((a.ckpt / "config.json").read_text())["quantization_config"]
    cases = [(f"--a8-layers {own['quantizer']['a8_layers']} (the checkpoint)", a.ckpt)]
    cases += [(f"--a8-layers {n}", variant(a.ckpt, work / f"n{n}", int(n)))
              for n in a.counts.split(",")]
    for label, ckpt in cases:
        lb = json.loads((ckpt / "config.json").read_text())["quantization_config"][
            "activation"]["layer_bits"]
        ppl = (serve_perplexity(ckpt, windows, "quarot") if a.backend == "vllm"
               else hf_perplexity(load_reference(ckpt), windows))
        groups = sorted({k.rsplit(".", 1)[0] + "." + k.rsplit(".", 1)[1].split("_")[0]
                         for k in lb})
        rows.append((label, len(lb), ppl, ", ".join(g.removeprefix("model.") for g in groups)))
        print(rows[-1], flush=True)
    lines = [f"`{a.ckpt.name}`: perplexity ({a.backend}) on {len(windows)}×{a.seqlen} tokens of "
             f"`{Path(a.text).name}`; command: `.venv/bin/python benchmarks/a8_tradeoff.py "
             f"{a.ckpt} --counts {a.counts} --backend {a.backend}`", "",
             "| activations at 8 bits | linears | perplexity | sub-blocks |",
             "|---|---:|---:|---|"]
    lines += [f"| {label} | {n} | {ppl:.2f} | {g or '—'} |" for label, n, ppl, g in rows]
    table = "\n".join(lines)
    print(table)
    a.out.write_text(table + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
