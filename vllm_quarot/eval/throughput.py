"""How fast a vLLM engine decodes and prefills, measured one way everywhere (the demo,
benchmarks/cpu_e2e.py, kv_cache.py, vs_llamacpp.py): synthetic token prompts (no
tokenizer), greedy decoding with ignore_eos, a warm-up of the shapes first, the median
of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Any


def prompt_ids(i: int, n: int = 16, vocab: int = 31000) -> list[int]:
    """A deterministic synthetic prompt (token ids away from the specials)."""
    return [(37 * i + 11 * j) % (vocab - 200) + 100 for j in range(n)]


def timed_generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds to generate max_tokens greedy tokens for every prompt, all at once."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                       detokenize=False)
    t = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=x) for x in prompts], p, use_tqdm=False)
    return time.perf_counter() - t


def decode_tokens_per_s(llm: Any, sequences: int, tokens: int = 64, vocab: int = 31000,
                        repeats: int = 1, prompt_len: int = 16) -> float:
    """Generated tokens per second (all sequences together) for `sequences` concurrent
    prompts of prompt_len tokens decoding `tokens` each: median of repeats after a
    warm-up of the same shapes."""
    timed_generate(llm, [prompt_ids(i, prompt_len, vocab) for i in range(sequences)], 4)
    runs = [timed_generate(llm, [prompt_ids(100 * r + i, prompt_len, vocab)
                                 for i in range(sequences)], tokens)
            for r in range(1, repeats + 1)]
    return sequences * tokens / statistics.median(runs)


def time_to_first_token(llm: Any, prompt_len: int = 1024, vocab: int = 31000,
                        repeats: int = 1) -> float:
    """Seconds to prefill one prompt_len-token prompt and sample its first token
    (median of repeats after a warm-up of the long-prompt path)."""
    timed_generate(llm, [prompt_ids(7, prompt_len, vocab)], 1)
    return statistics.median(timed_generate(llm, [prompt_ids(8 + r, prompt_len, vocab)], 1)
                             for r in range(repeats))


def kv_capacity_tokens(llm: Any) -> int:
    """Tokens the engine's KV cache holds (vLLM's "KV cache size")."""
    cache = llm.llm_engine.vllm_config.cache_config
    return (cache.num_gpu_blocks or 0) * cache.block_size
