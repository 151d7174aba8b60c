"""The offline quantizer: rotation invariance (fp64), GPTQ vs RTN, determinism,
checkpoint contents and every error path."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINYSTORIES
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from vllm_quarot.eval.zoo import STORIES_HF, make_random_model
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


@pytest.mark.parametrize("r1", ["fused", "online"])
@pytest.mark.parametrize("arch,hidden,inter,heads,kv,tie", RANDOM_ARCHS)
def test_random_architectures_rotation_is_invariant(tmp_path, shared_data, arch, hidden,
                                                     inter, heads, kv, tie, r1):
    """R1/R2/R4 (fused R1), or R2/R4 and --r1 online's signs folded into norms, v_proj
    (biases included) and o_proj: the same model in fp64, on every family."""
    src = make_random_model(tmp_path / arch, arch, hidden, inter, heads, kv,
                            head_dim=hidden // heads, tie=tie)
    s = quantize(src, tmp_path / "q", QuantizeOptions(
        scheme="w4a4", weight_method="rtn", verify=True, r1=r1))
    assert s.verify_max_rel_err < 1e-10
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    fmt = QuaRotFormat.from_dict(cfg["quantization_config"])
    assert fmt.rotation.r4_size == inter and cfg["tie_word_embeddings"] is False
    assert fmt.tp_blocks == 1 and fmt.rotation.r4.blocks == 1  # --tp: test_tp_offline.py


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


def test_gptq_dynamic_groups():
    """--dynamic-groups: with a diagonal Hessian nothing propagates, so each group's
    scale is the static one and so are the codes; with a correlated one the later
    groups' scales follow the updated weights and the output error is no worse; with
    act order it is refused."""
    g = torch.Generator().manual_seed(0)
    k, n, gs = 256, 48, 64
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    diag = torch.diag(torch.rand(k, generator=g, dtype=torch.float64) + 0.5)
    for clip in (False, True):
        qs, ss = gptq_quantize(w, diag, 4, gs, clip)
        qd, sd = gptq_quantize(w, diag, 4, gs, clip, dynamic_groups=True)
        assert torch.equal(qs, qd) and torch.equal(ss, sd)
    x = torch.randn(2048, k, generator=g, dtype=torch.float64) @ torch.randn(
        k, k, generator=g, dtype=torch.float64) * 0.1
    h = 2 * x.t() @ x / x.shape[0]
    err, scales = {}, {}
    for dyn in (False, True):
        q, scales[dyn] = gptq_quantize(w, h, 4, gs, True, dynamic_groups=dyn)
        err[dyn] = (x @ (w - dequantize_weight(q, scales[dyn], gs, torch.float64)).t()
                    ).norm().item()
    assert torch.equal(scales[True][:, 0], scales[False][:, 0])  # the first group: as is
    assert not torch.equal(scales[True][:, 1:], scales[False][:, 1:])  # the later ones moved
    assert err[True] <= err[False], err
    # a Hessian that carries autograd history (built through a module) is detached
    h_grad = h.clone().requires_grad_(True) * 1.0
    qd, sd = gptq_quantize(w, h_grad, 4, gs, True, dynamic_groups=True)
    assert not sd.requires_grad and torch.equal(sd, scales[True])
    with pytest.raises(ValueError, match="natural column order"):
        gptq_quantize(w, h, 4, gs, True, act_order=True, dynamic_groups=True)
    with pytest.raises(QuantizeError, match="add --no-act-order"):
        from vllm_quarot.offline.options import check_options

        check_options(QuantizeOptions(scheme="w4a16", group_size=64, dynamic_groups=True,
                                      calib=str(TINYSTORIES)))


def _digest(d) -> str:
    h = hashlib.sha256()
    for f in sorted(f for f in d.rglob("*") if f.is_file()):  # incl. quarot/kv_shift
        h.update(str(f.relative_to(d)).encode() + f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(shared_data, tmp_path):
    opts = QuantizeOptions(scheme="w4a4", weight_method="gptq", calib=str(TINYSTORIES),
                           nsamples=4, seqlen=64, seed=3)
    quantize(STORIES_HF, tmp_path / "a", opts)
    quantize(STORIES_HF, tmp_path / "b", opts)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    quantize(STORIES_HF, tmp_path / "c", QuantizeOptions(**{**opts.__dict__, "seed": 4}))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    # --overwrite over a finished checkpoint: the same bytes again, nothing left beside it
    quantize(STORIES_HF, tmp_path / "a", QuantizeOptions(**{**opts.__dict__, "overwrite": True}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


@pytest.mark.parametrize("scheme", ["w4a4kv4", "w4a4", "w4a8kv4", "w4a8", "w8a8",
                                    "w8a8-static", "w4a16", "kv4"])
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
    if not torch.cuda.is_available():
        with pytest.raises(QuantizeError, match="--device cuda: no CUDA device"):
            quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(
                scheme="w4a4", weight_method="rtn", device="cuda"))
    with pytest.raises(QuantizeError, match="--a8-layers keeps"):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(
            scheme="w4a8", calib="/no/such/file", a8_layers="auto"))
    with pytest.raises(QuantizeError, match="--a8-layers takes auto"):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(
            scheme="w4a4", weight_method="rtn", calib_self=1, a8_layers="down_proj"))
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
        ({"format_version": 99}, "format_version"),
        ({"activation": {"bits": 4, "layer_bits": {"model.layers.0.mlp.down_proj": 6}}},
         "layer_bits"),
        ({"quant_method": "gptq"}, "not a QuaRot checkpoint"),
        ({"weight": {"bits": 3}}, "weight bits"),
        ({"weight": {"bits": 4, "symmetric": False}}, "symmetric"),
        ({"activation": {"bits": 4, "clip_ratio": 1.5}}, "clip_ratio"),
        ({"activation": {"bits": 4, "dynamic": "static"}}, "not supported"),
        ({"weight": {"bits": 4, "colour": 1}}, "malformed"),
        ({"rotation": None}, "rotation"),
        ({"rotation": {"r4": {"size": 100, "hadamard": [12, 8]}}}, "does not multiply"),
        ({"lm_head": {"bits": 2}}, "lm_head bits"),
        ({"lm_head": {"bits": 8, "activation_bits": 4}}, "lm_head activation_bits"),
        ({"lm_head": {"bits": 8, "colour": 1}}, "malformed"),
    ]
    for patch, msg in cases:
        with pytest.raises(CheckpointFormatError, match=msg):
            QuaRotFormat.from_dict({**good, **patch})


def test_quantized_lm_head_is_written_validated_and_simulated(shared_data, tmp_path):
    """--lm-head w4a8: the lm_head's codes and scales (R1 and the final norm folded in,
    GPTQ on the final normalised calibration states) are in the checkpoint and in its
    format section; the validator wants them instead of lm_head.weight; the simulation
    dequantizes them and quantizes the lm_head's input per token to 8 bits."""
    from vllm_quarot.eval.simulate import load_simulated
    from vllm_quarot.format import LMHeadSpec
    from vllm_quarot.offline.checkpoint import TensorSource
    from vllm_quarot.quant import fake_quantize_per_token_blocks, unpack_weight
    from vllm_quarot.validate import validate_checkpoint

    src = make_random_model(tmp_path / "m")
    out = tmp_path / "q"
    quantize(src, out, QuantizeOptions(scheme="w4a4", calib=str(TINYSTORIES), nsamples=4,
                                       seqlen=64, lm_head="w4a8"))
    raw = json.loads((out / "config.json").read_text())
    fmt = QuaRotFormat.from_dict(raw["quantization_config"])
    assert fmt.lm_head == LMHeadSpec(bits=4, group_size=-1, activation_bits=8,
                                     method="gptq") and fmt.lm_head.name == "w4a8"
    assert raw["quantization_config"]["quantizer"].get("lm_head") == "w4a8"
    t = TensorSource(out)
    assert "lm_head.weight" not in t.keys()
    codes = unpack_weight(t.get("lm_head.weight_packed"), 4, raw["hidden_size"])
    assert codes.abs().max() <= 8
    w = codes.float() * t.get("lm_head.weight_scale")
    validate_checkpoint(out, fmt, AutoConfig.from_pretrained(out))
    sim = load_simulated(out)
    torch.testing.assert_close(sim.lm_head.weight, w)
    seen = {}
    sim.lm_head.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    with torch.no_grad():
        sim(torch.tensor([[5, 9, 100, 7]]))
    x = seen["x"]  # after the pre-hook: 8-bit per-token codes times scales
    torch.testing.assert_close(x, fake_quantize_per_token_blocks(x, 8, 1.0, 1))
    # the validator wants the codes: a checkpoint without them is refused
    names = {k: t.get(k) for k in t.keys() if not k.startswith("lm_head.weight_scale")}
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(names, out / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match="lm_head.weight_scale"):
        validate_checkpoint(out, fmt, AutoConfig.from_pretrained(out))


@pytest.mark.parametrize(("kw", "msg"), [
    ({"lm_head": "w2a2"}, "--lm-head must be one of"),
    ({"lm_head": "w8a8", "scheme": "kv4"}, "needs a weight-quantized scheme"),
])
def test_lm_head_option_errors(kw, msg):
    from vllm_quarot.offline.options import check_options

    with pytest.raises(QuantizeError, match=msg):
        check_options(QuantizeOptions(**{"weight_method": "rtn", **kw}))


# ------------------------------------------------- output directory: staged, atomic, modes

RTN = dict(scheme="w4a4", weight_method="rtn")


def _leftovers(parent: Path) -> list[str]:
    """Stage / old directories beside the output (.NAME.tmp-PID, .NAME.old-PID)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_non_empty_out_dir_is_refused_unless_overwrite(shared_data, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(QuantizeError, match=r"is not empty \(give --overwrite"):
        quantize(STORIES_HF, out, QuantizeOptions(**RTN))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not _leftovers(tmp_path)
    quantize(STORIES_HF, out, QuantizeOptions(**RTN, overwrite=True))
    assert not (out / "notes.txt").exists()  # the old directory is replaced, not merged
    QuaRotFormat.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert not _leftovers(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    quantize(STORIES_HF, empty, QuantizeOptions(**RTN))  # an empty OUT_DIR is fine
    assert (empty / "config.json").is_file()
    with pytest.raises(QuantizeError, match="is not a directory"):
        quantize(STORIES_HF, out / "config.json", QuantizeOptions(**RTN, overwrite=True))
    src = tmp_path / "src"
    src.mkdir()
    for f in STORIES_HF.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    for target in (src, tmp_path):  # --overwrite must never delete the input model
        with pytest.raises(QuantizeError, match=r"is \(or holds\) the input model"):
            quantize(src, target, QuantizeOptions(**RTN, overwrite=True))
    assert (src / "config.json").is_file()


def test_failed_run_leaves_nothing(shared_data, tmp_path, monkeypatch):
    """An error in the middle of writing (here: in the head) deletes the stage; only the
    finished layers stay, hidden in .q.partial for --resume (no checkpoint file)."""
    import vllm_quarot.offline.quantize as q

    def boom(self, h_cal):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(q.QuantizeRun, "head", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(**RTN))
    assert [p.name for p in tmp_path.iterdir()] == [".q.partial"]
    kept = sorted(p.name for p in (tmp_path / ".q.partial").iterdir())
    assert "config.json" not in kept and "model.safetensors" not in kept
    monkeypatch.undo()
    quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(**RTN))  # starts over
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_modes_follow_the_umask(shared_data, tmp_path, mask):
    old = os.umask(mask)
    try:
        quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(**RTN, r1="online"))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path / "q")): stat.S_IMODE(p.stat().st_mode)
             for p in (tmp_path / "q").rglob("*")}
    assert "model.safetensors" in modes and "config.json" in modes
    assert "quarot/transforms.safetensors" in modes  # --r1 online's
    want = {n: (0o777 if (tmp_path / "q" / n).is_dir() else 0o666) & ~mask for n in modes}
    assert modes == want, modes  # safetensors wrote 0600
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o777 & ~mask


def test_missing_tensor_is_a_clear_error(shared_data, tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    for f in STORIES_HF.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    sd = load_file(next(STORIES_HF.glob("*.safetensors")))
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, src / "model.safetensors")
    with pytest.raises(QuantizeError, match="lacks 1 tensor.*: model.layers.2.mlp.up_proj.weight$"):
        quantize(src, tmp_path / "q", QuantizeOptions(**RTN))
    assert not (tmp_path / "q").exists() and not _leftovers(tmp_path)


# A `vllm-quarot quantize` that stops for a minute after writing config.json into its
# stage, i.e. just before the rename that publishes it: the latest point to kill it.
_STALL_AFTER_METADATA = """
import sys, time
import vllm_quarot.offline.quantize as q
write = q._write_metadata
def stalled(*args, **kwargs):
    write(*args, **kwargs)
    print("metadata written", flush=True)
    time.sleep(120)
q._write_metadata = stalled
from vllm_quarot.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn(args: list[str], log: Path, code: str | None = None) -> subprocess.Popen:
    """`vllm-quarot quantize ARGS` in a subprocess; stderr (logs, progress) to log."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "vllm_quarot.cli"]
    return subprocess.Popen([*cmd, "quantize", *args], stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} early"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_killed_run_leaves_no_checkpoint(shared_data, tmp_path):
    """SIGKILL with every file (config.json too) written to the stage but not yet
    renamed: OUT_DIR does not exist; the next run deletes the dead run's stage."""
    work = tmp_path / "w"
    work.mkdir()
    out = work / "q"
    proc = _spawn([str(STORIES_HF), str(out), "--scheme", "w4a4", "--weight-method", "rtn"],
                  tmp_path / "log", _STALL_AFTER_METADATA)
    assert proc.stdout.readline().strip() == "metadata written", (tmp_path / "log").read_text()
    stage = work / f".q.tmp-{proc.pid}"
    assert (stage / "config.json").is_file() and (stage / "model.safetensors").is_file()
    proc.kill()
    assert proc.wait(60) == -signal.SIGKILL
    assert not out.exists()
    quantize(STORIES_HF, out, QuantizeOptions(**RTN))
    assert (out / "config.json").is_file() and not _leftovers(work)


def test_sigterm_mid_gptq_cleans_up(shared_data, tmp_path):
    """SIGTERM while GPTQ runs: exit 143, one line on stderr, no OUT_DIR, no stage."""
    work = tmp_path / "w"
    work.mkdir()
    log = tmp_path / "log"
    proc = _spawn([str(STORIES_HF), str(work / "q"), "--scheme", "w4a4", "--calib",
                   str(TINYSTORIES), "--nsamples", "128", "--seqlen", "512"], log)
    _wait_for(lambda: any(work.iterdir()), proc)  # the stage exists: layers are running
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM, log.read_text()
    err = log.read_text()
    assert err.strip().splitlines()[-1] == "vllm-quarot quantize: interrupted (SIGTERM)"
    assert "Traceback" not in err
    # no OUT_DIR, no stage; at most the finished parts, hidden, for --resume
    assert [p.name for p in work.iterdir()] in ([], [".q.partial"])
    if (work / ".q.partial").exists():
        assert "--resume to continue" in err


def test_interrupt_right_after_the_record_is_made_cleans_up(shared_data, tmp_path,
                                                            monkeypatch):
    """The window the SIGTERM test hits by chance, hit every time: an interrupt just
    after .OUT.partial is created (before the first part) leaves nothing behind; one
    before it is created leaves nothing either."""
    from vllm_quarot.offline import checkpoint

    opened = checkpoint.RunProgress.open

    def open_then_interrupt(self):
        opened(self)
        assert self.dir.is_dir()
        raise KeyboardInterrupt("SIGTERM")

    def interrupt_before_open(self):
        raise KeyboardInterrupt("SIGTERM")

    for stub in (open_then_interrupt, interrupt_before_open):
        monkeypatch.setattr(checkpoint.RunProgress, "open", stub)
        with pytest.raises(KeyboardInterrupt):
            quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(**RTN))
        assert list(tmp_path.iterdir()) == [], stub.__name__


def _stories_runner(dtype=torch.float64):
    from transformers import AutoConfig

    from vllm_quarot.format import OnlineHadamard
    from vllm_quarot.models import family_of
    from vllm_quarot.offline.layer_runner import LayerKind, LayerRunner

    cfg = AutoConfig.from_pretrained(STORIES_HF)
    kind = LayerKind(cfg, family_of(cfg))
    shapes = kind.canonical_cls(kind.canonical_cfg, layer_idx=0).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.2
          for k, v in shapes.items()}
    for k in sd:
        if k.endswith("layernorm.weight"):
            sd[k] = torch.ones_like(sd[k])
    runner = LayerRunner(kind, 0, sd, OnlineHadamard.of_size(cfg.intermediate_size),
                         dtype=dtype)
    h = torch.randn(5, 24, cfg.hidden_size, generator=g).to(dtype)
    return runner, h


def test_gptq_is_sequential_inside_a_layer():
    """Each sub-block's Hessian is taken behind the sub-blocks quantized before it:
    q/k/v from the layer input, o_proj behind the "quantized" q/k/v, gate/up behind
    quantized attention, down_proj (after the online R4) behind quantized gate/up; the
    layer output is the forward of the fully quantized layer. ("Quantizing" here
    halves a weight, which any bug in the order would show.)"""
    from vllm_quarot.offline.layer_runner import SEQUENTIAL_GROUPS

    runner, h = _stories_runner()
    layer = runner.module
    calls = []

    def expected_hessian(name):
        acc = HessianAccumulator(layer.get_submodule(name).in_features)
        hook = layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args: acc.add(args[0]))
        runner(h, batch=2)
        hook.remove()
        return acc.h

    def quantize_group(group, hessian):
        torch.testing.assert_close(hessian.h, expected_hessian(group[0]))
        calls.append(group)
        return {name: layer.get_submodule(name).weight * 0.5 for name in group}

    out, errors = runner.sequential(h, quantize_group, batch=2)
    assert calls == list(SEQUENTIAL_GROUPS) and errors == {}
    torch.testing.assert_close(out, runner(h, batch=2))


def test_sequential_pass_measures_activation_errors():
    """With activation bits, each group's relative output error from quantizing its
    input: larger at 4 bits than at 8, and zero-free."""
    from vllm_quarot.models import SUB_BLOCKS
    from vllm_quarot.transforms import LinearInputSpec

    runner, h = _stories_runner(torch.float32)
    keep = lambda group, _h: {}  # noqa: E731

    def at(bits: int) -> dict:
        return {b.linears[0]: LinearInputSpec(bits=bits, clip=1.0) for b in SUB_BLOCKS}

    _, e4 = runner.sequential(h, keep, at(4))
    _, e8 = runner.sequential(h, keep, at(8))
    assert set(e4) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    for k in e4:
        assert 0 < e8[k] < e4[k] < 0.5, (k, e4[k], e8[k])


@pytest.mark.parametrize("spec,expect", [
    ("1", 1), ("layers.3.mlp.down_proj", ["model.layers.3.mlp.down_proj"]),
    ("model.layers.0.self_attn.k_proj", ["model.layers.0.self_attn.q_proj",
                                         "model.layers.0.self_attn.k_proj",
                                         "model.layers.0.self_attn.v_proj"]),
])
def test_a8_layers_are_recorded_and_simulated(shared_data, tmp_path, spec, expect):
    """--a8-layers: the chosen sub-blocks' linears get layer_bits 8 in the checkpoint,
    q/k/v (gate/up) together, and the simulation quantizes their inputs at 8 bits."""
    from vllm_quarot.eval.simulate import load_simulated

    quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(
        scheme="w4a4", calib=str(TINYSTORIES), nsamples=2, seqlen=64, a8_layers=spec))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    fmt = QuaRotFormat.from_dict(cfg["quantization_config"])
    layer_bits = fmt.activation.layer_bits
    assert set(layer_bits.values()) == {8}
    if isinstance(expect, int):  # the N sub-blocks with the largest activation error
        merged = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
        groups = {n.rsplit(".", 1)[0] + "." + merged.get(n.rsplit(".", 1)[1], n.rsplit(".", 1)[1])
                  for n in layer_bits}
        assert len(groups) == expect, layer_bits
    else:
        assert sorted(layer_bits) == sorted(expect)
    assert cfg["quantization_config"]["quantizer"]["a8_layers"] == spec
    model = load_simulated(tmp_path / "q")
    name = sorted(layer_bits)[0]
    x = torch.randn(5, model.get_submodule(name).in_features)
    seen = []
    model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    model.get_submodule(name)(x)
    hook_in = seen[0]  # after the simulation's (R4 +) fake quantization
    from vllm_quarot.hadamard import block_hadamard_transform
    from vllm_quarot.quant import fake_quantize_per_token_blocks

    xr = block_hadamard_transform(x) if name.endswith("down_proj") else x
    torch.testing.assert_close(hook_in, fake_quantize_per_token_blocks(xr, 8, 1.0, 1))


def test_a8_layer_bits_reach_the_runtime_scheme():
    """A vLLM merged layer (qkv_proj, gate_up_proj) takes its parts' precision (the model
    map names the parts); parts that disagree are refused."""
    from vllm_quarot.runtime.schemes import scheme_for

    qc = {"quant_method": "quarot", "format_version": 3, "scheme": "w4a4",
          "weight": {"bits": 4}, "activation": {"bits": 4, "clip_ratio": 0.9, "layer_bits": {
              f"model.layers.1.self_attn.{p}": 8 for p in ("q_proj", "k_proj", "v_proj")}},
          "kv_cache": None, "rotation": {"r1": {"seed": 0, "size": 64}}}
    fmt = QuaRotFormat.from_dict(qc)
    s = scheme_for(fmt, "model.layers.1.self_attn.qkv_proj")
    assert (s.a_bits, s.clip_ratio) == (8, 1.0)
    s = scheme_for(fmt, "model.layers.2.self_attn.qkv_proj")
    assert (s.a_bits, s.clip_ratio) == (4, 0.9)
    s = scheme_for(fmt, "model.layers.1.mlp.down_proj")
    assert s.a_bits == 4
    qc["activation"]["layer_bits"].pop("model.layers.1.self_attn.v_proj")
    with pytest.raises(CheckpointFormatError, match="share one input"):
        scheme_for(QuaRotFormat.from_dict(qc), "model.layers.1.self_attn.qkv_proj")


def test_float32_calibration_matches_float64(shared_data, tmp_path):
    """The float32 calibration forward (default) against the float64 one: the same
    codes for nearly every weight, the same layer output errors within 2 %."""
    from safetensors.torch import load_file

    opts = dict(scheme="w4a4", calib=str(TINYSTORIES), nsamples=4, seqlen=64)
    s32 = quantize(STORIES_HF, tmp_path / "a", QuantizeOptions(**opts))
    s64 = quantize(STORIES_HF, tmp_path / "b", QuantizeOptions(**opts, precision="float64"))
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    packed = [k for k in a if k.endswith("weight_packed")]
    same = sum((a[k] == b[k]).sum().item() for k in packed) / sum(a[k].numel() for k in packed)
    assert same > 0.95, same
    for k, e in s64.layer_errors.items():
        assert abs(s32.layer_errors[k] - e) <= 0.02 * e + 1e-6, (k, s32.layer_errors[k], e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme,extra", [
    ("w4a4kv4", dict(verify=True, a8_layers="auto", lm_head="w4a8")),
    ("w4a8", dict(weight_method="rtn")),
    ("w4a4kv4", dict(rotate="spinquant", spinquant_steps=2)),
])
def test_cuda_quantizer_matches_cpu(shared_data, tmp_path, scheme, extra):
    """--device cuda runs the same maths as the CPU: nearly every code identical, layer
    output errors within 2 %, the checkpoint's tensors on the host (GPU-only)."""
    from safetensors.torch import load_file

    opts = dict(scheme=scheme, calib=str(TINYSTORIES), nsamples=4, seqlen=64, **extra)
    cpu = quantize(STORIES_HF, tmp_path / "cpu", QuantizeOptions(**opts, device="cpu"))
    gpu = quantize(STORIES_HF, tmp_path / "gpu", QuantizeOptions(**opts, device="cuda"))
    a = load_file(tmp_path / "cpu" / "model.safetensors")
    b = load_file(tmp_path / "gpu" / "model.safetensors")
    assert a.keys() == b.keys()
    packed = [k for k in a if k.endswith("weight_packed")]
    same = sum((a[k] == b[k]).sum().item() for k in packed) / sum(a[k].numel() for k in packed)
    assert same > 0.95, same
    for k, e in cpu.layer_errors.items():
        assert abs(gpu.layer_errors[k] - e) <= 0.02 * e + 1e-6, (k, gpu.layer_errors[k], e)
    if cpu.verify_max_rel_err is not None:
        assert gpu.verify_max_rel_err < 1e-6


def test_resume_is_byte_identical(shared_data, tmp_path, monkeypatch):
    """A run interrupted after three layers, continued with --resume, writes the very
    bytes of an uninterrupted run (GPTQ, --a8-layers auto, --verify: every piece of
    state carried from layer to layer); a resume with other options is refused."""
    from vllm_quarot.offline import quantize as qmod

    opts = dict(scheme="w4a4kv4", calib=str(TINYSTORIES), nsamples=4, seqlen=64,
                verify=True, a8_layers="auto")
    full = quantize(STORIES_HF, tmp_path / "full", QuantizeOptions(**opts))
    layer = qmod.QuantizeRun.layer

    def interrupted(self, i, h):
        if i == 3:
            raise KeyboardInterrupt("SIGTERM")
        return layer(self, i, h)

    monkeypatch.setattr(qmod.QuantizeRun, "layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize(STORIES_HF, tmp_path / "cut", QuantizeOptions(**opts))
    monkeypatch.undo()
    assert not (tmp_path / "cut").exists()
    partial = tmp_path / ".cut.partial"
    assert (partial / "layer-00002.safetensors").is_file()
    assert not (partial / "layer-00003.safetensors").exists()
    with pytest.raises(QuantizeError, match="--resume: .* other inputs .*seed"):
        quantize(STORIES_HF, tmp_path / "cut", QuantizeOptions(**opts, seed=1, resume=True))
    resumed = quantize(STORIES_HF, tmp_path / "cut", QuantizeOptions(**opts, resume=True))
    assert _digest(tmp_path / "cut") == _digest(tmp_path / "full")
    assert resumed.layer_errors == full.layer_errors
    assert resumed.verify_max_rel_err == full.verify_max_rel_err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "full"]


def test_sharded_output(shared_data, tmp_path):
    """--max-shard-size: model-0000k-of-0000n.safetensors + index, read back (by the
    simulation and the loader's validation) as the single-file checkpoint."""
    from vllm_quarot.eval.simulate import load_simulated

    quantize(STORIES_HF, tmp_path / "one", QuantizeOptions(**RTN))
    quantize(STORIES_HF, tmp_path / "many", QuantizeOptions(**RTN, max_shard_size="100KB"))
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all((tmp_path / "many" / s).stat().st_size <= 100_000 + 70_000 for s in shards)
    ids = torch.tensor([[1, 50, 200, 7, 9]])
    with torch.no_grad():
        a = load_simulated(tmp_path / "one")(ids).logits
        b = load_simulated(tmp_path / "many")(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(QuantizeError, match="--max-shard-size"):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(**RTN, max_shard_size="big"))


def test_calibration_activations_spill_to_disk(monkeypatch, tmp_path):
    """Above the memory budget, activation buffers are maps of unlinked files."""
    from vllm_quarot.offline.checkpoint import activation_buffer

    monkeypatch.setenv("VLLM_QUAROT_ACT_RAM_GB", "0.000001")
    t = activation_buffer((3, 100, 64), torch.float32, tmp_path / "spill")
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(3, 100, 64))
    assert t[2, 99, 63].item() == t.numel() - 1
    assert list((tmp_path / "spill").iterdir()) == []  # unlinked: freed with the tensor
    monkeypatch.setenv("VLLM_QUAROT_ACT_RAM_GB", "1")
    assert activation_buffer((3, 100, 64), torch.float32, tmp_path / "spill").is_contiguous()


def test_spinquant_rotations_are_fused_exactly(shared_data, tmp_path):
    """--rotate spinquant: R1/R2 learned on the calibration windows (a few Cayley SGD
    steps) are fused like QuaRot's: --verify (the rotated fp64 model gives the original
    logits) passes, and the checkpoint records the learned kind and the losses."""
    s = quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(
        scheme="w4a4kv4", rotate="spinquant", spinquant_steps=3, calib=str(TINYSTORIES),
        nsamples=4, seqlen=64, verify=True))
    assert s.verify_max_rel_err < 1e-10
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["rotation"]["r1"]["kind"] == "cayley-learned"
    assert qc["rotation"]["r3"] is not None and qc["rotation"]["r4"] is not None
    sq = qc["quantizer"]["spinquant"]
    assert sq["steps"] == 3 and 0 < sq["loss_last"] < 20 and 0 < sq["loss_first"] < 20
    assert sq["weights_in_loop"] == "float"  # before GPTQ, as SpinQuant


@pytest.mark.parametrize("method,choice,w_bits", [
    ("gptq", "auto", 16), ("rtn", "auto", 4), ("gptq", "rtn", 4), ("rtn", "float", 16)])
def test_spinquant_weights_in_the_loop(shared_data, tmp_path, monkeypatch, method, choice,
                                       w_bits):
    """--spinquant-weights: auto learns against 16-bit weights before GPTQ (SpinQuant's
    recipe) and RTN weights before RTN; the learner gets those bits."""
    from vllm_quarot.offline import spinquant

    seen = []
    learn = spinquant.learn_rotations

    def spy(*args, **kwargs):
        seen.append(kwargs["w_bits"])
        return learn(*args, **{**kwargs, "steps": 1})

    monkeypatch.setattr(spinquant, "learn_rotations", spy)
    quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(
        scheme="w4a4kv4", rotate="spinquant", weight_method=method, spinquant_weights=choice,
        calib=str(TINYSTORIES), nsamples=2, seqlen=64, kv_calibrate=False))
    assert seen == [w_bits]
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quantizer"]["spinquant"]["weights_in_loop"] == ("float" if w_bits == 16
                                                                else "rtn")


def test_online_r1_stores_its_hadamards_and_keeps_the_gains(shared_data, tmp_path):
    """--r1 online: no R1 on the residual stream; the RMSNorm gains stay in the norms
    (times the random signs that make each Hadamard a randomized one, an exact
    invariance: --verify, GQA included); q/k/v, gate/up and o_proj hold W·H for this
    version's Hadamards H, stored (sha256-bound) beside R2 and R4. The simulation applies
    them and gives the original model's logits as closely as the fused R1 does (W8A8,
    nearly lossless); without them it is far off."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from vllm_quarot.eval.simulate import load_simulated
    from vllm_quarot.format import TRANSFORMS_FILE
    from vllm_quarot.hadamard import hadamard_matrix
    from vllm_quarot.stored_transforms import is_plain_hadamard

    ids = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits
    errs = {}
    for r1 in ("fused", "online"):
        out = tmp_path / r1
        s = quantize(STORIES_HF, out, QuantizeOptions(scheme="w8a8", weight_method="rtn",
                                                      r1=r1, verify=True))
        assert s.verify_max_rel_err < 1e-10  # stories260K: 8 heads over 4 KV heads
        with torch.no_grad():
            got = load_simulated(out)(ids).logits
        errs[r1] = ((got - want).norm() / want.norm()).item()
    fmt = QuaRotFormat.from_dict(json.loads((tmp_path / "online" / "config.json").read_text())[
        "quantization_config"])
    r = fmt.rotation
    assert r.r1.kind == "none" and r.r2_size and r.r4 is not None
    assert fmt.quantizer["r1"] == "online"
    assert {t.name: t.linears for t in r.input_transforms} == {
        "r1_hidden": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "mlp.gate_proj", "mlp.up_proj"), "r1_o_in": ("self_attn.o_proj",)}
    mats = load_file(tmp_path / "online" / TRANSFORMS_FILE)
    for t in r.input_transforms:  # this version's Hadamard, which the runtime fuses
        assert torch.equal(mats[t.name], hadamard_matrix(t.size, torch.float32, False))
        assert is_plain_hadamard(t.sha256, t.size)
    assert not is_plain_hadamard(r.input_transforms[0].sha256, 32)
    src = AutoModelForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32)
    with safe_open(tmp_path / "online" / "model.safetensors", "pt") as f:
        gain = f.get_tensor("model.layers.0.input_layernorm.weight").float()
    want_gain = src.model.layers[0].input_layernorm.weight
    assert torch.allclose(gain.abs(), want_gain.abs(), atol=1e-2)  # the gain, signed
    assert (gain.sign() != want_gain.sign()).any()
    assert errs["online"] < 2 * errs["fused"] and errs["online"] < 0.03, errs
    # the same weights without the stored transforms: far from the model
    broken = load_simulated(tmp_path / "online")
    for mod in broken.modules():
        mod._forward_pre_hooks.clear()
    with torch.no_grad():
        bad = broken(ids).logits
    assert ((bad - want).norm() / want.norm()).item() > 10 * errs["online"]


def test_rotate_none_keeps_the_norm_gains(shared_data, tmp_path):
    """Without R1 nothing has to commute with the norms: --rotate none leaves each
    RMSNorm's gain in the norm (the final one's too) and the weights as the model has
    them (folding the gains in made plain GPTQ worse: W4A16 g64 on the Qwen2-class
    surrogate 60.40 against 49.13), --verify passes, and its simulation is the model's
    function."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from vllm_quarot.eval.simulate import load_simulated

    out = tmp_path / "plain"
    quantize(STORIES_HF, out, QuantizeOptions(scheme="w8a8", weight_method="rtn",
                                              rotate="none", lm_head="none",
                                              verify=True))
    src = AutoModelForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()
    with safe_open(out / "model.safetensors", "pt") as f:
        for i in (0, 4):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                got = f.get_tensor(f"model.layers.{i}.{norm}.weight").float()
                want = src.model.layers[i].get_submodule(norm).weight
                torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-2, atol=1e-3)
        # the final norm's too: its gain is not folded into the (16-bit) lm_head
        got = f.get_tensor("model.norm.weight").float()
        torch.testing.assert_close(got, src.model.norm.weight.to(got.dtype), rtol=1e-2,
                                   atol=1e-3)
        got = f.get_tensor("lm_head.weight").float()
        torch.testing.assert_close(got, src.lm_head.weight.to(got.dtype), rtol=1e-2,
                                   atol=1e-3)
        codes = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
    assert codes.dtype == torch.int32  # the weights themselves are quantized
    ids = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = src(ids).logits, load_simulated(out)(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 0.05


@pytest.mark.parametrize(("kw", "match"), [
    (dict(rotate="spinquant"), "--rotate spinquant has no such R1"),
    (dict(smooth="runtime"), "does not combine with --smooth runtime"),
    (dict(scheme="w8a8-static", calib=str(TINYSTORIES)), "static activation scales"),
    (dict(a8_layers="auto", calib=str(TINYSTORIES)), "does not combine with --a8-layers"),
])
def test_online_r1_refusals(shared_data, tmp_path, kw, match):
    o = {"scheme": "w4a4", "weight_method": "rtn", "r1": "online", **kw}
    with pytest.raises(QuantizeError, match=match):
        quantize(STORIES_HF, tmp_path / "x", QuantizeOptions(**o))
    assert not (tmp_path / "x").exists()


def test_online_r1_runs_as_r4_in_the_runtime(random_llama, tmp_path):
    """The runtime recognises --r1 online's stored matrices as its own Hadamards and
    runs them as R4 (``HadamardTransform``: the op, or fused into the 4-bit kernels'
    quantizer) over a whole input; anything else stays a stored matrix."""
    from types import SimpleNamespace

    from vllm_quarot.runtime.config import QuaRotConfig
    from vllm_quarot.runtime.transform import HadamardTransform, MatrixTransform

    out = tmp_path / "q"
    quantize(random_llama, out, QuantizeOptions(scheme="w4a4", weight_method="rtn", r1="online"))
    hf = AutoConfig.from_pretrained(out)
    cfg = QuaRotConfig.from_config(hf.quantization_config)
    cfg.maybe_update_config(str(out), hf)
    assert cfg.plain_hadamards == {"r1_hidden", "r1_o_in"}
    for prefix in ("model.layers.0.self_attn.qkv_proj", "model.layers.3.mlp.gate_up_proj",
                   "model.layers.1.self_attn.o_proj"):
        n = hf.hidden_size  # = heads · head_dim here
        t = cfg._stored_transform(SimpleNamespace(input_size=n), prefix)
        assert isinstance(t, HadamardTransform) and t.fusable_size == n, prefix
    blocked = cfg._stored_transform(SimpleNamespace(input_size=2 * hf.hidden_size),
                                    "model.layers.0.mlp.gate_up_proj")
    assert isinstance(blocked, MatrixTransform)

    # The simulation runs them as the runtime's reference op does, in the same order of
    # float operations: the first token's attention output is one row of 4-bit values,
    # whose Hadamard sits on exact rounding ties of the next 4-bit quantizer (a dense
    # product broke them the other way: 1-4 nats on every prompt of the random model at
    # a forced 4-bit cache). The native op sums in another order (within an ulp).
    import dataclasses

    from vllm_quarot.runtime.ops import reference  # noqa: F401  (torch.ops.quarot)
    from vllm_quarot.stored_transforms import apply_matrix, read_transforms
    from vllm_quarot.transforms import linear_input_specs, transform_input

    name = "model.layers.1.self_attn.o_proj"
    spec = linear_input_specs(cfg.fmt, [name], matrices=read_transforms(out, cfg.fmt))[name]
    assert spec.plain_hadamard and spec.bits == 4
    t = cfg._stored_transform(SimpleNamespace(input_size=n), name)
    layer = torch.nn.Module()
    t.process_weights_after_loading(layer, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 16, (64, n), generator=g).float() - 7) * 0.0123
    ran = torch.ops.quarot.hadamard(x, layer.quarot_had_k)
    assert torch.equal(transform_input(x, dataclasses.replace(spec, bits=None)), ran)
    assert not torch.equal(apply_matrix(x, spec.matrix), ran)  # what it ran before
    assert torch.equal(transform_input(x, spec), transform_input(ran, dataclasses.replace(
        spec, matrix=None)))
