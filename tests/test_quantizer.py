"""The offline quantizer: rotation invariance (fp64), GPTQ vs RTN, determinism,
checkpoint contents and every error path."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import TINYSTORIES
from tiny_models import STORIES_HF, make_random_model

from vllm_quarot.format import CheckpointFormatError, QuaRotFormat
from vllm_quarot.offline.gptq import HessianAccumulator, gptq_quantize
from vllm_quarot.offline.quantize import QuantizeError, QuantizeOptions, quantize
from vllm_quarot.quant import dequantize_weight, quantize_weight_rtn

RANDOM_ARCHS = [
    # arch, hidden, intermediate, heads, kv heads, tie
    ("llama", 192, 320, 3, 1, True),  # 12·16, 20·16
    ("mistral", 160, 304, 5, 5, False),  # 20·8, 76·4 (Paley II, q = 37)
    ("qwen2", 192, 224, 3, 1, True),  # q/k/v biases; 28·8 (Paley I over GF(27))
    ("qwen3", 128, 416, 2, 1, False),  # q_norm/k_norm; 52·8 (Paley II over GF(25))
]


@pytest.mark.parametrize("rotate", ["none", "r1r2", "quarot"])
def test_stories260k_rotation_is_invariant(shared_data, tmp_path, rotate):
    """Norm folding alone, + R1/R2, + R4 of order 172 = 4·43: same logits in fp64."""
    s = quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(
        scheme="w4a4", weight_method="rtn", rotate=rotate, verify=True))
    assert s.verify_max_rel_err is not None and s.verify_max_rel_err < 1e-10


@pytest.mark.parametrize("arch,hidden,inter,heads,kv,tie", RANDOM_ARCHS)
def test_random_architectures_rotation_is_invariant(tmp_path, shared_data, arch, hidden,
                                                     inter, heads, kv, tie):
    src = make_random_model(tmp_path / arch, arch, hidden, inter, heads, kv,
                            head_dim=hidden // heads, tie=tie)
    s = quantize(src, tmp_path / "q", QuantizeOptions(
        scheme="w4a4", weight_method="rtn", verify=True))
    assert s.verify_max_rel_err < 1e-10
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    fmt = QuaRotFormat.from_dict(cfg["quantization_config"])
    assert fmt.rotation.r4_size == inter and cfg["tie_word_embeddings"] is False


def test_gptq_beats_rtn_on_real_activations(shared_data):
    """Layer-output error ‖(W-Ŵ)X‖ on stories260K activations (TinyStories text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(STORIES_HF)
    ids = tok(TINYSTORIES.read_text()[:20000], return_tensors="pt").input_ids[:, :1024]
    acc = HessianAccumulator(model.config.intermediate_size)
    lin = model.model.layers[2].mlp.down_proj
    xs = []
    def capture(_m, args):
        acc.add(args[0])
        xs.append(args[0])

    hook = lin.register_forward_pre_hook(capture)
    with torch.no_grad():
        model(ids)
    hook.remove()
    x = xs[0].reshape(-1, lin.in_features)
    w = lin.weight.detach()
    q_r, s_r = quantize_weight_rtn(w, 4)
    q_g, s_g = gptq_quantize(w, acc.h, 4)
    err = {k: ((x @ (w - dequantize_weight(q, s, -1, torch.float64)).t()).norm()
               / (x @ w.t()).norm()).item()
           for k, (q, s) in {"rtn": (q_r, s_r), "gptq": (q_g, s_g)}.items()}
    assert err["gptq"] < 0.8 * err["rtn"], err


def _digest(d) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(shared_data, tmp_path):
    opts = QuantizeOptions(scheme="w4a4", weight_method="gptq", calib=str(TINYSTORIES),
                           nsamples=4, seqlen=64, seed=3)
    quantize(STORIES_HF, tmp_path / "a", opts)
    quantize(STORIES_HF, tmp_path / "b", opts)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    quantize(STORIES_HF, tmp_path / "c", QuantizeOptions(**{**opts.__dict__, "seed": 4}))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


@pytest.mark.parametrize("scheme", ["w4a4kv4", "w4a4", "w8a8", "w8a8-static", "w4a16", "kv4"])
def test_every_scheme_writes_a_valid_checkpoint(shared_data, tmp_path, scheme):
    s = quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(
        scheme=scheme, weight_method="rtn", calib=str(TINYSTORIES), nsamples=2, seqlen=64))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    fmt = QuaRotFormat.from_dict(cfg["quantization_config"])
    assert fmt.scheme == scheme
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    assert "QuaRot" in (tmp_path / "q" / "README.md").read_text()
    assert s.checkpoint_bytes > 0


def test_error_paths(shared_data, tmp_path):
    with pytest.raises(QuantizeError, match="unknown scheme"):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(scheme="w3a3"))
    with pytest.raises(QuantizeError, match="static activation scales need calibration"):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(scheme="w8a8-static",
                                                              weight_method="rtn"))
    with pytest.raises(QuantizeError, match="--calib FILE or --calib-self"):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(scheme="w4a4"))
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(scheme="w4a4",
                                                              calib="/no/such/file"))
    with pytest.raises(QuantizeError, match="CPU only"):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(scheme="w4a4",
                                                              weight_method="rtn", device="cuda"))
    with pytest.raises(QuantizeError, match="no config.json"):
        quantize(tmp_path, tmp_path / "x", QuantizeOptions(scheme="w4a4",
                                                            weight_method="rtn"))
    # an unsupported architecture
    cfg = json.loads((STORIES_HF / "config.json").read_text())
    bad = tmp_path / "gpt2ish"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"],
                                                 "model_type": "gpt2"}))
    with pytest.raises(QuantizeError, match="not supported; supported: LlamaForCausalLM"):
        quantize(bad, tmp_path / "x", QuantizeOptions(scheme="w4a4", weight_method="rtn"))


def test_self_calibration_is_data_free(shared_data, tmp_path):
    s = quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(
        scheme="w4a4", weight_method="gptq", calib_self=2, nsamples=2, seqlen=32))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quantizer"]["calibration"] == "self-generated:2"
    assert max(s.layer_errors.values()) < 0.5


def test_impossible_hadamard_size_is_a_clear_error(shared_data, tmp_path):
    src = make_random_model(tmp_path / "m", "llama", 128, 188, 2, 1, head_dim=64)
    with pytest.raises(QuantizeError, match="order 188.*--no-online-hadamard"):
        quantize(src, tmp_path / "q", QuantizeOptions(scheme="w4a4", weight_method="rtn"))
    s = quantize(src, tmp_path / "q", QuantizeOptions(
        scheme="w4a4", weight_method="rtn", online_hadamard=False, verify=True))
    assert s.verify_max_rel_err < 1e-10


def test_format_validation_errors():
    good = {"quant_method": "quarot", "format_version": 1, "weight": {"bits": 4},
            "activation": {"bits": 4, "clip_ratio": 0.9}, "kv_cache": None,
            "rotation": {"r1": {"seed": 0, "size": 64}}}
    QuaRotFormat.from_dict(good)
    cases = [
        ({"format_version": 2}, "format_version"),
        ({"quant_method": "gptq"}, "not a QuaRot checkpoint"),
        ({"weight": {"bits": 3}}, "weight bits"),
        ({"weight": {"bits": 4, "symmetric": False}}, "symmetric"),
        ({"activation": {"bits": 4, "clip_ratio": 1.5}}, "clip_ratio"),
        ({"activation": {"bits": 4, "dynamic": "static"}}, "not supported"),
        ({"weight": {"bits": 4, "colour": 1}}, "malformed"),
        ({"rotation": None}, "rotation"),
        ({"rotation": {"r4": {"size": 100, "hadamard": [12, 8]}}}, "does not multiply"),
    ]
    for patch, msg in cases:
        with pytest.raises(CheckpointFormatError, match=msg):
            QuaRotFormat.from_dict({**good, **patch})
