"""SpinQuant (learned R1/R2) on tiny random models: the Cayley optimizer, the exactness
of the rotated forward, training under W4A4KV4 fake quantization, and the fusion of the
learned matrices by rotation.py's own code."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vllm_quarot.eval.zoo import make_random_model
from vllm_quarot.hadamard import hadamard_transform, random_signs
from vllm_quarot.offline.checkpoint import TensorSource
from vllm_quarot.offline.rotation import (
    LINEARS,
    fold_norms,
    r1_matrix,
    r2_matrix,
    rotate_layer,
    rotate_rows_in,
)
from vllm_quarot.offline.spinquant import (
    CayleySGD,
    LearnedRotations,
    _RotatedModel,
    learn_rotations,
)
from vllm_quarot.quant import dequantize_weight, quantize_weight_rtn

TINYSTORIES_REL = ("tinystories", "validation_head.txt")
W4A4KV4 = dict(w_bits=4, a_bits=4, kv_bits=4, act_clip=0.9, kv_clip=0.95)
FP = dict(w_bits=16, a_bits=None, kv_bits=None, act_clip=1.0, kv_clip=1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: threads only add contention (and the machine may be shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("spinquant")
    return {arch: make_random_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def calib(models, shared_data) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(models["llama"])
    text = shared_data.joinpath(*TINYSTORIES_REL).read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    t = 64
    return ids[: 4 * t].reshape(4, t)


@pytest.fixture(scope="module")
def learned(models, calib) -> LearnedRotations:
    torch.set_num_threads(1)
    return learn_rotations(models["llama"], calib, **W4A4KV4, steps=6, batch=4,
                           progress=False, eval_ids=calib[:2], eval_every=3)


def _ortho_err(r: torch.Tensor) -> float:
    return (r.t() @ r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max().item()


def test_cayley_step_keeps_orthogonality():
    torch.manual_seed(0)
    x = r1_matrix(random_signs(48, 3)).float().requires_grad_(True)
    target = torch.randn(48, 48)
    opt = CayleySGD([x], lr=1.5, momentum=0.9)
    start = ((x.detach() - target) ** 2).sum().item()
    for _ in range(5):
        opt.zero_grad()
        loss = ((x - target) ** 2).sum()
        loss.backward()
        opt.step()
        assert _ortho_err(x.detach().double()) < 1e-5  # float32 storage
    assert ((x.detach() - target) ** 2).sum().item() < start  # a descent method
    # float64: exact to rounding
    y = r2_matrix(16).requires_grad_(True)
    opt = CayleySGD([y], lr=1.5)
    (y * torch.randn(16, 16, dtype=torch.float64)).sum().backward()
    opt.step()
    assert _ortho_err(y.detach()) < 1e-12
    assert (y.detach() - r2_matrix(16)).abs().max() > 1e-3  # it moved


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotated_forward_is_exact_without_quantization(models, calib, arch):
    model = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32)
    with torch.no_grad():
        ref = model(calib, labels=calib).loss.item()
    res = learn_rotations(models[arch], calib, **FP, steps=1, batch=calib.shape[0],
                          progress=False)
    assert res.losses[0] == pytest.approx(ref, rel=1e-4)


def test_training_lowers_quantized_loss(models, learned):
    cfg = AutoConfig.from_pretrained(models["llama"])
    assert len(learned.losses) == 6
    assert learned.losses[-1] < learned.losses[0]
    assert learned.r1.dtype == torch.float64 and learned.r1.shape == (cfg.hidden_size,) * 2
    assert len(learned.r2) == cfg.num_hidden_layers
    for r in (learned.r1, *learned.r2):
        assert r.dtype == torch.float64
        assert _ortho_err(r) < 1e-6
    for r in learned.r2:
        assert r.shape == (cfg.head_dim, cfg.head_dim)
    init = r1_matrix(random_signs(cfg.hidden_size, 0))
    assert (learned.r1 - init).abs().max() > 1e-3
    assert learned.seconds > 0


def test_heldout_loss_is_measured_along_training(models, calib, learned):
    """eval_ids: the mean per-window loss before training (= the untrained rotation's,
    as a 0-step run measures it), every eval_every steps and after the last."""
    assert [s for s, _ in learned.heldout] == [0, 3, 6]
    untrained = learn_rotations(models["llama"], calib, **W4A4KV4, steps=0,
                                progress=False, eval_ids=calib[:2])
    assert untrained.heldout == [(0, pytest.approx(learned.heldout[0][1], rel=1e-6))]
    assert learned.heldout[-1][1] != learned.heldout[0][1]


def _fused_model(model_dir, r1, r2, online_r4: bool, w_bits: int = 16):
    """The float64 model the quantizer writes from these rotations (rotation.py's code),
    its weights RTN-quantized (no clip search) when w_bits < 16; R4 online."""
    src = TensorSource(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = cfg.head_dim
    sd = {}
    embed = src.get("model.embed_tokens.weight").double()
    sd["model.embed_tokens.weight"] = rotate_rows_in(embed, r1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {k[len(p):]: src.get(k).double() for k in src.keys() if k.startswith(p)}
        fold_norms(layer)
        rotate_layer(layer, r1, head_dim, r2=r2[i], r4=online_r4)
        if w_bits < 16:
            for name in LINEARS:
                q, s = quantize_weight_rtn(layer[f"{name}.weight"], w_bits)
                layer[f"{name}.weight"] = dequantize_weight(q, s, -1, torch.float64)
        sd.update({p + k: v for k, v in layer.items()})
    g = src.get("model.norm.weight").double()
    head = src.get("lm_head.weight" if "lm_head.weight" in src else
                   "model.embed_tokens.weight").double()
    sd["model.norm.weight"] = torch.ones_like(g)
    sd["lm_head.weight"] = rotate_rows_in(head * g, r1)
    cfg = copy.deepcopy(cfg)
    cfg.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
    model.load_state_dict(sd, strict=True)
    if online_r4:
        for layer in model.model.layers:
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args: (hadamard_transform(args[0]),))
    return model.eval()


def test_learned_rotations_fuse_with_rotation_py(models, calib, learned):
    """rotation.py's fold_norms + rotate_layer(r2=tensor) + rotated embedding / lm_head
    keep the full-precision function with the learned (non-Hadamard) matrices."""
    d = models["llama"]
    orig = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    fused = _fused_model(d, learned.r1, learned.r2, online_r4=True)
    with torch.no_grad():
        a = orig(calib[:2]).logits
        b = fused(calib[:2]).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_training_model_is_the_quantizers_function(models, calib, learned):
    """With W4 weights, the training forward at the learned R1/R2 is the loss of the
    weights that rotation.py fuses and RTN quantizes: the conventions (R2 vs R2ᵀ, R1 on
    inputs vs outputs, R4) match. Transposed R2s give a different loss."""
    d = models["llama"]
    w4 = dict(FP, w_bits=4)
    net = _RotatedModel(d, **w4, group_size=-1, online_r4=True, r3=True, device="cpu")
    with torch.no_grad():
        mine = net.loss(calib, learned.r1, learned.r2).item()
        ref = _fused_model(d, learned.r1, learned.r2, True, 4)(calib, labels=calib).loss
        wrong = _fused_model(d, learned.r1, [r.t() for r in learned.r2], True, 4)(
            calib, labels=calib).loss
    assert mine == pytest.approx(ref.item(), rel=2e-4)
    assert abs(wrong.item() - ref.item()) > 10 * abs(mine - ref.item())


def test_deterministic_for_a_seed(models, calib):
    kw = dict(W4A4KV4, steps=2, batch=1, progress=False)
    a = learn_rotations(models["llama"], calib, seed=1, **kw)
    b = learn_rotations(models["llama"], calib, seed=1, **kw)
    assert a.losses == b.losses
    assert torch.equal(a.r1, b.r1)
    assert all(torch.equal(x, y) for x, y in zip(a.r2, b.r2, strict=True))


def test_kl_loss_is_the_divergence_from_the_original(models, calib):
    """loss="kl": zero when nothing is quantized (the teacher is the same model with the
    fake quantizers off), positive with W4A4KV4, and it trains (the loss moves)."""
    fp = learn_rotations(models["llama"], calib, **FP, steps=1, batch=calib.shape[0],
                         progress=False, loss="kl")
    assert abs(fp.losses[0]) < 1e-5
    q = learn_rotations(models["llama"], calib, **W4A4KV4, steps=3, batch=calib.shape[0],
                        progress=False, loss="kl")
    assert q.losses[0] > 1e-3 and q.losses[-1] != q.losses[0]
    with pytest.raises(ValueError, match="loss must be"):
        learn_rotations(models["llama"], calib, **FP, steps=1, loss="mse")


def test_spinquant_trains_against_the_served_tp_model(models):
    """--rotate spinquant --tp 2 learns against the numerics a --tp 2 checkpoint is
    served with (transforms.py, the one installer): down_proj carries the
    block-diagonal R4 (I_2 ⊗ H_{n/2}), applied online block by block, and o_proj /
    down_proj inputs are quantized per (token, half); the learner's specs are the
    served format's."""
    from vllm_quarot.hadamard import block_hadamard_transform
    from vllm_quarot.models import LINEARS as CANONICAL
    from vllm_quarot.offline.options import QuantizeOptions
    from vllm_quarot.offline.plan import plan_format
    from vllm_quarot.transforms import linear_input_specs

    d = models["llama"]
    cfg = AutoConfig.from_pretrained(d)
    plan = plan_format(cfg, QuantizeOptions(scheme="w4a4kv4", rotate="spinquant", tp=2,
                                            weight_method="rtn"), torch.device("cpu"))
    net = _RotatedModel(d, **W4A4KV4, group_size=-1, online_r4=True, r3=True,
                        device="cpu", tp_blocks=2)
    served = linear_input_specs(plan.fmt, [f"model.layers.{i}.{n}" for i in range(2)
                                           for n in CANONICAL])
    assert {f"model.{k}": v for k, v in net.specs.items()} == served
    down = served["model.layers.0.mlp.down_proj"]
    assert down.r4.blocks == 2 and down.blocks == 2
    assert served["model.layers.0.self_attn.o_proj"].blocks == 2
    # the folded down_proj weight is the block-diagonal rotation of the original
    sd = {k: v.double() for k, v in AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32).model.layers[0].state_dict().items()}
    want = block_hadamard_transform(sd["mlp.down_proj.weight"], 2).float()
    got = net.w_out[0][:, net.split_out[0][0]:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
