"""Tensor and pipeline parallelism through real vLLM (CPU, one core per rank, mp
executor): a checkpoint quantized with --tp 2 serves the same greedy tokens and prompt
log-probs at TP = 1, TP = 2 and PP = 2 as the simulation; the wrong sizes are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINYSTORIES
from test_vllm_e2e import LOGPROB_TOL, PROMPTS, simulate

from vllm_quarot.eval.zoo import make_random_model
from vllm_quarot.offline.quantize import QuantizeOptions, quantize

pytestmark = pytest.mark.vllm

ONE_CORE_PER_RANK = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory, shared_data) -> dict[str, Path]:
    """Llama- and Qwen2-shaped random models whose heads divide by 2: 4 heads, 2 KV
    heads; Qwen2 with q/k/v biases and intermediate 480 (R4 blocks of 240 = 60·4)."""
    root = tmp_path_factory.mktemp("tp-models")
    return {
        "llama": make_random_model(root / "llama", hidden=256, intermediate=512, heads=4,
                                   kv_heads=2),
        "qwen2": make_random_model(root / "qwen2", "qwen2", hidden=256, intermediate=480,
                                   heads=4, kv_heads=2),
        # Qwen2's massive key biases: the calibrated KV4 cache shifts keys and values,
        # each rank with its KV head's shift
        "qwen2-keys": make_random_model(root / "qwen2-keys", "qwen2", hidden=256,
                                        intermediate=480, heads=4, kv_heads=2,
                                        key_bias=100.0),
        # fused qkv_proj / gate_up_proj on disk, split across ranks by vLLM's loader
        "phi3": make_random_model(root / "phi3", "phi3", hidden=256, intermediate=512,
                                  heads=4, kv_heads=2),
    }


def _quantize(src: Path, out: Path, scheme: str, tp: int, **kw) -> Path:
    quantize(src, out, QuantizeOptions(scheme=scheme, weight_method="rtn", tp=tp,
                                       calib=str(TINYSTORIES), nsamples=4, seqlen=64, **kw))
    return out


def _r1(ckpt: Path) -> str:
    """Where the quantizer put R1 (--r1 auto: online at 4-bit activations)."""
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    return cfg["quantizer"].get("r1", "fused")


def _same(a: dict, b: dict, tol: float = LOGPROB_TOL) -> None:
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert ra["token_ids"] == rb["token_ids"]
        diff = max(abs(x - y) for x, y in zip(ra["prompt_logprobs"][1:],
                                              rb["prompt_logprobs"][1:], strict=True))
        assert diff < tol, diff


def test_w4a4kv4_same_at_tp1_tp2_pp2(tmp_path, engine, tp_models):
    """The KV4 cache (heads split over ranks, R3 per head), the block R4 and the
    per-(token, block) activations of o_proj / down_proj: TP = 2 and PP = 2 give the
    tokens of TP = 1 and of the simulation. (PP = 2 in eager mode runs through the
    cpu-eager-pipeline-buffer patch.)"""
    ckpt = _quantize(tp_models["llama"], tmp_path / "w4a4kv4", "w4a4kv4", 2)
    assert _r1(ckpt) == "online"  # --r1 auto: o_proj's Hadamard one block per rank
    one = engine(ckpt).run(PROMPTS)
    simulate(ckpt, one["results"])
    two = engine(ckpt, "--tp", "2", **ONE_CORE_PER_RANK).run(PROMPTS)
    _same(one, two)
    pp = engine(ckpt, "--pp", "2", **ONE_CORE_PER_RANK).run(PROMPTS)
    _same(one, pp)


@pytest.mark.parametrize(("model", "scheme", "kw"), [
    ("qwen2", "w4a4", {}),
    ("llama", "w8a8-static", {}),
    ("phi3", "w4a16", {"group_size": 64}),
    ("qwen2-keys", "kv4", {}),
], ids=["qwen2-w4a4", "llama-w8a8-static", "phi3-w4a16-g64", "qwen2-keys-kv4-shifted"])
def test_schemes_at_tp2_match_simulation(tmp_path, engine, tp_models, model, scheme, kw):
    ckpt = _quantize(tp_models[model], tmp_path / scheme, scheme, 2, **kw)
    assert _r1(ckpt) == ("online" if scheme == "w4a4" else "fused")
    out = engine(ckpt, "--tp", "2", **ONE_CORE_PER_RANK).run(PROMPTS)
    simulate(ckpt, out["results"])


def test_full_r4_checkpoint_at_tp2_is_refused(refusals):
    """A --tp 1 checkpoint's R4 spans the whole intermediate size: TP = 2 would need
    every rank's slice; LLM(...) refuses in the calling process (before any worker
    starts) and names the --tp to quantize with."""
    log = refusals["full-r4-at-tp2"]
    assert "LLM_RAISED CheckpointFormatError --tensor-parallel-size 2 cannot serve this " \
           "checkpoint" in log
    assert "--tp 2" in log
