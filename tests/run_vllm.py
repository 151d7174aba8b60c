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
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(
        a.model,
        quantization=a.quantization,
        dtype=a.dtype,
        enforce_eager=not a.compile,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
    )
    params = SamplingParams(
        max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=0
    )
    results = []
    for out in llm.generate(a.prompts, params):
        pairs = zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)
        lps = [None] + [d[t].logprob for d, t in pairs]
        results.append(
            {
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(out.outputs[0].token_ids),
                "prompt_logprobs": lps,
            }
        )
    quant = llm.llm_engine.vllm_config.model_config.quantization
    print("RESULT_JSON " + json.dumps({"quantization": quant, "results": results}))
