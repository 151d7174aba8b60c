"""The perplexity routine on cases with a known answer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from vllm_quarot.eval.perplexity import hf_perplexity, token_windows


class Uniform(torch.nn.Module):
    """A 'model' with uniform logits: perplexity must equal the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return SimpleNamespace(logits=torch.randn(1, 1, 1).expand(*ids.shape, self.vocab))


class Oracle(torch.nn.Module):
    """Puts probability p on the true next token: perplexity must be 1/p."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, ids):
        rest = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*ids.shape, self.vocab), rest, dtype=torch.float64)
        nxt = torch.roll(ids, -1, dims=1)
        probs.scatter_(2, nxt.unsqueeze(-1), self.p)
        return SimpleNamespace(logits=probs.log())


def test_uniform_logits_give_vocab_size():
    windows = [torch.randint(0, 50, (32,)).tolist() for _ in range(3)]
    assert math.isclose(hf_perplexity(Uniform(50), windows), 50.0, rel_tol=1e-9)


def test_known_probability_gives_its_inverse():
    windows = [torch.randint(0, 20, (16,)).tolist() for _ in range(2)]
    assert math.isclose(hf_perplexity(Oracle(20, 0.25), windows), 4.0, rel_tol=1e-9)


def test_windows_are_non_overlapping_and_capped(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 10)

    class CharTok:
        def __call__(self, text, return_tensors=None, verbose=True):  # an HF tokenizer's call
            return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))

    w = token_windows(CharTok(), f, 30)
    assert len(w) == 3 and all(len(x) == 30 for x in w)
    assert sum(w, []) == [ord(c) for c in ("abcdefghij" * 10)[:90]]
    assert len(token_windows(CharTok(), f, 30, max_windows=2)) == 2


def test_eval_engine_cache_on_cpu(monkeypatch):
    """An evaluation engine on CPU takes a small KV cache instead of vLLM's default 92 %
    of the machine's memory, which vLLM refuses to start with when other processes
    hold more than 8 % of it; a user's VLLM_CPU_KVCACHE_SPACE is kept."""
    import os

    from vllm.platforms import current_platform

    from vllm_quarot.eval.perplexity import (
        EVAL_CPU_KV_GIB,
        EVAL_CPU_STEP_TIMEOUT_S,
        eval_cpu_env,
    )

    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", raising=False)
    eval_cpu_env()
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == str(EVAL_CPU_KV_GIB)
    assert os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == str(EVAL_CPU_STEP_TIMEOUT_S)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "60")
    eval_cpu_env()
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "60"
