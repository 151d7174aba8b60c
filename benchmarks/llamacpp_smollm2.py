"""SmolLM2-135M-Instruct on this CPU: llama.cpp (the Q4_1 GGUF from PyPI, 2 threads)
vs vLLM with our QuaRot W4A4 checkpoint vs vLLM bf16, side by side in one run.

Batch-1 decode tokens/s and prefill tokens/s of a 1024-token prompt (vLLM also batch
32; llama-cpp-python has no batched decoding). Needs `pip install llama-cpp-python`
(it builds llama.cpp from source: ~15 min on 2 cores).

    .venv/bin/python benchmarks/llamacpp_smollm2.py [--compile] [--quarot CKPT]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from cpu_e2e import CACHE, run_engine
from models import smollm2_dir, smollm2_gguf

from vllm_quarot.runtime.ops import cpu as cpu_ops


def llama_cpp(gguf: Path, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                n_batch=512, verbose=False, seed=0)
    prompt = [(37 * j) % 40000 + 100 for j in range(16)]

    def run(tokens: list[int], n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        for i, _ in enumerate(llm.generate(tokens, temp=0.0, reset=True)):
            if i + 1 >= n:
                break
        return time.perf_counter() - t

    run(prompt, 8)  # warm-up
    n_dec = 64
    decode = (n_dec - 1) / (run(prompt, n_dec) - run(prompt, 1))
    long = [(11 * j) % 40000 + 100 for j in range(1024)]
    run(long, 1)
    prefill = 1024 / run(long, 1)
    return {"decode_b1": decode, "prefill": prefill}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="vLLM with torch.compile")
    ap.add_argument("--quarot", type=Path, default=CACHE / "SmolLM2-135M-Instruct-quarot-w4a4-gptq",
                    help="QuaRot checkpoint of SmolLM2 (default: the demo's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="compute threads for both (vLLM by default keeps one core for its "
                         "front end: here its OpenMP threads are bound to cores 0..N-1)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    if not (a.quarot / "config.json").is_file():
        raise SystemExit(f"{a.quarot} is missing: run `bash scripts/demo.sh` (or "
                         "`vllm-quarot quantize`) to make the SmolLM2 QuaRot checkpoint")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{a.threads - 1}"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    res = {"llama.cpp Q4_1": llama_cpp(smollm2_gguf(), a.threads)}
    print("llama.cpp", res["llama.cpp Q4_1"], flush=True)
    for name, model, q in [("vLLM bf16", smollm2_dir(), None),
                           ("vLLM QuaRot W4A4", a.quarot, "quarot")]:
        res[name] = run_engine(model, q, a.compile)
        print(name, res[name], flush=True)
    ref = res["llama.cpp Q4_1"]
    lines = ["| SmolLM2-135M, CPU | decode tok/s b1 | vs llama.cpp | prefill tok/s (1024) "
             "| vs llama.cpp | decode tok/s b32 |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        b32 = f"{r['decode_b32']:.0f}" if "decode_b32" in r else "n/a"
        lines.append(f"| {name} | {r['decode_b1']:.1f} | {r['decode_b1'] / ref['decode_b1']:.2f}× "
                     f"| {r['prefill']:.0f} | {r['prefill'] / ref['prefill']:.2f}× | {b32} |")
    table = "\n".join(lines)
    mode = "torch.compile" if a.compile else "eager"
    print(f"\n{table}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"llamacpp_smollm2_{mode.replace('.', '_')}.md").write_text(
        f"# SmolLM2-135M: llama.cpp vs vLLM (CPU, {a.threads} threads, vLLM {mode}, "
        f"kernels {cpu_ops.isa()})\n\nCommand: `.venv/bin/python "
        f"benchmarks/llamacpp_smollm2.py{' --compile' if a.compile else ''}`\n\n{table}\n")


if __name__ == "__main__":
    main()
