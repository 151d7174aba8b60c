"""``vllm-quarot import``: llm-compressor-style compressed-tensors checkpoints with
online transforms (QuIP's ``v`` on every linear) become vllm-quarot checkpoints whose
simulation is compressed-tensors' own in-PyTorch model, and which the plugin serves
through real vLLM at TP = 1 and, with transform blocks inside the shards, TP = 2; our
own exports come back unchanged; what cannot be served is refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ct_checkpoints import make_ct_quip

from vllm_quarot.cli import main as cli_main
from vllm_quarot.eval.simulate import load_simulated
from vllm_quarot.eval.zoo import make_random_model
from vllm_quarot.format import TRANSFORMS_FILE, CheckpointFormatError, QuaRotFormat
from vllm_quarot.interop.compressed_tensors import export_checkpoint, load_with_transforms
from vllm_quarot.interop.ct_import import ImportError_, import_checkpoint
from vllm_quarot.offline.quantize import QuantizeOptions, quantize

IDS = torch.tensor([[1, 5, 9, 100, 200, 300, 7, 42, 11]])


@pytest.fixture(scope="module")
def tp_llama(tmp_path_factory, shared_data) -> Path:
    """Heads and sizes that divide by 2 (as test_parallel's)."""
    return make_random_model(tmp_path_factory.mktemp("imp") / "llama", hidden=256,
                             intermediate=512, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def quip(tmp_path_factory, random_llama, tp_llama) -> dict[str, Path]:
    """QuIP checkpoints and their imports: full transforms on the random Llama (192 and
    320: compressed-tensors' 192×192 and 160·2 Hadamards, applied as dense matmuls; W4A16
    and INT W4A4) and blocks of 64 on the TP-able one (the online Hadamard op)."""
    root = tmp_path_factory.mktemp("quip")
    out = {}
    for name, src, head_dim, a_bits in (("full", random_llama, None, None),
                                        ("block64", tp_llama, 64, None),
                                        ("full-w4a4", random_llama, None, 4)):
        ct = make_ct_quip(src, root / f"ct-{name}", head_dim=head_dim, input_bits=a_bits)
        import_checkpoint(ct, root / name)
        out[f"ct-{name}"], out[name] = ct, root / name
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.double()


@pytest.mark.parametrize("name", ["full", "block64"])
def test_import_simulates_compressed_tensors(quip, name):
    """Our simulation of the import = compressed-tensors' model in PyTorch (transformers
    decompresses the weights, compressed-tensors applies the stored transforms)."""
    ref = _logits(load_with_transforms(quip[f"ct-{name}"]))
    ours = _logits(load_simulated(quip[name]))
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()
    fmt = QuaRotFormat.from_dict(json.loads((quip[name] / "config.json").read_text())[
        "quantization_config"])
    sizes = sorted((t.size, t.linears) for t in fmt.rotation.input_transforms)
    if name == "full":  # one per input size: 192 (q/k/v, o, gate/up), 320 (down)
        assert [s for s, _ in sizes] == [192, 320]
        assert "mlp.down_proj" in sizes[1][1] and "self_attn.o_proj" in sizes[0][1]
    else:
        assert [s for s, _ in sizes] == [64] and len(sizes[0][1]) == 7


@pytest.mark.parametrize("bits", [4, 8])
def test_int_activations_import_as_compressed_tensors_quantizes(random_llama, tmp_path, bits):
    """QuIP + W4A4 / W4A8 (pack-quantized 4-bit weights, dynamic per-token 4- or 8-bit
    inputs) import as our w4a4 / w4a8 with the clip that reproduces compressed-tensors'
    input quantization: every code equal to its own (``forward_quantize``) except, at
    most, a token's largest |x|, which sits on the rounding boundary (7.5 steps) and
    which float32 rounding of its scale sends either way there (we: always away from
    zero, as exact arithmetic would); and the imported model simulates
    compressed-tensors' PyTorch model with its input quantization to 2e-3 of the logits
    (at 4 bits a tenth of what the input quantization itself moves them)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from vllm_quarot.interop.ct_import import ct_activation_clip
    from vllm_quarot.quant import fake_quantize_per_token

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, dynamic=True,
                            strategy="token")
    torch.manual_seed(0)
    x = torch.randn(1, 256, 192) * torch.rand(1, 256, 1) * 10
    lin = torch.nn.Linear(192, 8)
    lin.quantization_status = QuantizationStatus.FROZEN
    theirs = forward_quantize(lin, x, "input", args)
    ours = fake_quantize_per_token(x, bits, ct_activation_clip(bits))
    step = x.abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)
    code_diff = ((theirs - ours).abs() / step).round()
    at_max = x.abs() == x.abs().amax(-1, keepdim=True)
    assert code_diff[~at_max].max() == 0 and code_diff.max() <= 1
    assert code_diff[at_max].sum() < 0.25 * at_max.sum()

    ct = make_ct_quip(random_llama, tmp_path / "ct", input_bits=bits)
    summary = import_checkpoint(ct, tmp_path / "imp")
    assert summary.scheme == f"w4a{bits}"
    fmt = QuaRotFormat.from_dict(json.loads((tmp_path / "imp" / "config.json").read_text())[
        "quantization_config"])
    assert fmt.activation.bits == bits
    assert fmt.activation.clip_ratio == pytest.approx(ct_activation_clip(bits), abs=0)
    with pytest.raises(CheckpointFormatError, match="--tensor-parallel-size 2 cannot serve "
                       "this imported checkpoint: its inputs are quantized per token"):
        fmt.check_tensor_parallel(2)  # one line, as LLM(...) raises it
    ref = _logits(load_with_transforms(ct))
    scale = ref.abs().max()
    err = (_logits(load_simulated(tmp_path / "imp")) - ref).abs().max() / scale
    plain = _logits(load_with_transforms(_edit(ct, tmp_path / "w4a16", lambda qc: qc[
        "config_groups"]["group_0"].update(input_activations=None))))
    effect = (plain - ref).abs().max() / scale  # of CT's input quantization itself
    # 4-bit: the maxima's ties are a small part of the quantization; at 8 bits the
    # whole quantization is ~1e-3 of the logits here, and a tie is a step of 1/127
    assert err < 2e-3 and (bits == 8 or err < 0.1 * effect)


@pytest.mark.parametrize("input_bits", [None, 4])
def test_int_quantized_4bit_weights_import_as_packed_ones(random_llama, tmp_path, input_bits):
    """llm-compressor 0.14 writes W4A4 / W4A8 with the ``int-quantized`` format (one int8
    per 4-bit weight) where W4A16 is ``pack-quantized``: the same weights in either
    format import to the same tensors and config (the packed import is checked against
    compressed-tensors' own model above), and int8 codes outside the declared 4-bit range
    are refused in one line."""
    from safetensors.torch import load_file, save_file

    from vllm_quarot.offline.checkpoint import TensorSource

    imported = {}
    for fmt in ("pack-quantized", "int-quantized"):
        ct = make_ct_quip(random_llama, tmp_path / fmt, input_bits=input_bits,
                          weight_format=fmt)
        summary = import_checkpoint(ct, tmp_path / f"imp-{fmt}")
        assert summary.scheme == ("w4a16" if input_bits is None else f"w4a{input_bits}")
        src = TensorSource(tmp_path / f"imp-{fmt}")
        imported[fmt] = {k: src.get(k) for k in src.keys()}
        qc = json.loads((tmp_path / f"imp-{fmt}" / "config.json").read_text())[
            "quantization_config"]
        qc["quantizer"].pop("source")
        imported[fmt + ".config"] = qc
    packed, ints = imported["pack-quantized"], imported["int-quantized"]
    assert sorted(packed) == sorted(ints)
    for k in packed:
        assert torch.equal(packed[k], ints[k]), k
    assert imported["pack-quantized.config"] == imported["int-quantized.config"]
    bad = tmp_path / "int-quantized"
    shard = next(bad.glob("*.safetensors"))
    t = load_file(shard)
    name = next(k for k in sorted(t) if k.endswith("q_proj.weight") and t[k].dtype == torch.int8)
    t[name][0, 0] = 9
    save_file(t, shard, metadata={"format": "pt"})
    with pytest.raises(ImportError_, match="int8 codes outside the 4-bit range"):
        import_checkpoint(bad, tmp_path / "imp-bad")


@pytest.mark.parametrize(("n", "mode"), [(64, "hadamard-op"), (192, "dense"),
                                         (320, "dense"), (576, "dense"), (1536, "factored")])
@pytest.mark.parametrize("native", [True, False])
def test_runtime_transform_fast_path(n, mode, native, monkeypatch):
    """compressed-tensors' random Hadamards factor as signs · (A ⊗ H_P); each way the
    runtime applies one (the online Hadamard op — native kernel, or the reference op
    where it is absent —, the factored PyTorch GEMM, the dense matmul) equals the dense
    x @ M / √n, block-diagonally too; a non-±1 matrix has no factors."""
    import math

    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    from vllm_quarot.runtime.ops import cpu as cpu_ops
    from vllm_quarot.runtime.transform import MatrixTransform
    from vllm_quarot.stored_transforms import apply_matrix, factor_hadamard

    if native and not cpu_ops.AVAILABLE:
        pytest.skip("native CPU ops not built")
    monkeypatch.setattr(cpu_ops, "AVAILABLE", native)
    m = random_hadamard_matrix(n, torch.float64, gen=torch.Generator().manual_seed(n))
    m = (m / math.sqrt(n)).float()
    factors = factor_hadamard(m)
    assert factors is not None  # (192: compressed-tensors takes Sloane's 192×192 whole)
    assert factors[1].shape[0] < n or n == 192
    x = torch.randn(7, 2 * n, dtype=torch.bfloat16)
    want = apply_matrix(x, m)
    layer = torch.nn.Module()
    t = MatrixTransform("v", m, factors)
    assert t.mode == mode
    t.process_weights_after_loading(layer, torch.device("cpu"))
    got = t.apply(layer, x)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert factor_hadamard(torch.randn(n, n)) is None


def test_a_wrong_transform_is_refused(quip, tmp_path):
    """The matrix the weights were made with, or a one-line refusal."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(quip["full"], bad)
    t = load_file(bad / TRANSFORMS_FILE)
    name = sorted(t)[0]
    t[name] = t[name].flip(0).contiguous()
    save_file(t, bad / TRANSFORMS_FILE)
    with pytest.raises(CheckpointFormatError, match="is not the matrix the weights"):
        load_simulated(bad)
    (bad / TRANSFORMS_FILE).unlink()
    with pytest.raises(CheckpointFormatError, match="is missing"):
        load_simulated(bad)


@pytest.mark.parametrize(("scheme", "group"), [("w4a16", 64), ("w8a8", -1)])
def test_our_export_comes_back(tmp_path, random_llama, shared_data, scheme, group):
    """export → import: W4A16 (pack-quantized) and W8A8 (int-quantized, dynamic 8-bit
    inputs), each with R4 (a transform_config on down_proj), simulate as the original
    checkpoint, with the same int32 words and scales. (16-bit lm_head: the export writes
    a quantized one dequantized.)"""
    from conftest import TINYSTORIES

    from vllm_quarot.offline.checkpoint import TensorSource

    ours = tmp_path / "ours"
    quantize(random_llama, ours, QuantizeOptions(
        scheme=scheme, weight_method="rtn", group_size=group, calib=str(TINYSTORIES),
        nsamples=2, seqlen=64, lm_head="none"))
    export_checkpoint(ours, tmp_path / "ct")
    back = tmp_path / "back"
    summary = import_checkpoint(tmp_path / "ct", back)
    assert "R4_input_192" not in summary.format() and "before mlp.down_proj" in summary.format()
    a, b = _logits(load_simulated(ours)), _logits(load_simulated(back))
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    sa, sb = TensorSource(ours), TensorSource(back)
    for name in sa.keys():
        if name.endswith(("weight_packed", "weight_scale")):
            assert torch.equal(sa.get(name), sb.get(name)), name


def _edit(ct: Path, dst: Path, edit) -> Path:
    shutil.copytree(ct, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _apply(qc, **kw):
    qc["transform_config"]["config_groups"]["v"]["apply"][0].update(kw)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme is set"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False),
     "static symmetric int weights"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(actorder="group"),
     "g_idx"),
    (lambda qc: qc["transform_config"]["config_groups"]["v"].update(randomize=True),
     "randomize=true"),
    (lambda qc: _apply(qc, location="output"), "location 'output' runs online"),
    (lambda qc: _apply(qc, targets=["re:.*q_proj$"]), "differ across self_attn.q_proj"),
    (lambda qc: qc.update(quant_method="gptq"), "not a compressed-tensors checkpoint"),
    (lambda qc: qc["config_groups"]["group_0"].update(input_activations={
        "num_bits": 4, "type": "int", "symmetric": True, "dynamic": True,
        "strategy": "group", "group_size": 16}), "the import reads 4-bit W4A16"),
], ids=["kv-cache", "asymmetric", "actorder-group", "randomize", "output-location",
        "some-linears", "not-ct", "a4-per-group"])
def test_refusals_are_one_line(quip, tmp_path, capsys, edit, match):
    bad = _edit(quip["ct-full"], tmp_path / "bad", edit)
    with pytest.raises(ImportError_, match=match):
        import_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing that looks finished
    assert cli_main(["import", str(bad), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vllm-quarot import: error:") and "\n" not in err


def test_full_transform_refused_at_tp2(quip, tp_llama, tmp_path):
    """A transform spanning o_proj's / down_proj's whole input cannot run per rank; one
    of 64 inside each shard can (the engine test below serves it)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tp_llama)
    full = import_checkpoint(make_ct_quip(tp_llama, tmp_path / "ct"), tmp_path / "q").out_dir
    for ckpt, ok in ((full, False), (quip["block64"], True)):
        fmt = QuaRotFormat.from_dict(json.loads((ckpt / "config.json").read_text())[
            "quantization_config"])
        fmt.check_transforms_tp(1, cfg)
        if ok:
            fmt.check_transforms_tp(2, cfg)
        else:
            with pytest.raises(CheckpointFormatError, match="--tensor-parallel-size 2 "
                               "cannot serve this checkpoint: its online transform"):
                fmt.check_transforms_tp(2, cfg)


@pytest.mark.vllm
def test_engine_refuses_a_full_transform_at_tp2(refusals):
    """LLM(..., tensor_parallel_size=2) on it: one line, in the calling process."""
    log = refusals["imported-full-transform-at-tp2"]
    assert "LLM_RAISED CheckpointFormatError --tensor-parallel-size 2 cannot serve this " \
           "checkpoint: its online transform" in log


@pytest.mark.vllm
def test_vllm_serves_imports_at_tp1_and_tp2(quip, engine):
    """Through real vLLM: a full import (dense transforms; INT W4A4 with
    compressed-tensors' activation scale) at TP = 1 and the blocked W4A16 one (the
    Hadamard op) at TP = 1 and TP = 2 (one core per rank) give the simulation's tokens
    and prompt log-probs; their simulations are compressed-tensors' model (the full
    W4A16 import's too, above: it runs the same dense transforms)."""
    from test_parallel import ONE_CORE_PER_RANK
    from test_vllm_e2e import PROMPTS, simulate

    for name in ("full-w4a4", "block64"):
        out = engine(quip[name]).run(PROMPTS)
        assert out["quantization"] == "quarot"
        simulate(quip[name], out["results"])
    two = engine(quip["block64"], "--tp", "2", **ONE_CORE_PER_RANK).run(PROMPTS)
    simulate(quip["block64"], two["results"])
