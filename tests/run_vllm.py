"""Runs one vLLM engine in a fresh process and prints its results as JSON.

Tests call it with subprocess: every engine gets its own process (vLLM spawns workers
and keeps global state), and the test process keeps only the simulation.
usage: run_vllm.py MODEL [--quantization Q] [--compile] [--max-tokens N] PROMPT...
"""

import argparse
import json
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompts", nargs="*")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="small values force chunked prefill")
    ap.add_argument("--sequential", action="store_true",
                    help="one request at a time (later ones hit the prefix cache)")
    ap.add_argument("--prompt-file", default=None, help="JSON list of prompts (replaces args)")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    a = ap.parse_args()
    prompts = json.load(open(a.prompt_file)) if a.prompt_file else a.prompts

    from vllm import LLM, SamplingParams

    llm = LLM(
        a.model,
        quantization=a.quantization,
        dtype=a.dtype,
        enforce_eager=not a.compile,
        max_model_len=256,
        max_num_seqs=32,
        seed=0,
        kv_cache_dtype=a.kv_cache_dtype,
        enable_prefix_caching=True,
        max_num_batched_tokens=a.max_num_batched_tokens,
        tensor_parallel_size=a.tp,
        pipeline_parallel_size=a.pp,
        distributed_executor_backend="mp" if a.tp * a.pp > 1 else None,
    )
    params = SamplingParams(
        max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=0
    )
    if a.sequential:
        outs = [o for p in prompts for o in llm.generate([p], params, use_tqdm=False)]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    results = []
    for out in outs:
        pairs = zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)
        lps = [None] + [d[t].logprob for d, t in pairs]
        results.append(
            {
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(out.outputs[0].token_ids),
                "prompt_logprobs": lps,
            }
        )
    cfg = llm.llm_engine.vllm_config
    print("RESULT_JSON " + json.dumps({
        "quantization": cfg.model_config.quantization,
        "results": results,
    }))
