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
    # --overwrite over a finished checkpoint: the same bytes again, nothing left beside it
    quantize(STORIES_HF, tmp_path / "a", QuantizeOptions(**{**opts.__dict__, "overwrite": True}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


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
    with pytest.raises(TypeError, match="device"):  # --device (CPU only) is gone
        QuantizeOptions(scheme="w4a4", weight_method="rtn", device="cuda")
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
        ({"format_version": 3}, "format_version"),
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
    """An error in the middle of writing (here: in the head) deletes the stage."""
    import vllm_quarot.offline.quantize as q

    def boom(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(q._Streamer, "head", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(**RTN))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_modes_follow_the_umask(shared_data, tmp_path, mask):
    old = os.umask(mask)
    try:
        quantize(STORIES_HF, tmp_path / "q", QuantizeOptions(**RTN))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "q").iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~mask), modes  # safetensors wrote 0600
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
    assert list(work.iterdir()) == []
