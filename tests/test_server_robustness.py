"""Seeded requests under chunked prefill must not kill the engine (vLLM 0.32 CPU bug,
patched by vllm_quarot.runtime.vllm_patches), and must stay reproducible.

Run as a script, this file is the offline engine run of the first test:
``python test_server_robustness.py offline MODEL OUT_JSON``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from servers import engine_env, health, vllm_server

pytestmark = pytest.mark.vllm

PATCH_LOG = "seeded requests survive chunked prefill"
LONG_CTX = 1024
OFFLINE_BATCHED_TOKENS = 640  # 8 prompts of ~600 tokens: chunked together, not alone
SEEDED_LENS = [600, 560, 630, 590, 610, 575, 620, 585]
LONG_LEN = 1000  # chunked even alone
MAX_TOKENS = 16


def prompt_ids(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 512) for _ in range(n - 1)]


# ---------------------------------------------------------------- offline (subprocess)

def offline_main(model: str, out_json: str) -> None:
    """8 seeded ~600-token prompts (+ a greedy, an unseeded and a 1000-token one) in
    one batch that the scheduler prefills in chunks, then each seeded prompt alone
    (in one chunk when it fits): the seeded tokens must be the same."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model, dtype="float32", max_model_len=LONG_CTX, enforce_eager=True,
              enable_chunked_prefill=True, max_num_batched_tokens=OFFLINE_BATCHED_TOKENS,
              enable_prefix_caching=False, max_num_seqs=16, seed=0)

    def sp(seed: int | None, temperature: float = 0.8) -> SamplingParams:
        return SamplingParams(temperature=temperature, seed=seed, max_tokens=MAX_TOKENS,
                              ignore_eos=True)

    seeded = [(prompt_ids(n, i), i) for i, n in enumerate(SEEDED_LENS)]
    seeded.append((prompt_ids(SEEDED_LENS[0], 0), 100))  # same prompt, another seed
    seeded.append((prompt_ids(LONG_LEN, 99), 7))
    extra = [(prompt_ids(SEEDED_LENS[0], 0), sp(None, 0.0)),  # greedy
             (prompt_ids(500, 50), sp(None))]  # unseeded random
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in seeded + extra]
    params = [sp(s) for _, s in seeded] + [p for _, p in extra]
    batched = [list(o.outputs[0].token_ids)
               for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [list(llm.generate([TokensPrompt(prompt_token_ids=p)], sp(s),
                               use_tqdm=False)[0].outputs[0].token_ids)
             for p, s in seeded]
    with open(out_json, "w") as f:
        json.dump({"batched": batched, "alone": alone, "n_seeded": len(seeded)}, f)


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory, shared_data) -> Path:
    """The tiny random Llama with a 1024-token context and a 0.03× lm_head: its
    next-token distributions are broad (entropy ~1.4 nats at T=0.8) so that seeds
    decide the sampled tokens."""
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_quarot.eval.zoo import make_random_model

    out = make_random_model(tmp_path_factory.mktemp("models") / "llama-long")
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = LONG_CTX
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"] = (weights["lm_head.weight"] * 0.03).to(torch.float32)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_seeded_chunked_prefill_offline_is_reproducible(long_llama, tmp_path):
    out_json = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, __file__, "offline", str(long_llama), str(out_json)],
        capture_output=True, text=True, env=engine_env(), timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert PATCH_LOG in log
    assert "does not use offset" not in log
    out = json.loads(out_json.read_text())
    n = out["n_seeded"]
    batched, alone = out["batched"][:n], out["alone"]
    assert all(len(t) == MAX_TOKENS for t in out["batched"] + alone)
    # same seeded request: same tokens, prefilled in chunks with others or alone
    assert batched == alone
    # the seeds decide: same prompt with another seed, and greedy, differ
    assert batched[0] != batched[len(SEEDED_LENS)]
    assert batched[0] != out["batched"][n]


# ---------------------------------------------------------------- OpenAI server

def _post(port: int, body: dict, timeout: float = 300) -> tuple[int, dict | str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return -1, repr(e)


@pytest.fixture(scope="module")
def server(quarot_w4a4):
    """`vllm serve` on the W4A4 checkpoint with 256-token prefill chunks: (port, its
    output so far, the process); shared by the tests of this module."""
    with vllm_server(quarot_w4a4, "--quantization", "quarot", "--max-model-len", "512",
                     "--max-num-batched-tokens", "256", "--max-num-seqs", "16",
                     "--enforce-eager", "--dtype", "float32", "--served-model-name",
                     "quarot-tiny", env=engine_env()) as running:
        yield running


def test_openai_server_serves_completions(server, quarot_w4a4):
    """`vllm serve MODEL --quantization quarot` (the console command setup.sh fixes):
    greedy completions equal the simulation's."""
    from test_vllm_e2e import PROMPTS, greedy
    from transformers import AutoTokenizer

    from vllm_quarot.eval.simulate import load_simulated

    port, _log, _server = server
    status, body = _post(port, {"model": "quarot-tiny", "prompt": PROMPTS[0],
                                "max_tokens": 8, "temperature": 0,
                                "return_token_ids": True}, timeout=120)
    assert status == 200, body
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] == 8 and choice["text"]
    tok = AutoTokenizer.from_pretrained(quarot_w4a4)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    assert choice["prompt_token_ids"] == ids[0].tolist()
    assert choice["token_ids"] == greedy(load_simulated(quarot_w4a4), ids, 8)


def test_openai_server_survives_concurrent_seeded_long_prompts(server):
    """12 concurrent seeded requests with ~400-token prompts (prefilled in 256-token
    chunks) all succeed, and the server stays healthy and serves another request."""
    port, log, proc = server

    def body(i: int) -> dict:
        b = {"model": "quarot-tiny", "prompt": prompt_ids(360 + 7 * i, i),
             "max_tokens": 16, "temperature": 0.8, "seed": i, "ignore_eos": True}
        if i % 4 == 1:
            b["logprobs"] = 2
        if i % 4 == 2:
            b["n"] = 2
        return b

    results: dict[int, tuple[int, dict | str]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, _post(port, body(i)))) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    failed = {i: r for i, r in results.items() if r[0] != 200}
    assert len(results) == 12 and not failed, (failed, "".join(log)[-6000:])
    for i, (_, b) in results.items():
        assert len(b["choices"]) == (2 if i % 4 == 2 else 1)
        assert all(c["text"] for c in b["choices"])
    assert proc.poll() is None and health(port) == 200
    status, b = _post(port, body(0), timeout=120)
    assert status == 200 and b["usage"]["completion_tokens"] == 16
    assert "does not use offset" not in "".join(log)


if __name__ == "__main__" and sys.argv[1:2] == ["offline"]:
    offline_main(sys.argv[2], sys.argv[3])
