"""Shared fixtures: the shared data folder, small QuaRot checkpoints built once per
session, the session's vLLM engines (tests/engines.py) and the must-refuse cases walked
in one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels (the GPU path) run on CPU tensors under Triton's interpreter;
    # it is chosen when kernels are defined, so before anything imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_quarot.eval.zoo import DATA_DIR, STORIES_HF, make_random_model  # noqa: E402
from vllm_quarot.offline.quantize import QuantizeOptions, quantize  # noqa: E402

TINYSTORIES = DATA_DIR / "tinystories" / "validation_head.txt"
# The random test models' ~400-nat logits turn one flipped 4-bit code (vLLM's kernels and
# transformers' differ in the last bits) into tenths of a nat, or whole nats from a
# cached token on; whether a model sits that close to a rounding boundary is luck of its
# weights and settings. With --kv-clip 1.0 (the default since 0.11) the random RRS model
# does: its float32 and float64 simulations differ by up to 3 nats (the BOS token's
# layer-1 KV codes move with an earlier 4-bit activation on a boundary), and vLLM
# differs from the float32 one by 0.2-0.9 nats there and on the W4A8KV4 Phi-3 model
# (tokens equal). At 0.95 neither model had such a token on AVX-512 CPUs, so the vLLM =
# simulation checks on them pin 0.95; on an AVX2 CPU the Phi-3 one still flips one code
# (0.43 nats at -415), which test_vllm_e2e.FLIP_RTOL admits (each position within 2e-3
# of its size, the median over positions within LOGPROB_TOL).
RANDOM_MODEL_KV_CLIP = 0.95
WIKITEXT = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="the inner loop: every test that needs no vLLM engine, plus the "
                          "end-to-end tests marked quick")


def pytest_report_header(config):
    """The CPU's ISA in the header: kernels are chosen per ISA, so a failure on another
    machine is read next to what that machine has."""
    import platform

    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
           if f in flags]
    return f"cpu: {model} ({os.cpu_count()} cores) isa: {' '.join(isa) or 'unknown'}"


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    skip = pytest.mark.skip(reason="--quick: needs a vLLM engine (the full suite runs it)")
    for item in items:
        if "vllm" in item.keywords and "quick" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not STORIES_HF.is_dir():
        pytest.skip(f"shared data folder not found at {DATA_DIR} (set QUAROT_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory, shared_data) -> Path:
    return make_random_model(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="session")
def quarot_w4a4(tmp_path_factory, random_llama) -> Path:
    """W4A4 (16-bit KV) GPTQ checkpoint of the random Llama, calibrated on TinyStories,
    with the default 8-bit lm_head."""
    out = tmp_path_factory.mktemp("ckpt") / "llama-w4a4"
    quantize(random_llama, out, QuantizeOptions(
        scheme="w4a4", weight_method="gptq", calib=str(TINYSTORIES), nsamples=8,
        seqlen=128, verify=True))
    return out


@pytest.fixture(scope="session")
def rtn_w4a4(tmp_path_factory, random_llama) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "w4a4-rtn"
    quantize(random_llama, out, QuantizeOptions(scheme="w4a4", weight_method="rtn"))
    return out


@pytest.fixture(scope="session")
def quarot_w4a4kv4(tmp_path_factory, random_llama) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "llama-w4a4kv4"
    quantize(random_llama, out, QuantizeOptions(
        scheme="w4a4kv4", weight_method="gptq", calib=str(TINYSTORIES), nsamples=8,
        seqlen=128, kv_clip=RANDOM_MODEL_KV_CLIP))
    return out


def view(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint src whose files are symlinks, config.json passed through
    ``edit`` (a function changing the parsed dict in place)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def engine():
    """The session's vLLM engines: ``engine(model, *options, **env)``."""
    from engines import EnginePool

    pool = EnginePool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def refusals(tmp_path_factory, random_llama, rtn_w4a4, quarot_w4a4kv4) -> dict[str, str]:
    """Every case that must refuse to start, walked by one process (one vLLM import):
    {case: what LLM(...) raised and what the engine printed}. The tests that own the
    cases (test_vllm_e2e, test_validate, test_parallel) assert on their entries."""
    from engines import walk_refusals
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("refusals")
    L0 = "model.layers.0."
    # a tensor missing; stale shards beside the checkpoint; quant_method removed
    missing = view(rtn_w4a4, root / "missing", lambda c: None)
    (missing / "model.safetensors").unlink()
    tensors = load_file(rtn_w4a4 / "model.safetensors")
    tensors.pop(f"{L0}mlp.down_proj.weight_scale")
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    stale = view(rtn_w4a4, root / "stale", lambda c: None)
    shard_a = {k: v for k, v in load_file(rtn_w4a4 / "model.safetensors").items()}
    names = sorted(shard_a)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half],
             "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in parts.items():
        save_file({k: shard_a[k] for k in keys}, stale / fname, metadata={"format": "pt"})
    (stale / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    no_method = view(rtn_w4a4, root / "no-method",
                     lambda c: c["quantization_config"].pop("quant_method"))
    # a --tp 1 checkpoint (R4 over the whole intermediate size) of a model TP=2 splits
    tp_model = make_random_model(root / "tp-llama", hidden=256, intermediate=512, heads=4,
                                 kv_heads=2)
    tp1 = root / "tp1-w4a4"
    quantize(tp_model, tp1, QuantizeOptions(scheme="w4a4", weight_method="rtn"))
    # an imported QuIP checkpoint: transforms over o_proj's / down_proj's whole input
    from ct_checkpoints import make_ct_quip

    from vllm_quarot.interop.ct_import import import_checkpoint

    quip = root / "quip-full"
    import_checkpoint(make_ct_quip(tp_model, root / "ct-quip-full"), quip)
    base = dict(dtype="float32", enforce_eager=True, max_model_len=256)
    cases = [
        ("plain-with-quarot-flag", random_llama, {"quantization": "quarot"}),
        ("kv4-with-fp8-cache", quarot_w4a4kv4, {"kv_cache_dtype": "fp8"}),
        ("int8-cache-on-cpu", random_llama, {"kv_cache_dtype": "int8_per_token_head"}),
        ("missing-tensor", missing, {}),
        ("stale-shards", stale, {}),
        ("no-quant-method", no_method, {}),
        ("full-r4-at-tp2", tp1, {"tensor_parallel_size": 2,
                                 "distributed_executor_backend": "mp"}),
        ("imported-full-transform-at-tp2", quip, {"tensor_parallel_size": 2,
                                                  "distributed_executor_backend": "mp"}),
    ]
    out = walk_refusals([{"id": i, "model": str(m), "args": base | a} for i, m, a in cases])
    out["_paths"] = json.dumps({"missing": str(missing)})
    return out
