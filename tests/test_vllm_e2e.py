"""End to end through real vLLM (CPU): the plugin serves QuaRot checkpoints and
computes what the pure-PyTorch simulation computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import RANDOM_MODEL_KV_CLIP, TINYSTORIES, view
from engines import run_vllm

from vllm_quarot.eval.simulate import load_simulated
from vllm_quarot.format import QuaRotFormat
from vllm_quarot.offline.quantize import QuantizeOptions, quantize
from vllm_quarot.runtime.ops import cpu as cpu_ops

pytestmark = pytest.mark.vllm

PROMPTS = [
    "Once upon a time",
    "The cat sat on the mat and",
    "Lily and Tom went to the park. They saw",
    "One day, a little bird",
]
# Both sides compute in float32 with the same integer codes, but vLLM's RMSNorm, RoPE
# and attention kernels (and our native KV4 kernel's summation order) differ from
# transformers' in the last bits. Measured differences are ~1e-4 nats; 2e-2 still
# catches any real error (a wrong scale, a missing Hadamard or a mis-loaded shard moves
# log-probs by whole nats). A rare value sitting on a rounding boundary (a 4- or 8-bit
# code, a KV row's float16 scale) lands on the neighbouring code, and the random test
# models' ~400-nat logits turn that one flip into up to ~1e-3 of a log-prob's size, from
# that token on in that prompt only (seen: 0.43 nats at -415 on the W4A8KV4 Phi-3 model
# on an AVX2 CPU, none on AVX-512 ones). So the median over all positions must stay
# within LOGPROB_TOL (an error in an op moves every prompt), and each position within
# LOGPROB_TOL + FLIP_RTOL·|log-prob| (one flipped code at most).
LOGPROB_TOL = 2e-2
FLIP_RTOL = 2e-3

__all__ = ["LOGPROB_TOL", "PROMPTS", "greedy", "run_vllm", "simulate"]


@torch.no_grad()
def greedy(sim: torch.nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding that, like vLLM with ignore_eos, does not stop at EOS."""
    out = sim(ids, use_cache=True)
    tokens = []
    for _ in range(n):
        nxt = out.logits[0, -1].argmax()
        tokens.append(int(nxt))
        out = sim(nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def simulate(model: Path, results: list[dict], distinct: bool = True,
             logprob_tol: float = LOGPROB_TOL, logprob_rtol: float = FLIP_RTOL,
             median_rtol: float = 0.0) -> None:
    """Check vLLM's greedy tokens and prompt log-probs against the simulation: the
    median of |vLLM - sim| - median_rtol·|sim| over all positions below logprob_tol,
    each position below logprob_tol + logprob_rtol·|sim| (a rounding tie flipped: see
    FLIP_RTOL; median_rtol: an engine in bf16, whose every position rounds)."""
    sim = load_simulated(model)
    diffs: list[float] = []
    for r in results:
        ids = torch.tensor([r["prompt_token_ids"]])
        sim_tokens = greedy(sim, ids, len(r["token_ids"]))
        assert r["token_ids"] == sim_tokens, (r["token_ids"], sim_tokens)
        with torch.no_grad():
            lp = torch.log_softmax(sim(ids).logits[0].double(), -1)
        sim_lp = [lp[i - 1, t].item() for i, t in enumerate(r["prompt_token_ids"]) if i > 0]
        pairs = list(zip(r["prompt_logprobs"][1:], sim_lp, strict=True))
        worst = max(abs(a - b) - logprob_rtol * abs(b) for a, b in pairs)
        assert worst < logprob_tol, f"prompt log-probs differ by {worst} beyond the rtol"
        diffs += [abs(a - b) - median_rtol * abs(b) for a, b in pairs]
    median = float(torch.tensor(diffs).median())
    assert median < logprob_tol, f"prompt log-probs differ by {median} (median)"
    if distinct:  # the 4 standard prompts must not collapse onto one continuation
        assert len({tuple(r["token_ids"]) for r in results}) == len(results)


@pytest.mark.quick
def test_eager_matches_simulation(engine, quarot_w4a4):
    """The default checkpoint (GPTQ W4A4, 8-bit lm_head): detected and served on the
    native CPU kernels, the lm_head on vLLM's int8 kernel or ours; vLLM = simulation."""
    qc = json.loads((quarot_w4a4 / "config.json").read_text())["quantization_config"]
    assert qc["lm_head"]["bits"] == 8 and qc["ignore"] == []
    out = engine(quarot_w4a4, "--quantization", "quarot").run(PROMPTS)
    assert out["quantization"] == "quarot"
    if cpu_ops.AVAILABLE:
        assert f"run on native CPU kernels ({cpu_ops.isa()})" in out["log"]
    assert "QuaRot W8A8 per-channel layers run on" in out["log"]  # the lm_head
    simulate(quarot_w4a4, out["results"])


@pytest.mark.skipif(not cpu_ops.AVAILABLE, reason="covered by the test above")
def test_reference_ops_match_simulation(engine, quarot_w4a4):
    """VLLM_QUAROT_NO_EXT=1: the pure-PyTorch ops serve the same tokens."""
    out = engine(quarot_w4a4, VLLM_QUAROT_NO_EXT="1").run(PROMPTS)
    assert "run on the reference torch ops" in out["log"]
    simulate(quarot_w4a4, out["results"])


def test_triton_kernels_match_simulation(engine, quarot_w4a4):
    """The GPU path's Triton kernels, run by Triton's interpreter on CPU tensors inside
    vLLM (native library off): same tokens as the simulation. This checks the kernels'
    wiring in the linear method end to end; their speed needs a GPU. (Their static and
    weight-only branches are checked layer by layer against the reference in
    test_linear_method.py.) Eight tokens a prompt: every step is interpreted Python,
    and the prefill plus a few decode steps already run each kernel in both shapes."""
    out = engine(quarot_w4a4, VLLM_QUAROT_NO_EXT="1", TRITON_INTERPRET="1").run(
        PROMPTS, max_tokens=8)
    assert "run on Triton kernels (interpreted)" in out["log"]
    simulate(quarot_w4a4, out["results"])


def test_compiled_autodetect_matches_simulation(engine, quarot_w4a4):
    """No --quantization flag: detected from config.json; torch.compile path."""
    out = engine(quarot_w4a4, "--compile").run(PROMPTS)
    assert out["quantization"] == "quarot"
    simulate(quarot_w4a4, out["results"])


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, shared_data) -> Path:
    from vllm_quarot.eval.zoo import make_random_model

    return make_random_model(tmp_path_factory.mktemp("phi3") / "src", "phi3")


@pytest.mark.parametrize(("scheme", "arch", "r1"), [
    ("w8a8", "llama", "fused"), ("w8a8-static", "llama", "fused"),
    ("w4a16", "llama", "fused"), ("kv4", "llama", "fused"), ("w4a8kv4", "phi3", "fused"),
    ("w4a4kv4", "llama", "online"),
], ids=["w8a8", "w8a8-static", "w4a16", "kv4", "w4a8kv4-phi3", "w4a4kv4-r1-online"])
def test_other_schemes_match_simulation(tmp_path, engine, random_llama, phi3, scheme, arch,
                                        r1):
    """8-bit activations (dynamic, static; on 8- and 4-bit weights), weight-only and
    KV-only (16-bit rotated weights, 4-bit cache with R3): same as the simulation. The
    W4A8KV4 case is Phi-3 (fused qkv_proj / gate_up_proj on disk, loaded by vLLM's fused
    path), quantized through the model map alone. --r1 online (group-wise W4A4KV4): the
    stored Hadamards on q/k/v, gate/up and o_proj (run as R4 is, fused into the
    kernel's quantizer) beside R2, R3, R4 and the kept, sign-randomized RMSNorm gains."""
    out_dir = tmp_path / scheme
    quantize(phi3 if arch == "phi3" else random_llama, out_dir, QuantizeOptions(
        scheme=scheme, weight_method="rtn", w_clip=True, group_size=64, r1=r1,
        calib=str(TINYSTORIES), nsamples=4, seqlen=64, kv_clip=RANDOM_MODEL_KV_CLIP))
    out = engine(out_dir).run(PROMPTS)
    if r1 == "online":
        fmt = QuaRotFormat.from_dict(json.loads((out_dir / "config.json").read_text())[
            "quantization_config"])
        assert [t.name for t in fmt.rotation.input_transforms] == [
            "r1_hidden", "r1_o_in"] and fmt.rotation.r4 is not None
    assert out["quantization"] == "quarot"
    # 8-bit activations of clip 1.0 run on vLLM's int8 kernels, whose own per-token
    # quantizer (vectorised per ISA) may break a rounding tie the other way than the
    # simulation's (seen: 0.06 nats at -520 on an AVX-512 CI machine): FLIP_RTOL.
    simulate(out_dir, out["results"])


def test_a8_layers_and_4bit_lm_head_match_simulation(tmp_path, engine, random_llama):
    """--a8-layers 2: the two sub-blocks with the largest 4-bit activation error keep
    8-bit activations; --lm-head w4a8: vLLM's ParallelLMHead gets the QuaRot linear
    method with 4-bit codes on our kernel and 8-bit per-token activations. vLLM serves
    each layer at its own precision, as the simulation computes."""
    out_dir = tmp_path / "a8"
    quantize(random_llama, out_dir, QuantizeOptions(
        scheme="w4a4", calib=str(TINYSTORIES), nsamples=8, seqlen=128, a8_layers="2",
        lm_head="w4a8"))
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert len(qc["activation"]["layer_bits"]) >= 2
    assert qc["lm_head"]["bits"] == 4 and qc["ignore"] == []
    out = engine(out_dir).run(PROMPTS)
    assert "QuaRot W4A8 per-channel" in out["log"] and "QuaRot W4A4 per-channel" in out["log"]
    simulate(out_dir, out["results"])


def _vllm_has_cpu_wna16() -> bool:
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def test_w4a16_bfloat16_runs_on_vllms_cpu_kernel(tmp_path, engine, random_llama):
    """In bf16, W4A16 layers run vLLM's own CPUWNA16LinearKernel on the checkpoint's
    codes where this vLLM build has its op (the AVX2 build does not: then the reference
    ops, and the log says why): same greedy tokens as the float32 simulation, log-probs
    within bf16's rounding (this model's log-probs reach -400: a bf16 engine with the
    reference ops is 0.77 off). On CPUs with AMX the engine's first forward is vLLM's
    AMX code: it must not die of SIGILL (the glue asks for the tile permission)."""
    out_dir = tmp_path / "w4a16"
    quantize(random_llama, out_dir, QuantizeOptions(
        scheme="w4a16", weight_method="rtn", group_size=64))
    # bf16 and float32 greedy paths part after ~20 tokens on this random model: 8 here
    out = engine(out_dir, "--dtype", "bfloat16").run(PROMPTS, max_tokens=8)
    if _vllm_has_cpu_wna16():
        assert "run on vLLM's W4A16 kernels [VLLMWNA16LinearKernel]" in out["log"]
    else:
        assert "[ReferenceLinearKernel]" in out["log"]
        assert "VLLMWNA16LinearKernel: this vLLM CPU build (no AVX-512) lacks" in out["log"]
    simulate(out_dir, out["results"], logprob_tol=0.1, logprob_rtol=1e-2, median_rtol=1e-2)


def test_plain_checkpoint_with_quarot_flag_is_a_clear_error(refusals):
    assert "is not a QuaRot checkpoint" in refusals["plain-with-quarot-flag"]


# ------------------------------------------------------------------ KV4 (4-bit cache)

LONG_PREFIX = (
    "Once upon a time, there was a little girl named Lily. She liked to play in the "
    "park with her friend Tom. One day they found a big red ball under a tree and"
)
# the KV4 checkpoint's engine: every prompt longer than 32 tokens is prefilled in chunks
KV4_ENGINE = ("--max-num-batched-tokens", "32")


def _kv_capacity(log: str) -> int:
    line = next(x for x in log.splitlines() if "KV cache size:" in x)
    return int(line.split("KV cache size:")[1].split("tokens")[0].replace(",", ""))


def test_kv4_matches_simulation_and_holds_3_5x_bf16(engine, quarot_w4a4kv4, random_llama):
    """Auto-enabled from the checkpoint; the cache holds 72 bytes per token and head."""
    out = engine(quarot_w4a4kv4, *KV4_ENGINE).run(PROMPTS)
    simulate(quarot_w4a4kv4, out["results"])
    cfg = json.loads((random_llama / "config.json").read_text())
    per_token = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (64 // 2 + 4) * 2
    # vLLM rounds the capacity down to whole blocks
    assert 0 <= (1 << 30) // per_token - _kv_capacity(out["log"]) < 1024
    bf16_per_token = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * 64 * 2
    assert _kv_capacity(out["log"]) >= 3.5 * ((1 << 30) // bf16_per_token)


def test_kv4_prefix_caching_and_chunked_prefill(engine, quarot_w4a4kv4):
    """Requests one after another share a long cached prefix, and every prompt is
    longer than the 32-token prefill chunk: same tokens as separate simulations."""
    prompts = [LONG_PREFIX + " Lily", LONG_PREFIX + " Tom", LONG_PREFIX + " the ball"]
    out = engine(quarot_w4a4kv4, *KV4_ENGINE).run(prompts, sequential=True)
    assert all(len(r["prompt_token_ids"]) > 32 for r in out["results"])
    simulate(quarot_w4a4kv4, out["results"])


def test_kv4_sixteen_concurrent_sequences(engine, quarot_w4a4kv4):
    words = LONG_PREFIX.split()
    prompts = [" ".join(words[: 2 + 3 * i]) for i in range(16)]
    out = engine(quarot_w4a4kv4, *KV4_ENGINE).run(prompts, max_tokens=12)
    simulate(quarot_w4a4kv4, out["results"], distinct=False)


def test_kv4_flag_on_a_16bit_checkpoint(engine, quarot_w4a4):
    """--kv-cache-dtype int4_per_token_head on a W4A4 (KV16) checkpoint: KV4 without
    R3; the simulation of the same checkpoint with a kv_cache section agrees."""
    out = engine(quarot_w4a4, "--kv-cache-dtype", "int4_per_token_head").run(PROMPTS)

    def as_kv4(cfg: dict) -> None:
        # a hand-made KV4 checkpoint without R3: its scheme says so, and it records no
        # rotation (which would promise R3 for a 4-bit cache)
        qc = cfg["quantization_config"]
        qc["kv_cache"] = {"bits": 4, "group_size": -1, "asymmetric": True,
                          "clip_ratio": 1.0}
        qc["scheme"] = "w4a4kv4"
        del qc["quantizer"]["rotate"]

    sim_dir = quarot_w4a4.parent / "kv4-view"
    if not sim_dir.exists():
        view(quarot_w4a4, sim_dir, as_kv4)
    simulate(sim_dir, out["results"])


@pytest.fixture(scope="module")
def qwen2_massive_keys_kv4(tmp_path_factory) -> Path:
    """A Qwen2-shaped model with Qwen2's massive key biases (vllm_quarot.eval.zoo), its KV cache
    quantized with the KV choices calibrated (every layer shifts its keys). The kv4
    scheme (16-bit weights and activations) isolates the cache: with 8-bit activations
    on this model, vLLM and the simulation differ by up to ~0.2 nats already at KV16
    (activation codes that flip on last-bit differences, amplified by the massive q·k
    terms), which the KV path must not be blamed for."""
    from vllm_quarot.eval.zoo import make_random_model

    root = tmp_path_factory.mktemp("qwen2-keys")
    src = make_random_model(root / "src", "qwen2", hidden=256, intermediate=512, heads=4,
                            kv_heads=2, layers=3, key_bias=100.0)
    out = root / "kv4"
    quantize(src, out, QuantizeOptions(scheme="kv4", weight_method="rtn",
                                       calib=str(TINYSTORIES), nsamples=8, seqlen=128))
    return out


def test_kv4_shifted_keys_and_per_layer_r3_match_simulation(engine, qwen2_massive_keys_kv4):
    """Massive key biases (Qwen2): vLLM with the checkpoint's key/value shifts and
    per-layer R3 computes what the simulation computes, in float32; and so does a view
    of the same checkpoint with R3 on layer 1 only (R3 is online: any subset serves)."""
    ckpt = qwen2_massive_keys_kv4
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache"]["shift"] is True
    assert all(c["k_shift"] for c in qc["quantizer"]["kv_calibration"].values())
    simulate(ckpt, engine(ckpt).run(PROMPTS)["results"])

    def r3_on_layer_1(cfg: dict) -> None:
        cfg["quantization_config"]["rotation"]["r3"]["layers"] = [1]

    other = view(ckpt, ckpt.parent / "r3-layer-1", r3_on_layer_1)
    simulate(other, engine(other).run(PROMPTS)["results"])


def test_kv4_checkpoint_with_contradicting_cache_dtype_is_an_error(refusals):
    """Refused in the calling process, before any engine process starts."""
    out = refusals["kv4-with-fp8-cache"]
    assert "LLM_RAISED CheckpointFormatError" in out
    assert "quantized for a 4-bit KV cache" in out


def test_unsupported_cache_dtype_on_cpu_is_an_error(refusals):
    """vLLM's own CPU backend silently runs int8_per_token_head with wrong output."""
    out = refusals["int8-cache-on-cpu"]
    assert "--kv-cache-dtype int8_per_token_head is not supported on CPU" in out


# ------------------------------------------------ KV4 pivots (IntactKV, kv_cache.pivots)


@pytest.fixture(scope="module")
def qwen25_sink_kv4(tmp_path_factory) -> Path:
    """A random Qwen2.5-shaped model (14 heads / 2 KV heads, k biases of 145-211, q
    biases up to 0.56 of them) whose BOS is an attention sink
    (zoo.make_qwen25_like_model), KV4 with the choices and the pivots calibrated: the
    sink draws ~30 % of the attention, so auto gives P = 1."""
    from vllm_quarot.eval.zoo import make_qwen25_like_model

    root = tmp_path_factory.mktemp("qwen25-sink")
    src = make_qwen25_like_model(root / "src")
    out = root / "kv4"
    quantize(src, out, QuantizeOptions(scheme="kv4", weight_method="rtn",
                                       calib=str(TINYSTORIES), nsamples=8, seqlen=128))
    return out


def test_kv4_pivots_through_chunked_prefill_and_prefix_cache(engine, qwen25_sink_kv4):
    """A kv_cache.pivots checkpoint: the float16 pivots live in the padded tail of each
    sequence's first page. Chunked prefill: prompts longer than the 32-token chunk;
    vLLM's prompt log-probs and tokens are the simulation's with pivots, not without.
    Prefix caching (only requests without prompt log-probs read the cache): a second
    request sharing a prefix of more than one 128-token block reuses the first's first
    block, pivots included, and still decodes the simulation's tokens. The capacity
    counts the tail and stays above 3.4x bf16. (Preemption: the next test.)"""
    ckpt = qwen25_sink_kv4
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache"]["pivots"] == 1
    eng = engine(ckpt, *KV4_ENGINE)
    out = eng.run([LONG_PREFIX + " Lily", PROMPTS[0], PROMPTS[1]], max_tokens=8)
    assert len(out["results"][0]["prompt_token_ids"]) > 32
    simulate(ckpt, out["results"], distinct=False)
    no_pivots = view(ckpt, ckpt.parent / "no-pivots",
                     lambda c: c["quantization_config"]["kv_cache"].update(pivots=0))
    with pytest.raises(AssertionError):
        simulate(no_pivots, out["results"], distinct=False)

    shared = " ".join([LONG_PREFIX] * 3)  # > 128 tokens: one whole cached block
    cached = eng.run([shared + " Lily", shared + " Tom"], max_tokens=8, sequential=True,
                     prompt_logprobs=False)["results"]
    assert cached[0]["num_cached_tokens"] == 0 and cached[1]["num_cached_tokens"] >= 128
    sim = load_simulated(ckpt)
    for r in cached:
        assert r["token_ids"] == greedy(sim, torch.tensor([r["prompt_token_ids"]]),
                                        len(r["token_ids"]))

    cfg = json.loads((ckpt / "config.json").read_text())
    bf16_per_token = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * 64 * 2
    ratio = _kv_capacity(out["log"]) / ((1 << 30) // bf16_per_token)
    assert ratio >= 3.4, ratio
    print(f"KV4 with 1 pivot: {ratio:.3f}x the bf16 capacity")


def test_kv4_pivots_survive_preemption(engine, qwen25_sink_kv4):
    """A cache of 4 blocks (2 sequences of the 256-token limit) and 4 requests that
    each grow into a second block: the scheduler preempts and recomputes (vLLM's
    counter says so), the recomputed sequences write their pivots again (or find their
    first block, tail included, in the prefix cache), and every request decodes the
    tokens it decodes alone, with no preemption and no cache read."""
    ckpt = qwen25_sink_kv4
    eng = engine(ckpt, *KV4_ENGINE, "--num-blocks", "4")
    prompts = [f"{LONG_PREFIX} {p}" for p in PROMPTS[:4]]
    batch = eng.run(prompts, max_tokens=150, prompt_logprobs=False)
    assert batch["num_preemptions"] > 0, batch["log"][-3000:]
    assert all(len(r["prompt_token_ids"]) + 150 > 128 for r in batch["results"])
    alone = eng.run(prompts, max_tokens=150, sequential=True)  # log-probs: no cache read
    assert alone["num_preemptions"] == batch["num_preemptions"]
    for got, ref in zip(batch["results"], alone["results"], strict=True):
        assert got["token_ids"] == ref["token_ids"]
