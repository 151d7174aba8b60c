"""Zero-shot last-word accuracy, LAMBADA-style, on TinyStories (no download).

Data: ``tinystories/validation_head.txt`` of the shared data folder (the first ~1.1k
stories of the TinyStories validation split, CDLA-Sharing-1.0; ``$QUAROT_DATA_DIR``,
default ``../shared/data`` beside the project). No PyPI package was found that ships
a public zero-shot set (LAMBADA, HellaSwag, PIQA, ARC, ...) as data, and the Hugging
Face Hub is out of reach, so the task is built from this text.

Items (deterministic, tokenizer-independent): the file is cut into paragraphs at blank
lines; each paragraph's whitespace is collapsed to single spaces. A paragraph is an
item when it is pure ASCII (this skips the file's few mojibake paragraphs), has
between ``min_words`` (20) and ``max_words`` (120) words, and its last word is
letters followed only by punctuation (``it."``, ``friends.``, ``Roxy?``). The
target is that word's letters; the context is the paragraph before it (without the
space). The first ``n`` such paragraphs in file order are used: 3,490 qualify, the
default is the first 100 (~5k SmolLM2 tokens: a standard error of ~5 points on
the accuracy; the mean log-likelihood resolves much smaller differences).

Protocol (lm-eval-harness ``lambada_openai``): the target is scored as the tokens of
``" " + target``: ``tokenize(context + " " + target)`` is split after as many tokens
as ``tokenize(context)`` has (BOS included when the tokenizer adds one). An item is
*correct* when every target token is the model's argmax given everything before it
(vLLM's rank 1: no token scores strictly higher), which is exactly "greedy decoding
from the context reproduces the target's tokens"; its *log-likelihood* is the sum of
the target tokens' log-probabilities (nats per word). Reported: accuracy and the
mean target log-likelihood over the items.

Two backends score the same token ids: vLLM (prompt log-probs with ranks: the
serving path) and a transformers model (``load_reference``: the float32 simulation of
a QuaRot checkpoint, or the plain model).
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_quarot.errors import QuaRotError

DEFAULT_ITEMS = 100
MIN_WORDS = 20
MAX_WORDS = 120
_LAST_WORD = re.compile(r"([A-Za-z]+)[.,!?;:\"')]*")


def default_data_file() -> Path:
    """TinyStories' validation head in the shared data folder."""
    root = os.environ.get("QUAROT_DATA_DIR",
                          Path(__file__).resolve().parents[3] / "shared" / "data")
    return Path(root) / "tinystories" / "validation_head.txt"


@dataclass(frozen=True)
class Item:
    context: str
    target: str


@dataclass(frozen=True)
class Encoded:
    """Token ids of context + target; the last n_target ids are the target."""

    ids: list[int]
    n_target: int


@dataclass(frozen=True)
class ZeroShotResult:
    correct: list[bool]
    logprobs: list[float]  # per item: sum of the target tokens' log-probs (nats)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / self.n

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / self.n

    def format(self) -> str:
        return (f"last-word accuracy {self.accuracy:.4f} ({sum(self.correct)}/{self.n}), "
                f"mean target log-likelihood {self.mean_logprob:.4f} nats")


def split_last_word(paragraph: str, min_words: int = MIN_WORDS,
                    max_words: int = MAX_WORDS) -> Item | None:
    """The item of one paragraph, or None when it does not qualify."""
    words = paragraph.split()
    if not (min_words <= len(words) <= max_words) or not paragraph.isascii():
        return None
    m = _LAST_WORD.fullmatch(words[-1])
    if m is None:
        return None
    return Item(context=" ".join(words[:-1]), target=m.group(1))


def last_word_items(text_file: str | Path | None = None, n: int | None = DEFAULT_ITEMS,
                    min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> list[Item]:
    """The first n qualifying paragraphs of text_file (all of them when n is None)."""
    path = Path(text_file) if text_file is not None else default_data_file()
    if not path.is_file():
        raise QuaRotError(f"zero-shot data {path} not found (set QUAROT_DATA_DIR "
                                "or pass the TinyStories validation head file)")
    items = []
    for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        item = split_last_word(para, min_words, max_words)
        if item is not None:
            items.append(item)
            if n is not None and len(items) == n:
                break
    if not items:
        raise QuaRotError(f"{path} has no paragraph usable as a last-word item")
    return items


def encode_items(tokenizer: Any, items: list[Item]) -> list[Encoded]:
    """Token ids per item, split into context and target the lm-eval way."""
    out = []
    for it in items:
        whole = tokenizer(f"{it.context} {it.target}").input_ids
        n_ctx = len(tokenizer(it.context).input_ids)
        if not 1 <= n_ctx < len(whole):
            raise ValueError(f"cannot split {it.context!r} + {it.target!r} into tokens")
        out.append(Encoded(ids=list(whole), n_target=len(whole) - n_ctx))
    return out


def vllm_zeroshot(llm: Any, encoded: list[Encoded]) -> ZeroShotResult:
    """Score the items with an ``LLM``'s prompt log-probs (one batch)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=e.ids) for e in encoded], params,
                        use_tqdm=False)
    correct, logprobs = [], []
    for out, e in zip(outs, encoded, strict=True):
        lp, ok = 0.0, True
        for pos in range(len(e.ids) - e.n_target, len(e.ids)):
            entry = out.prompt_logprobs[pos][e.ids[pos]]
            lp += entry.logprob
            ok = ok and entry.rank == 1
        correct.append(ok)
        logprobs.append(lp)
    return ZeroShotResult(correct, logprobs)


@torch.no_grad()
def hf_zeroshot(model: torch.nn.Module, encoded: list[Encoded],
                batch_size: int = 8) -> ZeroShotResult:
    """The same scores from a transformers causal LM, batched with right padding (a
    causal model's logits at a real token never depend on the padding after it)."""
    correct: list[bool] = [False] * len(encoded)
    logprobs: list[float] = [0.0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i].ids) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(encoded[i].ids)] = torch.tensor(encoded[i].ids)
            mask[row, : len(encoded[i].ids)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, i in enumerate(batch):
            e = encoded[i]
            first = len(e.ids) - e.n_target
            lp = torch.log_softmax(logits[row, first - 1 : len(e.ids) - 1].double(), -1)
            tgt = torch.tensor(e.ids[first:])
            tok_lp = lp.gather(1, tgt[:, None])[:, 0]
            logprobs[i] = tok_lp.sum().item()
            correct[i] = bool((lp > tok_lp[:, None]).sum(-1).eq(0).all())
    return ZeroShotResult(correct, logprobs)


@dataclass(frozen=True)
class ServedEval:
    zeroshot: ZeroShotResult | None
    perplexity: float | None


def serve_eval(model_dir: str | Path, quantization: str | None,
               encoded: list[Encoded] | None = None, windows: list[list[int]] | None = None,
               dtype: str = "bfloat16", enforce_eager: bool = True) -> ServedEval:
    """One vLLM engine on model_dir: the zero-shot items and/or perplexity windows,
    then shut down (so that the next model gets the memory)."""
    from vllm import LLM

    from vllm_quarot.eval.perplexity import eval_cpu_env, shutdown_llm, vllm_perplexity

    longest = max([len(e.ids) for e in encoded or []] + [len(w) for w in windows or []])
    eval_cpu_env()
    llm = LLM(str(model_dir), quantization=quantization, dtype=dtype,
              enforce_eager=enforce_eager, max_model_len=longest + 8, max_num_seqs=16,
              seed=0)
    try:
        zs = vllm_zeroshot(llm, encoded) if encoded else None
        ppl = vllm_perplexity(llm, windows) if windows else None
        return ServedEval(zs, ppl)
    finally:
        shutdown_llm(llm)
        del llm
        gc.collect()
