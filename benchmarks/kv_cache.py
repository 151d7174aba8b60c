"""KV4 versus a 16-bit KV cache on SmolLM2-135M through vLLM (CPU), side by side:
KV capacity (tokens) for the same VLLM_CPU_KVCACHE_SPACE, WikiText-2 perplexity and
decode tokens/s at batch 1 and 32.

    .venv/bin/python benchmarks/kv_cache.py [--quarot-kv4 CKPT]

Rows: bf16 weights with the bf16 cache; bf16 weights with
`--kv-cache-dtype int4_per_token_head` (4-bit cache, no R3); and optionally a QuaRot
checkpoint with a 4-bit cache (`--scheme kv4`: bf16 rotated weights, KV4 with R3; or
`w4a4kv4`), the cache auto-enabled from its config.
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))


def measure(model: Path, kv_dtype: str, windows: list[list[int]], n_dec: int) -> dict:
    from vllm import LLM

    from vllm_quarot.eval.perplexity import vllm_perplexity

    llm = LLM(str(model), dtype="bfloat16", kv_cache_dtype=kv_dtype, enforce_eager=True,
              max_model_len=2048, max_num_seqs=32, seed=0)
    from vllm_quarot.eval.throughput import decode_tokens_per_s, kv_capacity_tokens

    capacity = kv_capacity_tokens(llm)
    ppl = vllm_perplexity(llm, windows)
    tps1 = decode_tokens_per_s(llm, 1, n_dec)
    tps32 = decode_tokens_per_s(llm, 32, n_dec)
    del llm
    gc.collect()
    return {"capacity": capacity, "ppl": ppl, "tps1": tps1, "tps32": tps32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quarot-kv4", default=None,
                    help="a QuaRot checkpoint with a 4-bit KV cache (kv4 or w4a4kv4 scheme)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=128)
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_quarot.eval.perplexity import token_windows
    from vllm_quarot.eval.zoo import smollm2_dir

    base = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(base)
    windows = token_windows(tok, DATA / "wikitext-2-raw" / "wiki.test.raw", a.seqlen,
                            a.windows)
    rows = [("bf16 weights, bf16 KV cache", base, "auto"),
            ("bf16 weights, KV4 (no R3)", base, "int4_per_token_head")]
    if a.quarot_kv4:
        rows.append((f"QuaRot {Path(a.quarot_kv4).name} (KV4 + R3)", Path(a.quarot_kv4), "auto"))
    res = [(name, measure(m, kv, windows, a.decode_tokens)) for name, m, kv in rows]
    ref = res[0][1]
    space = os.environ["VLLM_CPU_KVCACHE_SPACE"]
    lines = [
        f"SmolLM2-135M, vLLM CPU eager, VLLM_CPU_KVCACHE_SPACE={space} GiB; perplexity on "
        f"{len(windows)}×{a.seqlen} WikiText-2 tokens; decode {a.decode_tokens} tokens.",
        "",
        "| configuration | KV capacity (tokens) | × bf16 | perplexity | decode tok/s b=1 "
        "| b=32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res:
        lines.append(
            f"| {name} | {r['capacity']:,} | {r['capacity'] / ref['capacity']:.2f} | "
            f"{r['ppl']:.3f} ({(r['ppl'] / ref['ppl'] - 1) * 100:+.2f}%) | "
            f"{r['tps1']:.1f} ({r['tps1'] / ref['tps1']:.2f}×) | "
            f"{r['tps32']:.1f} ({r['tps32'] / ref['tps32']:.2f}×) |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results" / "kv_cache_smollm2.md"
    out.write_text(table + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
