"""Where a vLLM decode step's time goes on CPU: torch.profiler over decode steps of one
checkpoint (the engine core runs in this process; --batch concurrent sequences), top ops
by self CPU time, the same time grouped by who owns it (the plugin's linear kernels,
vLLM's attention and KV-cache ops, dtype conversions and copies, the remaining torch
ops, and the host-side time no op accounts for: Python, the scheduler, sampling), and
the engine's start-up time.

    .venv/bin/python benchmarks/profile_decode.py CKPT [--eager] [--steps 16] [--batch 1]

Writes benchmarks/results/<machine>/profile_decode_<name>_<mode>_b<batch>.md.
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
    ap.add_argument("--batch", type=int, default=1, help="concurrent sequences")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results/<machine tag>)")
    a = ap.parse_args()
    from cpu_peak import header, machine_tag

    a.out = a.out or Path("benchmarks/results") / machine_tag()
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
    prompts = [TokensPrompt(prompt_token_ids=[(11 * j + 7 * i) % 30000 + 100
                                              for j in range(16)]) for i in range(a.batch)]

    def gen(n: int) -> float:
        p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate(prompts, p, use_tqdm=False)
        return time.perf_counter() - t

    gen(8)
    step_ms = (gen(1 + a.steps) - gen(1)) / a.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        gen(1 + a.steps)
        wall_ms = (time.perf_counter() - t) * 1e3
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=25)
    groups = owners(events, wall_ms * a.threads)
    mode = "eager" if a.eager else "compiled"
    head = (f"{a.model.name}: vLLM {mode}, dtype {dtype}, {a.threads} threads, "
            f"{a.batch} sequence{'s' * (a.batch > 1)}: start-up {startup:.0f} s, decode step "
            f"{step_ms:.1f} ms ({a.batch * 1e3 / step_ms:.1f} tok/s)")
    gtable = "\n".join(["| owner | ms per profiled request | share of threads × wall |",
                        "|---|---:|---:|"] + [f"| {k} | {v:.1f} | {v / (wall_ms * a.threads):.1%} |"
                                              for k, v in groups.items()])
    print(head)
    print(gtable)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"profile_decode_{a.model.name}_{mode}_b{a.batch}.md"
    cmd = (f".venv/bin/python benchmarks/profile_decode.py {a.model}"
           f"{' --eager' if a.eager else ''} --batch {a.batch} --steps {a.steps}")
    out.write_text(f"# {head}\n\n{header(cmd)}\ntorch.profiler over one request of "
                   f"1 + {a.steps} tokens per sequence (prefill of 16 tokens included), "
                   f"{wall_ms:.0f} ms wall on {a.threads} threads. Self CPU time by owner "
                   f"(every thread's op time counts; 'host, not in any op' is threads × wall "
                   f"minus all ops' self time: Python, scheduler, sampling, idle threads):"
                   f"\n\n{gtable}\n\nTop ops by self CPU time:\n\n```\n{table}\n```\n")
    print(f"wrote {out}")


OWNERS = (  # (owner, predicate on the op name), first match wins
    ("plugin: QuaRot linear kernels", lambda n: n.startswith("quarot_cpu::")
     or n.startswith("quarot::")),
    ("vLLM: attention + KV cache", lambda n: "attention" in n or "kv_cache" in n
     or "reshape_and_cache" in n or n.startswith("_C::cpu_attn")),
    ("vLLM: other custom ops (rotary, norms, activations)", lambda n: n.startswith("_C::")
     or n.startswith("vllm::")),
    ("torch: dtype conversions and copies", lambda n: n in (
        "aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous", "aten::clone")),
    ("torch: bf16 GEMMs (unquantized layers)", lambda n: n in (
        "aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")),
)


def owners(events, total_ms: float) -> dict[str, float]:
    """Self CPU ms by owner; the rest of the torch ops; host time not inside any op."""
    out = {name: 0.0 for name, _ in OWNERS}
    out["torch: other ops"] = 0.0
    for e in events:
        ms = e.self_cpu_time_total / 1e3
        owner = next((name for name, match in OWNERS if match(e.key)), "torch: other ops")
        out[owner] += ms
    out["host, not in any op"] = max(0.0, total_ms - sum(out.values()))
    return out


if __name__ == "__main__":
    main()
