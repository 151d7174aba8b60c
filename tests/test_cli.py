"""The command line on stories260K: quantize, eval ppl (simulation: vLLM's CPU
attention cannot run head_dim 8) and eval stats."""

from __future__ import annotations

import re

from conftest import TINYSTORIES
from tiny_models import STORIES_HF

from vllm_quarot.cli import main


def test_quantize_then_eval(shared_data, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(STORIES_HF), str(out), "--scheme", "w4a4kv4",
                 "--weight-method", "rtn", "--w-clip", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verify: rotated fp64 model vs original" in printed
    assert main(["eval", "ppl", str(out), "--text", str(TINYSTORIES), "--seqlen", "256",
                 "--max-windows", "4", "--backend", "sim"]) == 0
    ppl = float(re.search(r"simulation perplexity \(float32\): ([\d.]+)",
                          capsys.readouterr().out).group(1))
    assert 1.0 < ppl < 100.0
    assert main(["eval", "ppl", str(STORIES_HF), "--text", str(TINYSTORIES), "--seqlen",
                 "256", "--max-windows", "4", "--backend", "sim"]) == 0
    ref = float(re.search(r"simulation perplexity \(float32\): ([\d.]+)",
                          capsys.readouterr().out).group(1))
    assert ref < ppl  # 4-bit everything on a 260K-parameter model costs accuracy


def test_eval_stats_writes_figure(shared_data, tmp_path, capsys):
    png = tmp_path / "stats.png"
    assert main(["eval", "stats", str(STORIES_HF), "--text", str(TINYSTORIES),
                 "--tokens", "128", "--png", str(png)]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if "kurtosis" in r]
    assert len(rows) == 12  # 3 layers × (q_proj, down_proj) × (original, rotated)
    assert png.stat().st_size > 10_000


def test_cli_errors_are_one_line(shared_data, tmp_path, capsys):
    assert main(["quantize", str(STORIES_HF), str(tmp_path / "x"), "--scheme", "w2"]) == 2
    assert "unknown scheme 'w2'" in capsys.readouterr().err
