"""One vLLM engine in a fresh process, for tests: every engine gets its own process
(vLLM spawns workers and keeps global state), and the test process keeps only the
simulation.

usage: run_vllm.py MODEL [engine options] PROMPT...   one batch, then exit
       run_vllm.py MODEL [engine options] --serve     requests from stdin (tests/engines.py)

With --serve the engine starts once, prints ENGINE_READY, then answers each JSON line
on stdin ({"prompts": [...], "max_tokens": N, "sequential": bool}) with one
``RESULT_JSON {...}`` line, until stdin closes. Refusal cases are walked by
``run_vllm.py --refusals CASES.json``: each case an LLM(...) that must not start, its
exception and everything the engine printed between ``=== CASE id ===`` markers.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def engine_args(a: argparse.Namespace) -> dict:
    return dict(
        quantization=a.quantization,
        dtype=a.dtype,
        enforce_eager=not a.compile,
        max_model_len=a.max_model_len,
        max_num_seqs=32,
        seed=0,
        kv_cache_dtype=a.kv_cache_dtype,
        enable_prefix_caching=True,
        max_num_batched_tokens=a.max_num_batched_tokens,
        tensor_parallel_size=a.tp,
        pipeline_parallel_size=a.pp,
        distributed_executor_backend="mp" if a.tp * a.pp > 1 else None,
        # a cache of a few blocks forces preemption (and reports it)
        num_gpu_blocks_override=a.num_blocks,
        disable_log_stats=a.num_blocks is None,
    )


def generate(llm, prompts: list[str], max_tokens: int, sequential: bool,
             prompt_logprobs: bool = True) -> dict:
    """Greedy tokens, and the prompt log-probs unless prompt_logprobs is false (vLLM
    reads no prefix cache for a request that wants them: num_cached_tokens is 0)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            prompt_logprobs=0 if prompt_logprobs else None)
    if sequential:  # one request at a time (later ones hit the prefix cache)
        outs = [o for p in prompts for o in llm.generate([p], params, use_tqdm=False)]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    results = []
    for out in outs:
        lps = None
        if prompt_logprobs:
            pairs = zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)
            lps = [None] + [d[t].logprob for d, t in pairs]
        results.append({"prompt_token_ids": list(out.prompt_token_ids),
                        "token_ids": list(out.outputs[0].token_ids),
                        "prompt_logprobs": lps,
                        "num_cached_tokens": out.num_cached_tokens or 0})
    cfg = llm.llm_engine.vllm_config
    preemptions = None
    if cfg.cache_config.num_gpu_blocks_override is not None:  # stats are on
        preemptions = sum(m.value for m in llm.get_metrics()
                          if m.name == "vllm:num_preemptions")
    return {"quantization": cfg.model_config.quantization, "results": results,
            "num_preemptions": preemptions}


def walk_refusals(path: str) -> None:
    """Each case ({"id", "model", "args": LLM kwargs}) must fail to start."""
    from vllm import LLM

    for case in json.load(open(path)):
        print(f"=== CASE {case['id']} ===", file=sys.stderr, flush=True)
        print(f"=== CASE {case['id']} ===", flush=True)
        try:
            llm = LLM(case["model"], **case["args"])
        except Exception as e:  # noqa: BLE001 (the refusal is the point)
            first = str(e).splitlines()[0] if str(e) else ""
            print(f"LLM_RAISED {type(e).__name__} {first}", flush=True)
            print(f"LLM_RAISED {type(e).__name__} {first}", file=sys.stderr, flush=True)
        else:
            print("LLM_STARTED", flush=True)
            from vllm_quarot.eval.perplexity import shutdown_llm

            shutdown_llm(llm)
    print("=== END ===", file=sys.stderr, flush=True)
    print("=== END ===", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("prompts", nargs="*")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="small values force chunked prefill")
    ap.add_argument("--sequential", action="store_true",
                    help="one request at a time (later ones hit the prefix cache)")
    ap.add_argument("--prompt-file", default=None, help="JSON list of prompts (replaces args)")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="num_gpu_blocks_override: a small cache forces preemption")
    ap.add_argument("--serve", action="store_true", help="requests from stdin")
    ap.add_argument("--refusals", default=None, help="JSON file of must-refuse cases")
    a = ap.parse_args()
    if a.refusals:
        walk_refusals(a.refusals)
        sys.exit(0)

    from vllm import LLM

    from vllm_quarot.eval.perplexity import shutdown_llm

    llm = LLM(a.model, **engine_args(a))
    if not a.serve:
        prompts = json.load(open(a.prompt_file)) if a.prompt_file else a.prompts
        print("RESULT_JSON " + json.dumps(generate(llm, prompts, a.max_tokens,
                                                   a.sequential)), flush=True)
    else:
        print("ENGINE_READY", flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            out = generate(llm, req["prompts"], req.get("max_tokens", 32),
                           req.get("sequential", False), req.get("prompt_logprobs", True))
            print("RESULT_JSON " + json.dumps(out), flush=True)
    shutdown_llm(llm)
