"""Perplexity the GPTQ/QuaRot way: tokenize the whole text, cut non-overlapping
windows of seqlen tokens, and take exp of the mean next-token NLL over all windows.

The same windows are scored through vLLM (prompt log-probs: exactly the serving
path) or through a transformers model (the simulation, or the 16-bit original).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vllm_quarot.errors import QuaRotError


def token_windows(tokenizer: Any, text_file: str | Path, seqlen: int,
                  max_windows: int | None = None) -> list[list[int]]:
    text = Path(text_file).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0].tolist()
    n = len(ids) // seqlen
    if n == 0:
        raise QuaRotError(f"{text_file} has {len(ids)} tokens, fewer than seqlen {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]


def perplexity_from_nll(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def vllm_perplexity(llm: Any, windows: list[list[int]]) -> float:
    """Perplexity from vLLM's prompt log-probs of each window (first token unscored)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params,
                        use_tqdm=False)
    nll, count = 0.0, 0
    for out, w in zip(outs, windows, strict=True):
        for lp, t in zip(out.prompt_logprobs[1:], w[1:], strict=True):
            nll -= lp[t].logprob
            count += 1
    return perplexity_from_nll(nll, count)


@torch.no_grad()
def hf_perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    """The same number from a transformers causal LM (e.g. the simulation)."""
    nll, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])
        nll -= lp.sum().item()
        count += len(w) - 1
    return perplexity_from_nll(nll, count)


def is_quarot_checkpoint(model_dir: str | Path) -> bool:
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method") == "quarot"


def load_reference(model_dir: str | Path) -> torch.nn.Module:
    """The simulation of a QuaRot checkpoint, or the plain model in float32."""
    if is_quarot_checkpoint(model_dir):
        from vllm_quarot.eval.simulate import load_simulated

        return load_simulated(model_dir)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def shutdown_llm(llm: Any, timeout: float = 10.0) -> None:
    """Stop an ``LLM``'s engine now: the engine-core process (and its workers) and the
    client's output thread. Left to garbage collection, they may still be alive when
    the interpreter exits, and a daemon thread torn down inside native code aborts the
    process (SIGABRT, "terminate called without an active exception") after the work
    is done. vLLM 0.32's ``LLM`` has no shutdown method: this is its engine client's."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is None:
        return
    engine_core.shutdown()
    thread = getattr(engine_core, "output_queue_thread", None)
    if thread is not None and thread.is_alive():
        thread.join(timeout)


# An evaluation engine scores a few windows: on CPU it gets a KV cache of this many GiB
# unless VLLM_CPU_KVCACHE_SPACE says otherwise, instead of vLLM's default (92 % of the
# machine's memory, which vLLM refuses at start-up when other processes hold over 8 %)
EVAL_CPU_KV_GIB = 4
# ... and this many seconds for one engine step unless VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS
# says otherwise: a step of several 2048-token prompts with prompt log-probs took over
# vLLM's 300 s on a loaded 2-core CPU (bf16 emulated), which vLLM reports as a failure
EVAL_CPU_STEP_TIMEOUT_S = 3600


def eval_cpu_env() -> None:
    """Set VLLM_CPU_KVCACHE_SPACE and VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS for an
    evaluation engine on CPU (each only when not set)."""
    import os

    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(EVAL_CPU_KV_GIB))
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS",
                              str(EVAL_CPU_STEP_TIMEOUT_S))


def serve_perplexity(model_dir: str | Path, windows: list[list[int]], quantization: str | None,
                     dtype: str = "bfloat16", enforce_eager: bool = True) -> float:
    """Start a vLLM engine on model_dir, score the windows with it, and shut it down."""
    import gc

    from vllm import LLM

    seqlen = max(len(w) for w in windows)
    eval_cpu_env()
    llm = LLM(str(model_dir), quantization=quantization, dtype=dtype,
              enforce_eager=enforce_eager, max_model_len=seqlen + 8, max_num_seqs=8, seed=0)
    try:
        return vllm_perplexity(llm, windows)
    finally:
        shutdown_llm(llm)
        del llm
        gc.collect()
