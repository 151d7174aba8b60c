"""Small random Hugging Face checkpoints for tests (no downloads).

Sizes are chosen to exercise non-power-of-two Hadamard orders (hidden 192 = 12·16,
intermediate 320 = 20·16, 76·4) with head_dim 64, which vLLM's CPU attention serves.
The tokenizer is stories260K's (512 tokens), read from the shared data folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

DATA_DIR = Path(os.environ.get("QUAROT_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
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
) -> Path:
    """Save a random model on which greedy decoding is stable under float noise.

    A 4-bit activation code that flips because of last-bit float differences
    (vLLM's kernels vs transformers') moves logits by a few percent of their scale,
    so the model must decide with margins larger than that: the embedding dominates
    the residual stream and an untied random lm_head maps each token to a random
    successor (varied, non-repeating continuations); attention and MLP still shape
    the hidden state. With tie=True the head is the embedding (the SmolLM2 case).
    """
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
        vocab_size=512,
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
