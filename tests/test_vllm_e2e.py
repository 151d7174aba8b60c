"""End to end through real vLLM (CPU): the plugin serves QuaRot checkpoints and
computes what the pure-PyTorch simulation computes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import TINYSTORIES
from transformers import AutoTokenizer

from vllm_quarot.quantizer import QuantizeOptions, quantize
from vllm_quarot.simulate import load_simulated

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).parent / "run_vllm.py"
PROMPTS = [
    "Once upon a time",
    "The cat sat on the mat and",
    "Lily and Tom went to the park. They saw",
    "One day, a little bird",
]
# Both sides compute in float32 with the same integer codes, but vLLM's RMSNorm, RoPE
# and attention kernels differ from transformers' in the last bits; a rare activation
# sitting on a rounding boundary then lands on the neighbouring 4-bit code. Measured
# differences are ~1e-4 nats; 2e-2 still catches any real error (a wrong scale, a
# missing Hadamard or a mis-loaded shard moves log-probs by whole nats).
LOGPROB_TOL = 2e-2


def run_vllm(model: Path, *args: str) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(model), *args, *PROMPTS],
        capture_output=True, text=True, env=env, timeout=900,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line.removeprefix("RESULT_JSON "))
    raise AssertionError(f"vLLM run failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")


def simulate(model: Path, results: list[dict]) -> None:
    """Check vLLM's greedy tokens and prompt log-probs against the simulation."""
    sim = load_simulated(model)
    for r in results:
        ids = torch.tensor([r["prompt_token_ids"]])
        with torch.no_grad():
            gen = sim.generate(ids, max_new_tokens=len(r["token_ids"]), do_sample=False,
                               pad_token_id=0)
        sim_tokens = gen[0, ids.shape[1]:].tolist()
        assert r["token_ids"] == sim_tokens, (r["token_ids"], sim_tokens)
        with torch.no_grad():
            lp = torch.log_softmax(sim(ids).logits[0].double(), -1)
        sim_lp = [lp[i - 1, t].item() for i, t in enumerate(r["prompt_token_ids"]) if i > 0]
        diff = max(abs(a - b) for a, b in zip(r["prompt_logprobs"][1:], sim_lp, strict=True))
        assert diff < LOGPROB_TOL, f"prompt log-probs differ by {diff}"
    assert len({tuple(r["token_ids"]) for r in results}) == len(results)


def test_eager_matches_simulation(quarot_w4a4):
    out = run_vllm(quarot_w4a4, "--quantization", "quarot")
    assert out["quantization"] == "quarot"
    simulate(quarot_w4a4, out["results"])


def test_compiled_autodetect_matches_simulation(quarot_w4a4):
    """No --quantization flag: detected from config.json; torch.compile path."""
    out = run_vllm(quarot_w4a4, "--compile")
    assert out["quantization"] == "quarot"
    simulate(quarot_w4a4, out["results"])


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static", "w4a16"])
def test_other_schemes_match_simulation(tmp_path, random_llama, scheme):
    """8-bit activations (dynamic, static) and weight-only: same as the simulation."""
    out_dir = tmp_path / scheme
    quantize(random_llama, out_dir, QuantizeOptions(
        scheme=scheme, weight_method="rtn", w_clip=True, group_size=64,
        calib=str(TINYSTORIES), nsamples=4, seqlen=64))
    out = run_vllm(out_dir)
    assert out["quantization"] == "quarot"
    simulate(out_dir, out["results"])


def test_plain_checkpoint_with_quarot_flag_is_a_clear_error(random_llama):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(random_llama), "--quantization", "quarot", "x"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode != 0
    assert "is not a QuaRot checkpoint" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_serves_completions(quarot_w4a4):
    """`vllm serve MODEL --quantization quarot` (the console command setup.sh fixes)."""
    vllm_cmd = Path(sys.executable).with_name("vllm")
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    server = subprocess.Popen(
        [str(vllm_cmd), "serve", str(quarot_w4a4), "--quantization", "quarot",
         "--port", str(port), "--max-model-len", "256", "--enforce-eager",
         "--dtype", "float32", "--served-model-name", "quarot-tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()[-6000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"model": "quarot-tiny", "prompt": PROMPTS[0], "max_tokens": 8,
                             "temperature": 0, "return_token_ids": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        body = json.loads(urllib.request.urlopen(req, timeout=120).read())
        choice = body["choices"][0]
        assert body["usage"]["completion_tokens"] == 8 and choice["text"]
        tok = AutoTokenizer.from_pretrained(quarot_w4a4)
        ids = tok(PROMPTS[0], return_tensors="pt").input_ids
        assert choice["prompt_token_ids"] == ids[0].tolist()
        sim = load_simulated(quarot_w4a4)
        with torch.no_grad():
            gen = sim.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert choice["token_ids"] == gen[0, ids.shape[1]:].tolist()
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
