"""Tensor-parallel-ready checkpoints offline (`vllm-quarot quantize --tp N`): the
block-diagonal R4 keeps the fp64 model invariant, the option's checks, and the
simulation's block path (block-diagonal R4, per-(token, block) activation scales on
the row-parallel o_proj and down_proj)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from vllm_quarot.eval.simulate import load_simulated
from vllm_quarot.eval.zoo import make_random_model
from vllm_quarot.format import FORMAT_VERSION, OnlineHadamard, QuaRotFormat
from vllm_quarot.hadamard import block_hadamard_transform, hadamard_matrix
from vllm_quarot.offline import rotation
from vllm_quarot.offline.quantize import QuantizeError, QuantizeOptions, quantize
from vllm_quarot.quant import fake_quantize_per_token, fake_quantize_per_token_blocks

# arch, hidden, intermediate, heads, kv heads, head_dim
QWEN2 = ("qwen2", 256, 480, 4, 2, 64)  # 480 = 60·8; /2 = 60·4, /4 = 60·2 (Paley I, q=59)
LLAMA = ("llama", 192, 320, 3, 1, 64)  # 320 = 20·16; /2 = 20·8, /4 = 20·4; 3 heads


def _model(tmp_path: Path, spec: tuple) -> Path:
    arch, hidden, inter, heads, kv, hd = spec
    return make_random_model(tmp_path / arch, arch, hidden, inter, heads, kv, head_dim=hd)


def _fmt(ckpt: Path) -> QuaRotFormat:
    return QuaRotFormat.from_dict(
        json.loads((ckpt / "config.json").read_text())["quantization_config"])


def _block_diag_r4(n: int, blocks: int) -> torch.Tensor:
    return torch.block_diag(*[hadamard_matrix(n // blocks)] * blocks)


def test_block_hadamard_is_block_diagonal():
    x = torch.randn(3, 5, 480, dtype=torch.float64)
    for blocks in (1, 2, 4, 8):
        want = x @ _block_diag_r4(480, blocks)
        torch.testing.assert_close(block_hadamard_transform(x, blocks), want,
                                   rtol=0, atol=1e-12)


def test_rotate_layer_r4_blocks():
    """down_proj's input columns get I_N ⊗ H_{n/N}; N = 1 is the whole-size R4."""
    w = torch.randn(64, 480, dtype=torch.float64)
    for blocks in (1, 2, 4):
        sd = {"mlp.down_proj.weight": w.clone()}
        rotation.rotate_layer(sd, None, 64, r2=False, r4=True, r4_blocks=blocks)
        torch.testing.assert_close(sd["mlp.down_proj.weight"], w @ _block_diag_r4(480, blocks),
                                   rtol=0, atol=1e-12)
    sd = {"mlp.down_proj.weight": w.clone()}
    rotation.rotate_layer(sd, None, 64, r2=False, r4=True)
    assert torch.equal(sd["mlp.down_proj.weight"], rotation.rotate_rows_in(w, None))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("spec", [QWEN2, LLAMA], ids=["qwen2-480", "llama-320"])
def test_tp_rotation_is_invariant(shared_data, tmp_path, spec, tp):
    src = _model(tmp_path, spec)
    s = quantize(src, tmp_path / "q", QuantizeOptions(
        scheme="w4a4", weight_method="rtn", verify=True, tp=tp))
    assert s.verify_max_rel_err < 1e-8
    fmt = _fmt(tmp_path / "q")
    inter = spec[2]
    assert fmt.tp_blocks == tp
    assert fmt.rotation.r4 == OnlineHadamard.of_size(inter, tp)
    assert fmt.rotation.r4.block_size == inter // tp
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    assert raw["quantization_config"]["tensor_parallel_blocks"] == tp
    assert raw["quantization_config"]["format_version"] == FORMAT_VERSION


def test_verify_catches_a_mismatched_block_r4(shared_data, tmp_path, monkeypatch):
    """The calibration / --verify forward applies the block-diagonal R4 online: weights
    rotated with the whole-size R4 no longer match it."""
    src = _model(tmp_path, QWEN2)
    rotate = rotation.rotate_layer

    def whole_r4(*args, r4_blocks=1, **kwargs):
        rotate(*args, **kwargs)

    import vllm_quarot.offline.quantize as q

    monkeypatch.setattr(q, "rotate_layer", whole_r4)
    with pytest.raises(QuantizeError, match="--verify failed"):
        quantize(src, tmp_path / "q", QuantizeOptions(
            scheme="w4a4", weight_method="rtn", verify=True, tp=2))


def test_tp_option_errors(shared_data, tmp_path, caplog):
    src = _model(tmp_path, QWEN2)  # o_proj input 256, intermediate 480
    rtn = dict(scheme="w4a4", weight_method="rtn")
    out = tmp_path / "q"
    with pytest.raises(QuantizeError, match=r"^--tp must be a positive number of blocks, got 0$"):
        quantize(src, out, QuantizeOptions(**rtn, tp=0))
    with pytest.raises(QuantizeError, match=r"^--tp 3 does not fit this model: 3 does not "
                       r"divide both the inputs of o_proj \(heads × head_dim 256\) and "
                       r"down_proj \(intermediate 480\); nearest --tp that works: 2$"):
        quantize(src, out, QuantizeOptions(**rtn, tp=3))
    with pytest.raises(QuantizeError, match=r"^--tp 16 does not fit this model: its "
                       r"block-diagonal online R4 needs a Hadamard matrix of order "
                       r"intermediate 480 / 16 = 30, which cannot be built here; nearest "
                       r"--tp that works: 8$"):
        quantize(src, out, QuantizeOptions(**rtn, tp=16))
    with pytest.raises(QuantizeError, match=r"^--group-size 16 does not divide the "
                       r"per-block input size \(in_features / --tp 4\) of down_proj 120: a "
                       r"weight group may not straddle two tensor-parallel ranks$"):
        quantize(src, out, QuantizeOptions(**rtn, tp=4, group_size=16))
    assert not out.exists()
    # without the online R4 the order does not matter (weight-only has R4 too)
    for opts in (dict(**rtn, online_hadamard=False), dict(scheme="w4a16", weight_method="rtn",
                                                          online_hadamard=False)):
        quantize(src, out, QuantizeOptions(**opts, tp=16, overwrite=True))
        fmt = _fmt(out)
        assert fmt.tp_blocks == 16 and fmt.rotation.r4 is None
    # no --tp > 1 works: none
    bad = make_random_model(tmp_path / "m188", "llama", 128, 188, 2, 1, head_dim=64)
    with pytest.raises(QuantizeError, match=r"order intermediate 188 / 2 = 94, which "
                       r"cannot be built here; nearest --tp that works: none$"):
        quantize(bad, out, QuantizeOptions(**rtn, tp=2))
    # heads % N: quantized (TP=1 serves it), with a one-line warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm_quarot.quantize"):
        quantize(src, out, QuantizeOptions(**rtn, tp=8, overwrite=True))
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert msgs == ["--tp 8: vLLM cannot serve this model (4 attention heads, 2 KV heads) "
                    "at tensor parallelism 8; the checkpoint still serves at TP=1 and 2, 4"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm_quarot.quantize"):
        quantize(src, out, QuantizeOptions(**rtn, tp=4, overwrite=True))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# --------------------------------------------------------------- the simulation's blocks


def _pre_hook(module: torch.nn.Module):
    (hook,) = module._forward_pre_hooks.values()
    return hook


@pytest.fixture(scope="module")
def tp2_models(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("tp2")
    src = _model(tmp, QWEN2)
    out = {}
    for name, opts in {"w4a4": {}, "w4a4-nohad": {"online_hadamard": False}}.items():
        out[name] = tmp / name
        quantize(src, out[name], QuantizeOptions(scheme="w4a4", weight_method="rtn", tp=2,
                                                 **opts))
    return src, out


def test_simulated_hooks_are_block_wise(tp2_models):
    _, ckpts = tp2_models
    model = load_simulated(ckpts["w4a4"])
    fmt = _fmt(ckpts["w4a4"])
    bits, clip = fmt.activation.bits, fmt.activation.clip_ratio
    layer = model.model.layers[0]
    torch.manual_seed(0)
    # down_proj: R4 = I_2 ⊗ H_240, then one scale per (token, half)
    down = layer.mlp.down_proj
    x = torch.randn(2, 7, 480) * torch.linspace(0.1, 3.0, 480)
    (got,) = _pre_hook(down)(down, (x,))
    r = (x.double() @ _block_diag_r4(480, 2)).float()
    torch.testing.assert_close(block_hadamard_transform(x, 2), r, rtol=0, atol=1e-5)
    y = block_hadamard_transform(x, 2)
    want = torch.cat([fake_quantize_per_token(y[..., :240], bits, clip),
                      fake_quantize_per_token(y[..., 240:], bits, clip)], dim=-1)
    assert torch.equal(got, want)
    assert not torch.equal(got, fake_quantize_per_token(y, bits, clip))
    # o_proj: --r1 online's Hadamard per half (I_2 ⊗ H_128, not H_256 across the
    # ranks' shards), then one scale per (token, 128 of heads × head_dim 256)
    assert {t.name: t.size for t in fmt.rotation.input_transforms} == {
        "r1_hidden": 256, "r1_o_in": 128}
    o = layer.self_attn.o_proj
    x = torch.randn(2, 7, 256) * torch.linspace(0.1, 3.0, 256)
    (got,) = _pre_hook(o)(o, (x,))
    y = block_hadamard_transform(x, 2)
    torch.testing.assert_close(y, (x.double() @ _block_diag_r4(256, 2)).float(), rtol=0,
                               atol=1e-5)
    want = torch.cat([fake_quantize_per_token(y[..., :128], bits, clip),
                      fake_quantize_per_token(y[..., 128:], bits, clip)], dim=-1)
    assert torch.equal(got, want)
    assert torch.equal(got, fake_quantize_per_token_blocks(y, bits, clip, 2))
    # the column-parallel linears: the whole-input Hadamard, one scale per token
    q = layer.self_attn.q_proj
    x = torch.randn(2, 7, 256) * torch.linspace(0.1, 3.0, 256)
    (got,) = _pre_hook(q)(q, (x,))
    assert torch.equal(got, fake_quantize_per_token(block_hadamard_transform(x, 1), bits,
                                                    clip))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_simulated_blocks_are_live(tp2_models, tmp_path):
    """The same --tp 2 checkpoint read as tensor_parallel_blocks 1 computes other
    numbers (per-token instead of per-(token, half) scales), close to them."""
    _, ckpts = tp2_models
    ids = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    ckpt = ckpts["w4a4-nohad"]
    one = tmp_path / "one"
    one.mkdir()
    for f in ckpt.iterdir():
        (one / f.name).symlink_to(f)
    (one / "config.json").unlink()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["tensor_parallel_blocks"] = 1
    (one / "config.json").write_text(json.dumps(cfg))
    a, b = _logits(load_simulated(ckpt), ids), _logits(load_simulated(one), ids)
    assert not torch.equal(a, b)
    assert ((a - b).norm() / a.norm()).item() < 0.2


def test_simulated_block_r4_matches_the_weights(tp2_models):
    """With 16-bit activations the simulated --tp 2 checkpoint (block R4 online, weights
    rotated with it) stays close to the original model; the whole-size R4 does not."""
    from transformers import AutoModelForCausalLM

    src, ckpts = tp2_models
    ids = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(1))
    ref = _logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), ids)
    sim = _logits(load_simulated(ckpts["w4a4"], act_bits_override={"": None}), ids)
    err = ((sim - ref).norm() / ref.norm()).item()
    assert err < 0.1, err


def test_online_r1_blocks_in_the_runtime(tp2_models):
    """--r1 online at --tp 2 (auto's choice at W4A4): the runtime runs o_proj's stored
    Hadamard of one rank's shard as the tensor-parallel R4 runs, I_2 ⊗ H_128 (one block
    per part at TP = 1, the rank's block at TP = 2), and q/k/v, gate/up's over the whole
    replicated input; a transform crossing the blocks is refused when the model is read."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from vllm_quarot.errors import CheckpointFormatError
    from vllm_quarot.runtime.config import QuaRotConfig
    from vllm_quarot.runtime.transform import HadamardTransform

    _, ckpts = tp2_models
    out = ckpts["w4a4"]
    hf = AutoConfig.from_pretrained(out)
    cfg = QuaRotConfig.from_config(hf.quantization_config)
    assert cfg.fmt.quantizer["r1"] == "online" and cfg.fmt.tp_blocks == 2
    cfg.maybe_update_config(str(out), hf)
    assert cfg.plain_hadamards == {"r1_hidden", "r1_o_in"}
    o = cfg._stored_transform(SimpleNamespace(input_size=256), "model.layers.1.self_attn.o_proj")
    assert isinstance(o, HadamardTransform)
    assert (o.spec.size, o.spec.blocks, o.fusable_size) == (256, 2, 128)
    assert o.spec == OnlineHadamard.of_size(256, 2)
    qkv = cfg._stored_transform(SimpleNamespace(input_size=256),
                                "model.layers.0.self_attn.qkv_proj")
    assert isinstance(qkv, HadamardTransform) and (qkv.spec.blocks, qkv.fusable_size) == (1, 256)
    cfg.fmt.check_transforms_tp(2, hf)  # each rank's shard holds its block
    crossing = cfg.fmt.model_copy(update={"tp_blocks": 4})
    with pytest.raises(CheckpointFormatError, match="crosses the tensor_parallel_blocks 4"):
        crossing.check_model(hf)


def test_online_r1_without_a_block_hadamard(shared_data, tmp_path, monkeypatch):
    """Where o_proj's per-rank block (heads × head_dim / N) has no Hadamard, --r1 auto
    falls back to the fused R1 and --r1 online is refused with the order."""
    from transformers import AutoConfig

    from vllm_quarot import hadamard
    from vllm_quarot.hadamard import HadamardSizeError
    from vllm_quarot.offline import plan

    cfg = AutoConfig.from_pretrained(_model(tmp_path, QWEN2))
    real = plan.factorize

    def no_128(n: int):
        if n == 128:  # o_proj's 256 / --tp 2
            raise HadamardSizeError("no Hadamard matrix of order 128 here")
        return real(n)

    monkeypatch.setattr(plan, "factorize", no_128)  # the refusal
    monkeypatch.setattr(hadamard, "factorize", no_128)  # has_hadamard (auto's fallback)
    auto = plan.plan_format(cfg, QuantizeOptions(scheme="w4a4", tp=2), torch.device("cpu"))
    assert not auto.transforms and auto.fmt.rotation.r1.kind == "randomized-hadamard"
    assert "r1" not in auto.fmt.quantizer
    one = plan.plan_format(cfg, QuantizeOptions(scheme="w4a4", tp=1), torch.device("cpu"))
    assert one.fmt.quantizer["r1"] == "online"
    with pytest.raises(QuantizeError, match="order 128"):
        plan.plan_format(cfg, QuantizeOptions(scheme="w4a4", tp=2, r1="online"),
                         torch.device("cpu"))
