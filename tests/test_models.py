"""The model map (vllm_quarot/models.py): names, fused projections (Phi-3), the
canonical architecture a fused family runs as offline, and Phi-3 quantized through the
map alone (its serving through vLLM is in test_vllm_e2e.py / test_parallel.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINYSTORIES
from transformers import AutoConfig, AutoModelForCausalLM

from vllm_quarot.eval.zoo import make_random_model
from vllm_quarot.format import QuaRotFormat
from vllm_quarot.models import (
    ATTN_IN,
    LINEARS,
    MLP_IN,
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    canonical_parts,
    family_of,
    sub_block,
)
from vllm_quarot.offline.layer_runner import load_canonical_model
from vllm_quarot.offline.quantize import QuantizeOptions, quantize


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, shared_data):
    return make_random_model(tmp_path_factory.mktemp("phi3") / "src", "phi3")


def test_names_map_to_canonical_linears():
    assert canonical_parts("model.layers.3.self_attn.qkv_proj") == [
        f"model.layers.3.{n}" for n in ATTN_IN]
    assert canonical_parts("model.layers.0.mlp.gate_up_proj") == [
        f"model.layers.0.{n}" for n in MLP_IN]
    assert canonical_parts("model.layers.2.mlp.down_proj") == ["model.layers.2.mlp.down_proj"]
    assert canonical_parts("lm_head") == ["lm_head"]
    assert sub_block("self_attn.qkv_proj").linears == ATTN_IN
    assert sub_block("model.layers.1.self_attn.k_proj").vllm == "self_attn.qkv_proj"
    assert "Phi3ForCausalLM" in SUPPORTED_ARCHITECTURES


def test_unsupported_architectures_are_named():
    cfg = AutoConfig.for_model("gpt2")
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported; supported: "
                       r"LlamaForCausalLM, .*Phi3ForCausalLM"):
        family_of(cfg)


def test_fused_tensors_split_and_fuse_back(phi3):
    """Phi-3's qkv_proj / gate_up_proj rows split into q, k, v / gate, up and
    concatenate back to the same bytes; a static input scale (one per input) is kept
    once."""
    cfg = AutoConfig.from_pretrained(phi3)
    fam = family_of(cfg)
    assert fam.name == "phi3" and fam.canonical == "mistral"
    assert [n for n, _ in fam.checkpoint_linears()] == [
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    g = torch.Generator().manual_seed(0)
    raw = {"self_attn.qkv_proj.weight": torch.randn(64 * 5, 192, generator=g),
           "mlp.gate_up_proj.weight": torch.randn(640, 192, generator=g),
           "input_layernorm.weight": torch.ones(192)}
    sd = fam.split(raw, cfg)
    assert set(sd) == {f"{n}.weight" for n in ATTN_IN + MLP_IN} | {"input_layernorm.weight"}
    assert sd["self_attn.k_proj.weight"].shape == (64, 192)
    torch.testing.assert_close(sd["self_attn.v_proj.weight"],
                               raw["self_attn.qkv_proj.weight"][256:])
    full = {f"model.layers.1.{k}": v for k, v in sd.items()}
    full.update({f"model.layers.1.{n}.input_scale": torch.tensor([0.5]) for n in ATTN_IN})
    fused = fam.fuse(full)
    assert torch.equal(fused["model.layers.1.self_attn.qkv_proj.weight"],
                       raw["self_attn.qkv_proj.weight"])
    assert torch.equal(fused["model.layers.1.mlp.gate_up_proj.weight"],
                       raw["mlp.gate_up_proj.weight"])
    assert torch.equal(fused["model.layers.1.self_attn.qkv_proj.input_scale"],
                       torch.tensor([0.5]))
    with pytest.raises(Exception, match="rows"):
        fam.split({"self_attn.qkv_proj.weight": torch.zeros(7, 192)}, cfg)


def test_canonical_architecture_computes_the_family(phi3):
    """Phi-3 as Mistral on the split tensors: the same logits, to the last bit."""
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    original = AutoModelForCausalLM.from_pretrained(phi3, dtype=torch.float32).eval()
    canonical = load_canonical_model(phi3)
    assert type(canonical).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(canonical(ids).logits, original(ids).logits,
                                   rtol=0, atol=1e-5)


def test_partial_rotary_is_refused(tmp_path):
    cfg = AutoConfig.for_model("phi3", architectures=["Phi3ForCausalLM"],
                               partial_rotary_factor=0.75)
    with pytest.raises(Exception, match="partial_rotary_factor 0.75"):
        family_of(cfg)


def test_phi3_quantizes_through_the_map(phi3, tmp_path):
    """GPTQ W4A4KV4 with --verify (the rotated canonical layers = the original Phi-3
    layers in float64), --a8-layers on a fused sub-block (named: which sub-block a count
    picks on a random model depends on the CPU's float rounding): the checkpoint stores
    Phi-3's fused tensors and validates."""
    from vllm_quarot.validate import validate_checkpoint

    out = tmp_path / "q"
    s = quantize(phi3, out, QuantizeOptions(scheme="w4a4kv4", calib=str(TINYSTORIES),
                                            nsamples=4, seqlen=64, verify=True,
                                            a8_layers="layers.0.mlp.up_proj"))
    assert s.verify_max_rel_err is not None and s.verify_max_rel_err < 1e-8
    assert set(s.layer_errors) >= {f"model.layers.0.{n}" for n in LINEARS}
    cfg = AutoConfig.from_pretrained(out)
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = QuaRotFormat.from_dict(raw)
    validate_checkpoint(out, fmt, cfg)
    from vllm_quarot.offline.checkpoint import TensorSource

    names = TensorSource(out).keys()
    assert "model.layers.0.self_attn.qkv_proj.weight_packed" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    # layer_bits name canonical linears; a fused module reads them as one precision
    assert sorted(fmt.activation.layer_bits) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    for name in fmt.activation.layer_bits:
        assert any(name.endswith(p) for p in LINEARS)
