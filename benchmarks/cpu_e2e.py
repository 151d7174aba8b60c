"""End-to-end CPU speed through vLLM: a 1.1B-parameter Llama (TinyLlama-1.1B shapes,
random weights: quality is irrelevant for speed) in bf16 vs the same model quantized
by our tool (RTN) to each of --schemes (default W4A4, W4A8, W8A8), side by side in one
run.

Reports batch-1 decode tokens/s, batch-32 decode throughput, prefill tokens/s of one
1024-token prompt, checkpoint size and the engine's peak RSS (all vLLM processes).
Each engine runs in its own subprocess so that the RSS belongs to it alone.

    .venv/bin/python benchmarks/cpu_e2e.py [--compile] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("VLLM_QUAROT_CACHE", Path.home() / ".cache" / "vllm-quarot"))
DATA = Path(os.environ.get("QUAROT_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, num_hidden_layers=22, vocab_size=32000,
             tie_word_embeddings=False)


def make_model(out: Path, shape: dict | None = None) -> Path:
    """A random bf16 Llama with TinyLlama-1.1B's shapes (5632 = 44·128: a Paley R4), or
    with ``shape``'s LlamaConfig fields."""
    if (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(shape or SHAPE), max_position_embeddings=2048, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2)
    print(f"building a random Llama ({cfg.num_hidden_layers} layers, {cfg.hidden_size} "
          f"wide) in {out} ...", flush=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    if cfg.tie_word_embeddings:  # to_empty() untied them: one matrix, as the config says
        model.tie_weights()
    model.save_pretrained(out)
    # the quantizer copies a tokenizer along; vLLM runs with skip_tokenizer_init
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(DATA / "stories260K" / "hf" / f, out / f)
    return out


def quantize_model(src: Path, out: Path, tp: int = 1, scheme: str = "w4a4",
                   **options) -> Path:
    """src quantized by RTN into out (once: an existing out is reused); options: other
    QuantizeOptions fields."""
    if (out / "config.json").is_file():
        return out
    from vllm_quarot.offline.quantize import QuantizeOptions, quantize

    print(f"quantizing {src} -> {out} (QuaRot {scheme}, RTN, --tp {tp}, {options}) ...",
          flush=True)
    print(quantize(src, out, QuantizeOptions(scheme=scheme, weight_method="rtn",
                                             tp=tp, **options)).format())
    return out


def worker(model: str, quantization: str | None, compile_: bool, tp: int = 1,
           n_dec: int = 64, prefill: bool = True) -> dict:
    """Runs inside the subprocess: one engine, all measurements."""
    from vllm import LLM

    llm = LLM(model, quantization=quantization, dtype="bfloat16", enforce_eager=not compile_,
              skip_tokenizer_init=True, max_model_len=2048, max_num_seqs=32,
              max_num_batched_tokens=2048, seed=0, tensor_parallel_size=tp,
              distributed_executor_backend="mp" if tp > 1 else None)

    from vllm_quarot.eval.throughput import decode_tokens_per_s, time_to_first_token

    out = {"decode_b1": decode_tokens_per_s(llm, 1, n_dec),
           "decode_b32": decode_tokens_per_s(llm, 32, n_dec)}
    if prefill:
        out["prefill"] = 1024 / time_to_first_token(llm, 1024)
    return out


def run_engine(model: Path, quantization: str | None, compile_: bool, tp: int = 1,
               n_dec: int = 64, prefill: bool = True) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--worker", str(model), "--quantization",
           quantization or "none", "--tp", str(tp), "--decode-tokens", str(n_dec)] + (
        ["--compile"] if compile_ else []) + ([] if prefill else ["--no-prefill"])
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    peak = [0]

    def watch():
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    out = proc.communicate()[0]
    for line in out.splitlines():
        if line.startswith("RESULT_JSON "):
            res = json.loads(line.removeprefix("RESULT_JSON "))
            res["peak_rss_gib"] = peak[0] / 2**30
            return res
    raise SystemExit(f"engine for {model} failed:\n{out[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="torch.compile (default: eager)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="vLLM compute threads, bound to cores 0..N-1 (vLLM's default keeps "
                         "one core for its front end)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quantization", help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--decode-tokens", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--no-prefill", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--schemes", default="w4a4,w4a8,w8a8",
                    help="QuaRot schemes to compare with bf16 (comma-separated)")
    a = ap.parse_args()
    if a.worker:
        q = None if a.quantization == "none" else a.quantization
        res = worker(a.worker, q, a.compile, a.tp, a.decode_tokens, not a.no_prefill)
        print("RESULT_JSON " + json.dumps(res), flush=True)
        return

    from vllm_quarot.runtime.ops import cpu as cpu_ops

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{a.threads - 1}"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    bf16 = make_model(CACHE / "random-llama-1.1b")
    engines = [("bf16", bf16, None)]
    for scheme in a.schemes.split(","):
        engines.append((f"QuaRot {scheme.upper()}", quantize_model(
            bf16, CACHE / f"random-llama-1.1b-quarot-{scheme}-rtn", scheme=scheme), "quarot"))
    res = {}
    for name, model, q in engines:
        print(f"running vLLM on {name} ...", flush=True)
        res[name] = run_engine(model, q, a.compile, prefill=not a.no_prefill,
                               n_dec=a.decode_tokens)
        res[name]["size_gib"] = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30
        print(name, res[name], flush=True)
    b = res["bf16"]
    rows = [("decode tokens/s, batch 1", "decode_b1", "{:.2f}"),
            ("decode tokens/s, batch 32", "decode_b32", "{:.1f}"),
            ("prefill tokens/s, 1024-token prompt", "prefill", "{:.0f}"),
            ("checkpoint size (GiB)", "size_gib", "{:.2f}"),
            ("peak RSS, all engine processes (GiB)", "peak_rss_gib", "{:.2f}")]
    quant = [n for n, _, _ in engines[1:]]
    lines = ["| 1.1B Llama, vLLM CPU | bf16 | " + " | ".join(f"{n} (× bf16)" for n in quant)
             + " |", "|---|---:|" + "---:|" * len(quant)]
    for label, key, fmt in rows:
        if key not in b:
            continue
        lines.append(f"| {label} | {fmt.format(b[key])} | " + " | ".join(
            f"{fmt.format(res[n][key])} ({res[n][key] / b[key]:.2f}×)" for n in quant) + " |")
    table = "\n".join(lines)
    mode = "torch.compile" if a.compile else "eager"
    print(f"\n{table}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"cpu_e2e_{'compile' if a.compile else 'eager'}_{a.threads}threads.md").write_text(
        f"# End to end through vLLM (CPU, {mode}, {a.threads} compute threads, kernels "
        f"{cpu_ops.isa()})\n\n"
        f"Command: `.venv/bin/python benchmarks/cpu_e2e.py{' --compile' if a.compile else ''}`"
        f"\n\n{table}\n")


if __name__ == "__main__":
    main()
