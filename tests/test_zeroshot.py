"""Last-word accuracy (vllm_quarot.eval.zeroshot): item extraction, the scoring rule on
models with a known answer, the simulation backend, vLLM vs the simulation, and
`vllm-quarot eval zeroshot` / `eval table`."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import TINYSTORIES, WIKITEXT
from servers import engine_env
from transformers import AutoTokenizer

from vllm_quarot.cli import main
from vllm_quarot.errors import QuaRotError
from vllm_quarot.eval.perplexity import load_reference
from vllm_quarot.eval.zeroshot import (
    Encoded,
    Item,
    encode_items,
    hf_zeroshot,
    last_word_items,
    split_last_word,
)

FILLER = " ".join(["word"] * 25)


def test_split_last_word():
    assert split_last_word(f"{FILLER} and became best friends.") == Item(
        f"{FILLER} and became best", "friends")
    assert split_last_word(f'{FILLER} I polish it every day."') == Item(
        f"{FILLER} I polish it every", "day")
    assert split_last_word(f"{FILLER}\n  said   Roxy?").context == f"{FILLER} said"
    assert split_last_word("too short to be an item.") is None
    assert split_last_word(f"{FILLER} the year 1999.") is None  # not a word
    assert split_last_word(f"{FILLER} her mom's.") is None  # not letters only
    assert split_last_word(f"{FILLER} â€œCan you help?â€") is None  # mojibake
    assert split_last_word(" ".join(["w"] * 200) + " end.") is None  # over max_words


def test_items_are_the_first_qualifying_paragraphs(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(f"short one.\n\n{FILLER} alpha.\n\n{FILLER} 42.\n\n{FILLER}\nbeta!\n"
                 f"\n\n{FILLER} gamma.\n")
    assert [it.target for it in last_word_items(f, None)] == ["alpha", "beta", "gamma"]
    assert [it.target for it in last_word_items(f, 2)] == ["alpha", "beta"]
    with pytest.raises(QuaRotError, match="no paragraph"):
        last_word_items(f, 2, min_words=100)


def test_tinystories_items_are_deterministic(shared_data):
    a = last_word_items(TINYSTORIES, 50)
    assert a == last_word_items(TINYSTORIES, 50) == last_word_items(TINYSTORIES, None)[:50]
    assert a[0].target == "day" and a[0].context.endswith("I polish it every")
    assert a[1].target == "friends" and a[1].context.endswith("and became best")
    text = TINYSTORIES.read_text()
    for it in a:  # the context and the word are, in order, the start of a paragraph
        assert it.target.isalpha() and 20 <= len(it.context.split()) + 1 <= 120
        words = it.context.split()
        assert re.search(r"\s+".join(map(re.escape, words + [it.target])), text)


def test_encode_splits_context_and_target(shared_data):
    from vllm_quarot.eval.zoo import STORIES_HF

    tok = AutoTokenizer.from_pretrained(STORIES_HF)
    items = last_word_items(TINYSTORIES, 20)
    for it, e in zip(items, encode_items(tok, items), strict=True):
        assert e.ids == tok(f"{it.context} {it.target}").input_ids
        assert e.ids[: len(e.ids) - e.n_target] == tok(it.context).input_ids
        assert tok.decode(e.ids[-e.n_target:]).strip() == it.target


class Oracle(torch.nn.Module):
    """Puts probability p on a fixed 'true' next token (ids[t] + 1) and spreads the
    rest: a target token is greedy iff it is ids[t] + 1 (when p > the rest)."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, input_ids, attention_mask=None):
        rest = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*input_ids.shape, self.vocab), rest, dtype=torch.float64)
        probs.scatter_(2, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.p)
        return SimpleNamespace(logits=probs.log())


def test_scoring_rule_on_a_known_model():
    vocab, p = 50, 0.5
    rest = (1 - p) / (vocab - 1)
    enc = [
        Encoded([1, 2, 3, 4, 5], 2),  # both target tokens are the successors: correct
        Encoded([7, 8, 9, 30], 1),  # 30 is not 10: wrong
        Encoded([3, 4, 5, 6, 20, 21], 3),  # 20 is not 7, then 21 is: wrong
        Encoded([10, 11], 1),  # shortest: correct
    ]
    for bs in (1, 3):
        r = hf_zeroshot(Oracle(vocab, p), enc, batch_size=bs)
        assert r.correct == [True, False, False, True]
        expect = [2 * math.log(p), math.log(rest), math.log(rest) + 2 * math.log(p),
                  math.log(p)]
        assert r.logprobs == pytest.approx(expect, abs=1e-9)
        assert r.accuracy == 0.5 and r.mean_logprob == pytest.approx(sum(expect) / 4)


def test_simulation_backend_on_a_tiny_model(shared_data, random_llama, quarot_w4a4):
    tok = AutoTokenizer.from_pretrained(random_llama)
    enc = encode_items(tok, last_word_items(TINYSTORIES, 24))
    model = load_reference(random_llama)
    r8 = hf_zeroshot(model, enc, batch_size=8)
    r1 = hf_zeroshot(model, enc[:6], batch_size=1)  # padding changes nothing
    assert r8.correct[:6] == r1.correct
    assert r8.logprobs[:6] == pytest.approx(r1.logprobs, abs=1e-4)
    assert all(lp < 0 for lp in r8.logprobs) and r8.n == 24
    q = hf_zeroshot(load_reference(quarot_w4a4), enc)
    assert q.n == 24 and all(math.isfinite(lp) and lp < 0 for lp in q.logprobs)
    assert q.logprobs != pytest.approx(r8.logprobs, abs=1e-3)  # it is quantized


@pytest.mark.vllm
def test_vllm_agrees_with_simulation(quarot_w4a4):
    """One engine, through the command line: `eval zeroshot --backend both` scores the
    same items with vLLM (float32, the quarot plugin) and with the simulation."""
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_quarot.cli", "eval", "zeroshot", str(quarot_w4a4),
         "--zeroshot-data", str(TINYSTORIES), "--items", "32", "--dtype", "float32"],
        capture_output=True, text=True, env=engine_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = proc.stdout
    assert "32 last-word items" in out
    assert re.search(r"vLLM \(float32\): last-word accuracy [\d.]+ \(\d+/32\)", out), out
    sim = float(re.search(r"simulation \(float32\): .* log-likelihood ([-\d.]+) nats",
                          out).group(1))
    m = re.search(r"\((\d+) items differ\), mean log-likelihood ([-+][\d.]+), "
                  r"max per-item \|diff\| ([\d.]+)", out)
    assert m, out
    # The random model is very sure of itself (its targets cost hundreds of nats), so
    # the differences are relative: measured ~2e-5 (float rounding, a rare 4-bit code
    # flip); a wrong scale or a missing Hadamard moves them by far more than 1e-3.
    assert int(m.group(1)) <= 1
    assert abs(float(m.group(2))) < 1e-3 * abs(sim)
    assert float(m.group(3)) < 2e-3 * abs(sim)


def test_vllm_scores_come_from_ranks():
    """vllm_zeroshot reads the target tokens' log-probs and ranks (1 = argmax) from an
    engine's prompt log-probs: a stand-in engine with known answers."""
    from vllm.logprobs import Logprob

    from vllm_quarot.eval.zeroshot import vllm_zeroshot

    enc = [Encoded([1, 2, 3, 4], 2), Encoded([5, 6, 7], 1), Encoded([8, 9, 10], 2)]
    ranks = {4: 1, 3: 1, 7: 1, 9: 1, 10: 3, 2: 7, 6: 9}

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            assert params.prompt_logprobs == 0
            return [SimpleNamespace(prompt_logprobs=[None] + [
                {t: Logprob(-0.5 * t, ranks[t])} for t in p["prompt_token_ids"][1:]])
                for p in prompts]

    r = vllm_zeroshot(FakeLLM(), enc)
    assert r.correct == [True, True, False]
    assert r.logprobs == pytest.approx([-3.5, -3.5, -9.5])


def test_cli_table_sim(shared_data, random_llama, quarot_w4a4, tmp_path, capsys):
    out = tmp_path / "table.md"
    assert main(["eval", "table", str(random_llama), str(quarot_w4a4), "--text",
                 str(WIKITEXT), "--seqlen", "128", "--max-windows", "2", "--backend", "sim",
                 "--zeroshot-data", str(TINYSTORIES), "--items", "16", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    table = out.read_text()
    assert table in printed
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r]
    assert rows[0].startswith("| model | scheme | size (MiB) | perplexity")
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[1:]]
    assert [c[:2] for c in cells] == [["llama", "fp32"], ["llama-w4a4", "w4a4"]]
    assert cells[0][4] == "1.0000" and cells[0][6] in ("1.0000", "–")
    assert float(cells[1][2]) < float(cells[0][2])  # packed 4-bit weights are smaller
    assert float(cells[1][4]) == pytest.approx(float(cells[1][3]) / float(cells[0][3]),
                                               rel=1e-3)
    assert "16 TinyStories items" in table
    for c in cells:
        assert 1.0 < float(c[3]) and 0.0 <= float(c[5]) <= 1.0 and float(c[7]) < 0


def test_cli_table_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "table", str(tmp_path), "--text", "x", "--backend", "sim"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vllm-quarot eval table: error: "), err
    assert "no config.json" in err[0]
