"""Damaged QuaRot checkpoints are refused at load with one line naming what is wrong
(vllm_quarot/validate.py, the scheme checks of vllm_quarot/format.py)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINYSTORIES
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from vllm_quarot.eval.zoo import make_random_model
from vllm_quarot.format import CheckpointFormatError, OnlineHadamard, QuaRotFormat
from vllm_quarot.offline.quantize import QuantizeOptions, quantize
from vllm_quarot.validate import check_quant_method, validate_checkpoint

L0 = "model.layers.0."


def damaged(src: Path, dst: Path, edit: Callable[[dict], None] | None = None,
            cfg: Callable[[dict], None] | None = None) -> Path:
    """A copy of checkpoint src: unchanged files symlinked, the tensors passed through
    ``edit`` (a dict name -> tensor changed in place), config.json's
    quantization_config through ``cfg``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "config.json" or (edit and f.suffix == ".safetensors"):
            continue
        (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    if cfg:
        cfg(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    if edit:
        tensors = load_file(src / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def validate(model_dir: Path) -> None:
    """What maybe_update_config runs: the section, then the tensors."""
    hf = AutoConfig.from_pretrained(model_dir)
    fmt = QuaRotFormat.from_dict(hf.quantization_config)
    fmt.check_model(hf)
    validate_checkpoint(model_dir, fmt, hf)


def refused(model_dir: Path) -> str:
    with pytest.raises(CheckpointFormatError) as e:
        validate(model_dir)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------- valid checkpoints

def test_valid_checkpoint_passes_in_under_a_second(quarot_w4a4):
    t0 = time.perf_counter()
    validate(quarot_w4a4)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(("arch", "scheme", "group_size"), [
    ("qwen2", "w4a16", 64), ("qwen3", "w4a4kv4", -1), ("llama", "kv4", -1),
    ("mistral", "w8a8-static", 64)])
def test_other_schemes_and_architectures_pass(tmp_path, shared_data, arch, scheme,
                                              group_size):
    """Qwen2's q/k/v biases, Qwen3's q_norm/k_norm, 16-bit weights (kv4), static
    input scales, group-wise scales."""
    src = make_random_model(tmp_path / "m", arch, layers=1)
    out = tmp_path / "q"
    quantize(src, out, QuantizeOptions(scheme=scheme, weight_method="rtn",
                                       group_size=group_size, calib=str(TINYSTORIES),
                                       nsamples=2, seqlen=32))
    validate(out)
    if arch == "qwen2":
        bad = damaged(out, tmp_path / "bad", edit=lambda t: t.pop(f"{L0}self_attn.v_proj.bias"))
        assert f"tensor {L0}self_attn.v_proj.bias is missing (bias" in refused(bad)
    if arch == "qwen3":
        bad = damaged(out, tmp_path / "bad", edit=lambda t: t.pop(f"{L0}self_attn.k_norm.weight"))
        assert f"tensor {L0}self_attn.k_norm.weight is missing" in refused(bad)


# ------------------------------------------------------------------- tensor damage

@pytest.mark.parametrize("name", [f"{L0}mlp.down_proj.weight_scale",
                                  f"{L0}self_attn.q_proj.weight_packed", "lm_head.weight_packed"])
def test_missing_tensor(tmp_path, rtn_w4a4, name):
    bad = damaged(rtn_w4a4, tmp_path / "bad", edit=lambda t: t.pop(name))
    msg = refused(bad)
    assert f": tensor {name} is missing (" in msg
    assert "(and" not in msg  # exactly one problem


def test_packed_codes_stored_as_float32(tmp_path, rtn_w4a4):
    name = f"{L0}mlp.up_proj.weight_packed"

    def edit(t):
        t[name] = t[name].view(torch.float32)  # same bytes, wrong dtype
    msg = refused(damaged(rtn_w4a4, tmp_path / "bad", edit=edit))
    assert f"tensor {name} in model.safetensors is F32, expected I32 (4-bit codes" in msg


def test_wrong_shape_names_the_tensor(tmp_path, rtn_w4a4):
    name = f"{L0}self_attn.k_proj.weight_scale"

    def edit(t):
        t[name] = torch.cat([t[name], t[name][:1]])
    msg = refused(damaged(rtn_w4a4, tmp_path / "bad", edit=edit))
    assert f"tensor {name} in model.safetensors has shape [65, 1], expected [64, 1]" in msg


def test_tensor_of_another_scheme_and_unknown_tensors(tmp_path, rtn_w4a4):
    w = f"{L0}mlp.gate_proj.weight"

    def edit(t):
        t[w] = torch.zeros(320, 192, dtype=torch.bfloat16)
    msg = refused(damaged(rtn_w4a4, tmp_path / "a", edit=edit))
    assert f"unexpected tensor {w}: 16-bit weights of another scheme next to" in msg

    def edit2(t):
        t["model.layers.7.mlp.up_proj.weight_scale"] = torch.ones(320, 1)
        t["model.extra.weight"] = torch.ones(3, dtype=torch.bfloat16)
    msg = refused(damaged(rtn_w4a4, tmp_path / "b", edit=edit2))
    assert "unexpected tensor model.layers.7.mlp.up_proj.weight_scale: config.json has " \
           "num_hidden_layers 2 (and 1 more problems)" in msg

    def edit3(t):
        t[f"{L0}self_attn.q_proj.input_scale"] = torch.ones(1)
    msg = refused(damaged(rtn_w4a4, tmp_path / "c", edit=edit3))
    assert "static activation scales belong to static-per-tensor schemes" in msg


# ------------------------------------------------------------------- files and index

def _shard(src: Path, dst: Path) -> None:
    """dst gets src's tensors as two shards + index (as an older export would)."""
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, dst / fname)
        weight_map.update({k: fname for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_stale_shards_beside_a_new_single_file(tmp_path, rtn_w4a4):
    bad = damaged(rtn_w4a4, tmp_path / "bad")
    _shard(rtn_w4a4, bad)
    msg = refused(bad)
    assert "model.safetensors is not listed in model.safetensors.index.json (which names " \
           "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)" in msg


def test_sharded_checkpoint_passes_and_its_index_is_checked(tmp_path, rtn_w4a4):
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "config.json").symlink_to(rtn_w4a4 / "config.json")
    _shard(rtn_w4a4, ok)
    validate(ok)
    (ok / "model-00002-of-00002.safetensors").unlink()
    assert "model.safetensors.index.json lists model-00002-of-00002.safetensors, which " \
           "is not in" in refused(ok)


def test_two_files_without_index(tmp_path, rtn_w4a4):
    bad = damaged(rtn_w4a4, tmp_path / "bad")
    (bad / "old.safetensors").symlink_to(rtn_w4a4 / "model.safetensors")
    assert "holds 2 safetensors files (model.safetensors, old.safetensors) and no " \
           "model.safetensors.index.json: vLLM would load all of them" in refused(bad)


# -------------------------------------------------------------------- config damage

def _section(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())["quantization_config"]


def test_activation_section_removed(rtn_w4a4):
    cfg = _section(rtn_w4a4)
    cfg["activation"] = None
    with pytest.raises(CheckpointFormatError, match=r"^scheme 'w4a4' means weight 4-bit, "
                       r"activation 4-bit per-token, kv_cache none, but the sections say "
                       r"weight 4-bit, activation none, kv_cache none"):
        QuaRotFormat.from_dict(cfg)
    del cfg["scheme"]  # the quantizer's record still names it w4a4
    with pytest.raises(CheckpointFormatError, match=r"^scheme 'w4a4' means weight 4-bit, "
                       r"activation 4-bit per-token"):
        QuaRotFormat.from_dict(cfg)
    # without any record it reads as w4a16 of a quantizer that gave W4A16 no R4
    del cfg["quantizer"]["scheme"]
    with pytest.raises(CheckpointFormatError, match=r"^rotation.r4 is set, but the quantizer "
                       r"did not rotate for it"):
        QuaRotFormat.from_dict(cfg)


def test_weight_only_r4_record(rtn_w4a4):
    """W4A16 carries the online R4 when the quantizer recorded its scheme (quantizer
    .scheme); W4A16 checkpoints of earlier versions (no record) have none and still read."""
    cfg = _section(rtn_w4a4)
    cfg.update(scheme="w4a16", activation=None)
    cfg["quantizer"]["scheme"] = "w4a16"
    assert QuaRotFormat.from_dict(copy.deepcopy(cfg)).rotation.r4 is not None
    no_r4 = copy.deepcopy(cfg)
    no_r4["rotation"]["r4"] = None
    with pytest.raises(CheckpointFormatError, match=r"^rotation.r4 is null, but the quantizer "
                       r"applied it"):
        QuaRotFormat.from_dict(copy.deepcopy(no_r4))
    del no_r4["quantizer"]["scheme"]  # an older W4A16 checkpoint
    assert QuaRotFormat.from_dict(no_r4).rotation.r4 is None


def test_r4_removed(rtn_w4a4):
    cfg = _section(rtn_w4a4)
    cfg["rotation"]["r4"] = None
    # the quantizer records online_hadamard: a null r4 contradicts it
    with pytest.raises(CheckpointFormatError, match=r"^rotation.r4 is null"):
        QuaRotFormat.from_dict(copy.deepcopy(cfg))
    # checkpoints of vllm-quarot <= 0.2 do not record online_hadamard: tolerated, since a
    # --no-online-hadamard checkpoint looks the same
    del cfg["quantizer"]["online_hadamard"]
    QuaRotFormat.from_dict(copy.deepcopy(cfg))
    cfg["quantizer"]["online_hadamard"] = True
    with pytest.raises(CheckpointFormatError, match=r"^rotation.r4 is null, but the "
                       r"quantizer applied it .*down_proj's weights carry R4"):
        QuaRotFormat.from_dict(cfg)
    # a KV4 checkpoint's R3 proves the online Hadamards were on, recorded or not
    del cfg["quantizer"]["online_hadamard"]
    cfg.update(scheme="w4a4kv4", kv_cache={"bits": 4})
    cfg["rotation"]["r3"] = OnlineHadamard.of_size(64).to_dict()
    with pytest.raises(CheckpointFormatError, match=r"^rotation.r4 is null"):
        QuaRotFormat.from_dict(cfg)


@pytest.mark.parametrize(("patch", "msg"), [
    ({"scheme": "w5a5-foo"}, r"^unknown scheme 'w5a5-foo'; this vllm-quarot serves w4a4kv4, "),
    ({"kv_cache": {"bits": 4}}, r"^scheme 'w4a4' means .*kv_cache none, but the sections "
                                r"say .*kv_cache 4-bit"),
    ({"weight": {"bits": 8}}, r"^scheme 'w4a4' means weight 4-bit"),
])
def test_scheme_must_be_known_and_agree(rtn_w4a4, patch, msg):
    with pytest.raises(CheckpointFormatError, match=msg):
        QuaRotFormat.from_dict(_section(rtn_w4a4) | patch)


def test_no_scheme_is_named_after_the_sections(rtn_w4a4):
    cfg = _section(rtn_w4a4)
    del cfg["scheme"]
    cfg["quantizer"].pop("scheme", None)  # nor in the quantizer's record: hand-written
    assert QuaRotFormat.from_dict(cfg).scheme == "w4a4"
    cfg["weight"] = {"bits": 8}
    with pytest.raises(CheckpointFormatError, match=r"^quantization_config has no scheme, "
                       r"and its sections \(weight 8-bit, activation 4-bit per-token"):
        QuaRotFormat.from_dict(cfg)


@pytest.mark.parametrize(("weight", "msg"), [
    ({"bits": 8}, r"weight_packed in model.safetensors has shape \[192, 24\], expected "
                  r"\[192, 48\]"),
    ({"bits": 4, "group_size": 64}, r"weight_scale in model.safetensors has shape "
                                    r"\[192, 1\], expected \[192, 3\]"),
])
def test_bits_or_group_size_over_other_tensors(tmp_path, rtn_w4a4, weight, msg):
    """Sections edited consistently (scheme included): the tensors still tell."""
    def cfg(q):
        q["weight"] = weight
        if weight["bits"] == 8:
            q.update(scheme="w8a8", activation={"bits": 8, "clip_ratio": 1.0})
    with pytest.raises(CheckpointFormatError, match=f"tensor {L0}self_attn.q_proj.{msg}"):
        validate(damaged(rtn_w4a4, tmp_path / "bad", cfg=cfg))


def test_quant_method_missing_is_named():
    with pytest.raises(CheckpointFormatError, match=r"QuaRot section without quant_method; "
                       r"add \"quant_method\": \"quarot\""):
        check_quant_method({"format_version": 1, "weight": {"bits": 4}, "rotation": {},
                            "quantizer": {"name": "vllm-quarot"}})
    check_quant_method({"quant_method": "gptq", "bits": 4})  # others pass through
    check_quant_method({"quant_method": "", "bits": 4})


# --------------------------------------------------------------- through real vLLM
# LLM(...) raises the CheckpointFormatError itself (not "Engine core initialization
# failed"): the cases are walked by one process (conftest.refusals).


@pytest.mark.vllm
def test_llm_raises_the_missing_tensor(refusals):
    name = f"{L0}mlp.down_proj.weight_scale"
    missing = json.loads(refusals["_paths"])["missing"]
    assert (f"LLM_RAISED CheckpointFormatError {missing}: tensor {name} is missing"
            in refusals["missing-tensor"])


@pytest.mark.vllm
def test_llm_raises_the_stale_shards(refusals):
    assert "CheckpointFormatError model.safetensors is not listed in " \
           "model.safetensors.index.json" in refusals["stale-shards"]


@pytest.mark.vllm
def test_llm_raises_the_missing_quant_method(refusals):
    assert "QuaRot section without quant_method" in refusals["no-quant-method"]


# ------------------------------------------- R4 bound to the matrix it was made with


def _r4(qc: dict) -> dict:
    return qc["rotation"]["r4"]


@pytest.mark.parametrize(("field", "value"), [
    ("sha256", "0" * 64), ("construction", "paley2"), ("hadamard", [4, 80])])
def test_stored_r4_that_this_version_does_not_build_is_refused(rtn_w4a4, tmp_path, field,
                                                                value):
    """A checkpoint whose stored R4 (construction, factors, digest of H_K) differs from
    what this version rebuilds for its size: its down_proj weights were rotated with
    another matrix, so it is refused instead of served with the wrong online R4."""
    ckpt = damaged(rtn_w4a4, tmp_path / field, cfg=lambda qc: _r4(qc).update({field: value}))
    with pytest.raises(CheckpointFormatError,
                       match="(is not the one this vllm-quarot builds|does not multiply)"):
        validate(ckpt)


def test_changed_construction_in_this_version_refuses_old_checkpoints(rtn_w4a4,
                                                                      monkeypatch):
    """The other way round: a future change to a Hadamard construction (another GF(q)
    element order, a new K) changes the fingerprint this version computes; the
    checkpoint's stored one then no longer matches."""
    import vllm_quarot.format as fmt_mod

    real = fmt_mod.fingerprint

    def changed(n: int) -> dict:
        fp = dict(real(n))
        fp["sha256"] = "f" * 64
        return fp

    validate(rtn_w4a4)
    monkeypatch.setattr(fmt_mod, "fingerprint", changed)
    with pytest.raises(CheckpointFormatError, match="rotated with another matrix"):
        validate(rtn_w4a4)


def test_checkpoint_without_r4_fingerprint_still_loads(rtn_w4a4, tmp_path):
    """Checkpoints of vllm-quarot <= 0.2 stored only R4's size and factors."""
    def strip(qc: dict) -> None:
        for key in ("construction", "sha256", "blocks"):
            _r4(qc).pop(key)
        qc["format_version"] = 1
        qc.pop("tensor_parallel_blocks")

    validate(damaged(rtn_w4a4, tmp_path / "v1", cfg=strip))


def test_unpackable_input_sizes_are_simulation_only(tmp_path, shared_data):
    """stories260K's intermediate 172 holds no whole int32s of 4-bit codes: the engine
    refuses such a checkpoint with the reason (not as a damaged one), which still runs
    in the simulation; 8-bit codes (4 per int32) fit. At TP = 2 each rank's shard of a
    row-parallel input must hold whole int32s too."""
    from vllm_quarot.eval.simulate import load_simulated
    from vllm_quarot.eval.zoo import STORIES_HF
    from vllm_quarot.runtime.config import QuaRotConfig

    def engine_config(ckpt: Path) -> None:
        hf = AutoConfig.from_pretrained(ckpt)
        QuaRotConfig.from_config(hf.quantization_config).maybe_update_config(str(ckpt), hf)

    out = tmp_path / "w4a16"
    quantize(STORIES_HF, out, QuantizeOptions(scheme="w4a16", weight_method="rtn",
                                              online_hadamard=False))
    with pytest.raises(CheckpointFormatError) as e:
        engine_config(out)
    msg = str(e.value)
    assert "mlp.down_proj (172) is not a multiple of 8" in msg and "\n" not in msg
    assert "simulation only" in msg and "damaged" not in msg
    with torch.no_grad():
        load_simulated(out)(torch.tensor([[1, 2, 3]]))
    w8 = tmp_path / "w8a8"
    quantize(STORIES_HF, w8, QuantizeOptions(scheme="w8a8", weight_method="rtn",
                                             online_hadamard=False))
    engine_config(w8)
    fmt = QuaRotFormat.from_dict(AutoConfig.from_pretrained(out).quantization_config)
    big = AutoConfig.from_pretrained(STORIES_HF)
    big.intermediate_size = 176  # 176 / 2 = 88 = 11 int32s per block
    fmt.check_packing(big, 2)
    big.intermediate_size = 168  # 168 / 2 = 84: whole at TP = 1, not per rank at TP = 2
    fmt.check_packing(big)
    with pytest.raises(CheckpointFormatError, match="--tensor-parallel-size 2 cannot serve "
                                                    ".* mlp.down_proj \\(84\\)"):
        fmt.check_packing(big, 2)
