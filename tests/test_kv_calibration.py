"""The KV4 choices the quantizer calibrates per layer (offline/kv_calibration.py):
the key/value shift and SmoothAttention are exact (invariance tests), and on a model
with Qwen2's massive key biases the calibrated cache beats both QuaRot's R3-everywhere
and plain per-token-head KV4, while a model without them loses nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINYSTORIES
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_quarot.eval.simulate import load_simulated
from vllm_quarot.eval.zoo import make_random_model
from vllm_quarot.format import KV_SHIFT_FILE, CheckpointFormatError, QuaRotFormat
from vllm_quarot.offline import kv_calibration as kvc
from vllm_quarot.offline.quantize import QuantizeOptions, quantize


def test_key_shift_leaves_attention_unchanged():
    """softmax(q·(k − c)) = softmax(q·k) for a constant c (causal, GQA)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 33, 64, dtype=torch.float64)
    k = torch.randn(2, 2, 33, 64, dtype=torch.float64) + 50 * torch.randn(2, 1, 64).double()
    v = torch.randn(2, 2, 33, 64, dtype=torch.float64)
    c = torch.randn(2, 64, dtype=torch.float64) * 100
    ref = kvc.attention(q, k, v)
    assert torch.allclose(kvc.attention(q, k - c[:, None], v), ref, atol=1e-10)
    # the value shift comes back exactly: the weights of every query sum to 1
    assert torch.allclose(kvc.attention(q, k, v - c[:, None]) + c[:, None].repeat_interleave(
        2, dim=0), ref, atol=1e-10)


def test_pivots_stay_exact_in_the_kv_quantizer():
    """transforms.kv_fake_quant with pivots (kv_cache.pivots): the first P positions
    are the float16 keys, the rest the 4-bit ones, gradients straight through."""
    from vllm_quarot.transforms import kv_fake_quant

    torch.manual_seed(0)
    x = (torch.randn(2, 3, 20, 64) * 4).requires_grad_()
    q4 = kv_fake_quant(x, 4, 1.0)
    got = kv_fake_quant(x, 4, 1.0, ste=True, pivots=3)
    assert torch.equal(got[..., :3, :], x[..., :3, :].half().float())
    assert torch.equal(got[..., 3:, :], q4[..., 3:, :])
    got.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_attention_sinks_set_the_pivots():
    """leading_attention / sinks: a first token that draws most of the attention is a
    pivot, a uniform attention has none."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 64, 32), torch.randn(2, 2, 64, 32) * 0.1
    assert kvc.sinks(kvc.leading_attention(q, k, 4)) == 0
    q[..., 0] += 5.0
    k[:, :, 0, 0] = 10.0  # token 0: every query's top key (score ~8.8 against ~0)
    lead = kvc.leading_attention(q, k, 4)
    assert lead[0] > 0.5 and kvc.sinks(lead) == 1


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_smoothing_is_invariant_through_rope(tmp_path, shared_data, arch):
    """λ shared by the two channels of each RoPE pair, fused into q_proj/k_proj rows and
    biases, leaves the model's logits unchanged (float64)."""
    src = make_random_model(tmp_path / arch, arch, hidden=128, intermediate=256, heads=4,
                            kv_heads=2, layers=2, key_bias=50.0 if arch == "qwen2" else 0.0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        for layer in model.model.layers:
            sd = {k: v.clone() for k, v in layer.state_dict().items()}
            half = torch.rand(2, 32, dtype=torch.float64) * 10 + 0.1
            kvc.apply_smoothing(sd, torch.cat([half, half], dim=-1), heads=4)
            layer.load_state_dict(sd)
        got = model(ids).logits
    assert (got - ref).abs().max() < 1e-9 * ref.abs().max()
    # and a λ that differs within a pair would not commute with RoPE
    assert not torch.equal(kvc.smoothing_scales(torch.randn(1, 2, 8, 64), 0.5)[:, :32],
                           torch.ones(2, 32))


def test_every_layer_is_calibrated_with_the_pivots_it_is_served_with(tmp_path):
    """--kv-pivots auto finds the sinks (here in layer 2 only, as a real Qwen2.5 has
    none in its first layers) before the first layer's KV choice: each layer's choice
    is measured with the pivots the cache will keep. Calibrated without them, a layer
    whose keys share a large bias loses its common 4-bit clip error against the exact
    sink (the Qwen2.5 surrogate: +18 % perplexity at KV4)."""
    from vllm_quarot.eval.zoo import make_qwen25_like_model

    src = make_qwen25_like_model(tmp_path / "src", sink_layers=(2,))
    s = quantize(src, tmp_path / "kv4", QuantizeOptions(
        scheme="kv4", weight_method="rtn", calib=str(TINYSTORIES), nsamples=8, seqlen=128))
    qc = json.loads((tmp_path / "kv4" / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache"]["pivots"] == 1
    lead0 = [c["leading_attention"][0] for _, c in sorted(s.kv_choices.items())]
    assert lead0[0] < kvc.PIVOT_SHARE and lead0[1] < kvc.PIVOT_SHARE < lead0[2], lead0
    assert [c["pivots"] for _, c in sorted(s.kv_choices.items())] == [1, 1, 1]



def _kl_vs_original(src, ckpt, ids) -> float:
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    sim = load_simulated(ckpt)
    with torch.no_grad():
        p = ref(ids).logits.log_softmax(-1)
        q = sim(ids).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def kv_models(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("kvcal")
    return {name: make_random_model(root / name, arch, hidden=256, intermediate=512, heads=4,
                                    kv_heads=2, layers=3, key_bias=kb)
            for name, arch, kb in (("qwen2-massive-keys", "qwen2", 100.0),
                                   ("llama", "llama", 0.0))}


@pytest.mark.parametrize("name", ["qwen2-massive-keys", "llama"])
def test_calibrated_kv4_beats_r3_everywhere_and_plain_kv4(tmp_path, kv_models, name):
    """KL divergence of the simulated KV4 model from the original on TinyStories text.
    Massive keys: the calibrated cache shifts every layer's keys and is far better than
    both R3 on every layer and plain KV4. Ordinary keys: no worse than QuaRot's R3 everywhere."""
    src = kv_models[name]
    tok = AutoTokenizer.from_pretrained(src)
    text = TINYSTORIES.read_text()[20000:40000]
    ids = tok(text, return_tensors="pt").input_ids[:, :768].reshape(3, 256)
    base = dict(scheme="kv4", weight_method="rtn", calib=str(TINYSTORIES), nsamples=8,
                seqlen=256)
    kl = {}
    for case, extra in (("calibrated", {}), ("r3", dict(kv_calibrate=False)),
                        ("plain", dict(kv_calibrate=False, rotate="none"))):
        out = tmp_path / case
        quantize(src, out, QuantizeOptions(**base, **extra))
        kl[case] = _kl_vs_original(src, out, ids)
    qc = json.loads((tmp_path / "calibrated" / "config.json").read_text())["quantization_config"]
    choices = qc["quantizer"]["kv_calibration"]
    assert sorted(choices) == ["0", "1", "2"]
    # QuaRot's choice (R3) stays unless another cuts the error by MARGIN, so plain KV4
    # may be a hair better where it is kept (layer 1 of "llama": 0.10519 vs 0.10506
    # once the windows start with BOS)
    assert all(c["error"] <= c["r3_error"] + 1e-6
               and c["error"] <= c["plain_error"] / (1 - kvc.MARGIN) for c in choices.values())
    assert qc["rotation"]["r3"]["layers"] == [int(i) for i, c in choices.items() if c["r3"]]
    if name == "llama":
        assert kl["calibrated"] <= 1.1 * kl["r3"], kl
        return
    assert all(c["k_shift"] for c in choices.values())
    assert (tmp_path / "calibrated" / KV_SHIFT_FILE).is_file()
    # (whether R3 everywhere is worse than no rotation depends on the queries' share of
    # the massive channels: on the held-out Qwen2.5 it was; here, with small q biases,
    # it is not)
    assert kl["calibrated"] < 0.2 * min(kl["plain"], kl["r3"]), kl


def test_kv_shift_file_is_required_and_checked(tmp_path, kv_models):
    out = tmp_path / "ckpt"
    quantize(kv_models["qwen2-massive-keys"], out, QuantizeOptions(
        scheme="kv4", weight_method="rtn", calib=str(TINYSTORIES), nsamples=4, seqlen=128))
    load_simulated(out)
    shutil.move(out / KV_SHIFT_FILE, tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointFormatError, match="kv_shift.safetensors is missing"):
        load_simulated(out)
    from safetensors.torch import save_file
    save_file({"layers.0.k_shift": torch.zeros(3, 64)}, out / KV_SHIFT_FILE)
    with pytest.raises(CheckpointFormatError, match=r"layers.0.k_shift is shape \(3, 64\)"):
        load_simulated(out)


def test_r3_layers_in_the_format(tmp_path, kv_models):
    """rotation.r3.layers round-trips, must be increasing and inside the model; format
    v3 checkpoints (no layers, no shift) read as R3 on every layer, unshifted."""
    out = tmp_path / "ckpt"
    quantize(kv_models["llama"], out, QuantizeOptions(
        scheme="kv4", weight_method="rtn", calib=str(TINYSTORIES), nsamples=4, seqlen=128))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = QuaRotFormat.from_dict(qc)
    assert QuaRotFormat.from_dict(fmt.to_dict()) == fmt
    for bad, msg in (([2, 1], "increasing"), ([0, 0], "increasing"), ([-1], "increasing")):
        qc2 = json.loads(json.dumps(qc))
        qc2["rotation"]["r3"]["layers"] = bad
        with pytest.raises(CheckpointFormatError, match=msg):
            QuaRotFormat.from_dict(qc2)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["rotation"]["r3"]["layers"] = [7]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="names layer 7, but the model has 3"):
        load_simulated(out)
    v3 = json.loads(json.dumps(qc))
    v3["format_version"] = 3
    v3["rotation"]["r3"].pop("layers")
    v3["kv_cache"].pop("shift")
    old = QuaRotFormat.from_dict(v3)
    assert old.rotation.r3.layers is None and all(old.rotation.r3.applies_to(i)
                                                  for i in range(3))
    assert old.kv_cache.shift is False


def test_kv4_without_text_calibrates_on_the_models_own_samples(tmp_path, kv_models):
    """A 4-bit KV cache is never left uncalibrated by default: without --calib the
    quantizer generates 8 samples with the model (each starting where a sequence starts)
    and calibrates on them (8 × 512 tokens, the kv4 budget); --no-kv-calibrate keeps
    QuaRot's R3 on every layer, on purpose."""
    from vllm_quarot.offline.options import KV_SELF_SAMPLES

    src = kv_models["qwen2-massive-keys"]
    out = tmp_path / "self"
    s = quantize(src, out, QuantizeOptions(scheme="kv4", weight_method="rtn", seqlen=64))
    q = json.loads((out / "config.json").read_text())["quantization_config"]["quantizer"]
    assert q["calibration"] == f"self-generated:{KV_SELF_SAMPLES}" and q["kv_calibrate"]
    assert q["nsamples"] == KV_SELF_SAMPLES and sorted(q["kv_calibration"]) == ["0", "1", "2"]
    assert "KV cache: R3 on" in s.format() and "largest relative output errors" not in \
        s.format()  # 16-bit weights: no weight error to report
    off = tmp_path / "off"
    quantize(src, off, QuantizeOptions(scheme="kv4", weight_method="rtn",
                                       kv_calibrate=False))
    q = json.loads((off / "config.json").read_text())["quantization_config"]
    assert q["quantizer"]["calibration"] == "none"
    assert "layers" not in q["rotation"]["r3"]  # R3 on every layer
