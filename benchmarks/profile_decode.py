"""Where a vLLM decode step's time goes on CPU: torch.profiler over batch-1 decode steps
of one checkpoint (the engine core runs in this process), top ops by self CPU time, and
the engine's start-up time.

    .venv/bin/python benchmarks/profile_decode.py CKPT [--eager] [--steps 16]

Writes benchmarks/results/profile_decode_<name>.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--eager", action="store_true", help="default: vLLM's compiled mode")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # ops run in this process
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{a.threads - 1}"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    llm = LLM(str(a.model), dtype=a.dtype, enforce_eager=a.eager, skip_tokenizer_init=True,
              max_model_len=2048, max_num_seqs=32, seed=0)
    startup = time.perf_counter() - t
    dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    prompt = TokensPrompt(prompt_token_ids=[(11 * j) % 30000 + 100 for j in range(16)])

    def gen(n: int) -> float:
        p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate([prompt], p, use_tqdm=False)
        return time.perf_counter() - t

    gen(8)
    step_ms = (gen(1 + a.steps) - gen(1)) / a.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen(1 + a.steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    mode = "eager" if a.eager else "compiled"
    head = (f"{a.model.name}: vLLM {mode}, dtype {dtype}, {a.threads} threads: start-up "
            f"{startup:.0f} s, batch-1 decode step {step_ms:.1f} ms "
            f"({1e3 / step_ms:.1f} tok/s)")
    print(head)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"profile_decode_{a.model.name}_{mode}.md"
    out.write_text(f"# {head}\n\nCommand: `.venv/bin/python benchmarks/profile_decode.py "
                   f"{a.model}{' --eager' if a.eager else ''}`; torch.profiler over one "
                   f"request of 1 + {a.steps} tokens (prefill of 16 tokens included)\n\n"
                   f"```\n{table}\n```\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
