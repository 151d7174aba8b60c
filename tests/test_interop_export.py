"""``vllm-quarot export --to compressed-tensors``: what stock vLLM serves without the
plugin gives the plugin's numbers; R4 as a transform_config reproduces our simulation
when compressed-tensors applies it in PyTorch; what cannot be expressed is refused with
one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_quarot.interop.compressed_tensors import (
    ExportError,
    export_checkpoint,
    load_with_transforms,
)
from vllm_quarot.offline.quantize import QuantizeOptions, quantize


def _quantized(tmp: Path, model: Path, name: str, **kw) -> Path:
    out = tmp / name
    quantize(model, out, QuantizeOptions(weight_method="rtn", device="cpu", **kw))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, random_llama) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export")
    return {
        # no online transform: stock vLLM serves it on CPU
        "w4a16": _quantized(tmp, random_llama, "w4a16", scheme="w4a16", group_size=64,
                            online_hadamard=False, lm_head="none"),
        "w8a8": _quantized(tmp, random_llama, "w8a8", scheme="w8a8", online_hadamard=False,
                           lm_head="none"),
        # online R4 (intermediate 320 = 20·16, Paley I): a transform_config
        "w4a16-r4": _quantized(tmp, random_llama, "w4a16-r4", scheme="w4a16", group_size=64,
                               lm_head="none"),
    }


def test_exported_layout(ckpts, tmp_path):
    out = export_checkpoint(ckpts["w4a16"], tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    w = cfg["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["strategy"], w["group_size"]) == (4, "group", 64)
    assert "transform_config" not in cfg and out.transforms == []
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate({k: v for k, v in cfg.items()
                                       if k != "transform_config"})  # its own schema


def test_r4_transform_matches_simulation(ckpts, tmp_path):
    """compressed-tensors' PyTorch transforms + decompressed weights = our simulation."""
    from vllm_quarot.eval.simulate import load_simulated

    summary = export_checkpoint(ckpts["w4a16-r4"], tmp_path / "ct")
    assert summary.transforms and "R4" in summary.transforms[0]
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["transform_config"]["config_groups"]["R4"]["type"] == "random-hadamard"
    theirs = load_with_transforms(tmp_path / "ct")
    ours = load_simulated(ckpts["w4a16-r4"])
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = theirs(ids).logits.double(), ours(ids).logits.double()
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
    # without the transform the same weights are far off (the check can fail)
    from transformers import AutoModelForCausalLM

    bare = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    with torch.no_grad():
        c = bare(ids).logits.double()
    assert ((c - b).abs().max() / b.abs().max()).item() > 1e-3


def test_refused_one_line(ckpts, rtn_w4a4, tmp_path):
    """What compressed-tensors / stock vLLM cannot express: one line (a QuaRotError, exit
    2 from the CLI), nothing written."""
    from vllm_quarot.cli import main
    from vllm_quarot.errors import QuaRotError
    from vllm_quarot.format import InputTransform, QuaRotFormat
    from vllm_quarot.interop.compressed_tensors import check_exportable

    with pytest.raises(ExportError, match="4-bit activations") as e:
        export_checkpoint(rtn_w4a4, tmp_path / "ct")
    assert isinstance(e.value, QuaRotError) and "\n" not in str(e.value)
    assert not (tmp_path / "ct").exists()
    assert main(["export", str(rtn_w4a4), str(tmp_path / "ct2")]) == 2
    assert not (tmp_path / "ct2").exists()
    w8a8 = QuaRotFormat.from_dict(json.loads(
        (ckpts["w8a8"] / "config.json").read_text())["quantization_config"])
    assert w8a8.activation is not None
    kv = QuaRotFormat.from_dict(w8a8.to_dict() | {
        "scheme": "w4a8kv4", "weight": {"bits": 4}, "kv_cache": {"bits": 4}})
    for fmt, reason in (
        (kv, "4-bit KV cache"),
        (w8a8.replace(tp_blocks=2), "tensor_parallel_blocks 2"),
        (w8a8.replace(rotation=w8a8.rotation.model_copy(update={"input_transforms": (
            InputTransform(name="r1_o_in", size=64, linears=("self_attn.o_proj",),
                           sha256="0" * 64),)})), "--r1 online"),
        (w8a8.replace(activation=w8a8.activation.model_copy(update={"clip_ratio": 0.9})),
         "clip ratio"),
    ):
        with pytest.raises(ExportError, match=reason) as e:
            check_exportable(fmt)
        assert "\n" not in str(e.value)


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["w4a16", "w8a8"])
def test_stock_vllm_serves_export(engine, ckpts, tmp_path_factory, name):
    """Stock vLLM (the plugin not loaded: VLLM_PLUGINS=none) on the export computes what
    our simulation of the original checkpoint computes (which the plugin serves:
    test_vllm_e2e). One engine per scheme, in bfloat16: stock vLLM's CPU kernels for
    compressed-tensors (cpu_gemm_wna16, int8_scaled_mm) take no float32."""
    from test_vllm_e2e import PROMPTS, _vllm_has_cpu_wna16, greedy

    from vllm_quarot.eval.simulate import load_simulated

    if name == "w4a16" and not _vllm_has_cpu_wna16():
        pytest.skip("stock vLLM's CPU W4A16 needs cpu_gemm_wna16, which this vLLM build "
                    "(no AVX-512) lacks: it fails at the first forward; the export's "
                    "layout and transforms are checked above")
    out = tmp_path_factory.mktemp("stock") / name
    export_checkpoint(ckpts[name], out)
    got = engine(out, "--dtype", "bfloat16", VLLM_PLUGINS="none").run(PROMPTS, max_tokens=4)
    assert got["quantization"] == "compressed-tensors"
    sim = load_simulated(ckpts[name])
    for r in got["results"]:
        ids = torch.tensor([r["prompt_token_ids"]])
        # greedy continuations of this random model part after a few bf16 tokens (and
        # int8 activation rounding differs between kernels): the first ones
        assert r["token_ids"][:3] == greedy(sim, ids, 3)
        with torch.no_grad():
            lp = torch.log_softmax(sim(ids).logits[0].double(), -1)
        for j, (t, a) in enumerate(zip(r["prompt_token_ids"][1:], r["prompt_logprobs"][1:],
                                       strict=True)):
            b = lp[j, t].item()
            # bf16 logits of this random model are O(300): a few bf16 steps apart; a
            # wrong layout or scale is off by tens of nats
            assert abs(a - b) <= 0.02 * abs(b) + 1.0, (j, a, b)
