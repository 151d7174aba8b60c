"""The command line on stories260K: quantize, eval ppl (simulation: vLLM's CPU
attention cannot run head_dim 8) and eval stats."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINYSTORIES

from vllm_quarot.cli import build_parser, main
from vllm_quarot.eval.zoo import STORIES_HF
from vllm_quarot.offline.options import QuantizeOptions


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


# ----------------------------------------------------- exit status and one-line errors

def _one_error_line(capsys, cmd: str = "quantize") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"vllm-quarot {cmd}: error: "), err
    return err[0]


def test_options_come_from_the_parser_by_name():
    """QuantizeOptions.from_namespace: every field is an argparse destination of
    `quantize`, and the CLI defaults are the dataclass defaults."""
    a = build_parser().parse_args(["quantize", "m", "o", "--scheme", "w4a4"])
    assert {f.name for f in dataclasses.fields(QuantizeOptions)} <= set(vars(a))
    assert QuantizeOptions.from_namespace(a) == QuantizeOptions(scheme="w4a4")
    a = build_parser().parse_args(["quantize", "m", "o", "--scheme", "kv4",
                                   "--no-online-hadamard", "--overwrite", "--damp", "0.1"])
    o = QuantizeOptions.from_namespace(a)
    assert (o.online_hadamard, o.overwrite, o.damp) == (False, True, 0.1)
    a = build_parser().parse_args(["quantize", "m", "o", "--scheme", "w4a4", "--tp", "4"])
    assert QuantizeOptions.from_namespace(a).tp == 4


BAD_OPTIONS = [
    (["--group-size", "16"], "--group-size 16 does not divide the intermediate size "
                             "(down_proj) 172 of this model"),
    (["--group-size", "12"], "--group-size 12 at 4 bits: a group must fill whole 32-bit "
                             "words of packed codes (a multiple of 8)"),
    (["--group-size", "0"], "--group-size must be -1 or positive, got 0"),
    (["--nsamples", "0"], "--nsamples must be positive, got 0"),
    (["--nsamples", "-3"], "--nsamples must be positive, got -3"),
    (["--seqlen", "0"], "--seqlen must be positive, got 0"),
    (["--weight-method", "gptq", "--calib", str(TINYSTORIES), "--seqlen", "4096"],
     "--seqlen 4096 is longer than the model's context (max_position_embeddings 512)"),
    (["--calib-self", "0"], "--calib-self must be a positive number of samples, got 0"),
    (["--weight-method", "gptq", "--damp", "0"], "--damp must be positive, got 0.0"),
    (["--damp", "-0.5"], "--damp must be positive, got -0.5"),
    (["--kv-clip", "1.5"], "--kv-clip must be in (0, 1], got 1.5"),
    (["--weight-method", "gptq"], "GPTQ need calibration text: give --calib FILE or "
                                  "--calib-self N"),
    (["--calib", "/no/such.txt", "--weight-method", "gptq"],
     "calibration file /no/such.txt does not exist"),
    (["--calib", str(TINYSTORIES), "--calib-self", "2"],
     "argument --calib-self: not allowed with argument --calib"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--a8-layers", "2", "--scheme", "w8a8"], "--a8-layers keeps some 4-bit activations"),
    (["--max-shard-size", "huge"], "--max-shard-size must be a size like 5GB"),
    (["--rotate", "spinquant", "--spinquant-steps", "-1"], "--spinquant-steps must be >= 0"),
    (["--resume", "--a8-layers", "layers.x"], "--a8-layers takes auto, a number, or names"),
    (["--nsamples", "many"], "argument --nsamples: invalid int value: 'many'"),
    (["--scheme", "w2"], "unknown scheme 'w2'; choose one of"),
    (["--tp", "0"], "--tp must be a positive number of blocks, got 0"),
    (["--tp", "2"], "--tp 2 does not fit this model: its block-diagonal online R4 needs a "
                    "Hadamard matrix of order intermediate 172 / 2 = 86, which cannot be "
                    "built here; nearest --tp that works: 1"),
    (["--tp", "3", "--no-online-hadamard"],
     "--tp 3 does not fit this model: 3 does not divide both the inputs of o_proj (heads "
     "× head_dim 64) and down_proj (intermediate 172); nearest --tp that works: 2"),
    (["--tp", "two"], "argument --tp: invalid int value: 'two'"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(c[0]) for c in BAD_OPTIONS])
def test_bad_options_are_one_line_before_any_work(shared_data, tmp_path, capsys, extra,
                                                  message):
    t0 = time.time()
    argv = ["quantize", str(STORIES_HF), str(tmp_path / "q"), "--scheme", "w4a4",
            "--weight-method", "rtn", *extra]
    assert main(argv) == 2
    assert message in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing created
    assert time.time() - t0 < 30


def test_short_calibration_file_is_one_line(shared_data, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    assert main(["quantize", str(STORIES_HF), str(tmp_path / "q"), "--scheme", "w4a4",
                 "--calib", str(short), "--seqlen", "64"]) == 2
    assert "has 6 tokens, fewer than --seqlen 64" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_out_dir_and_input_errors_are_one_line(shared_data, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "x").write_text("")
    argv = ["quantize", str(STORIES_HF), str(out), "--scheme", "w4a4", "--weight-method", "rtn"]
    assert main(argv) == 2
    assert _one_error_line(capsys).endswith(
        f"output directory {out} is not empty (give --overwrite to replace it)")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "x").exists()
    capsys.readouterr()
    # a model directory without config.json; one without weights (FileNotFoundError)
    assert main(["quantize", str(tmp_path), str(tmp_path / "y"), "--scheme", "w4a4",
                 "--weight-method", "rtn"]) == 2
    assert "is not a Hugging Face model directory (no config.json)" in _one_error_line(capsys)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((STORIES_HF / "config.json").read_text())
    assert main(["quantize", str(bare), str(tmp_path / "y"), "--scheme", "w4a4",
                 "--weight-method", "rtn"]) == 2
    assert "holds no *.safetensors weights" in _one_error_line(capsys)
    # eval: a missing text file (FileNotFoundError), a broken checkpoint (format error)
    assert main(["eval", "ppl", str(out), "--text", str(tmp_path / "none.txt"),
                 "--backend", "sim"]) == 2
    assert "none.txt" in _one_error_line(capsys, "eval ppl")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["weight"]["bits"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "ppl", str(out), "--text", str(TINYSTORIES), "--seqlen", "64",
                 "--max-windows", "1", "--backend", "sim"]) == 2
    assert "weight bits" in _one_error_line(capsys, "eval ppl")
    assert main(["eval", "ppl", str(tmp_path / "nowhere"), "--text", str(TINYSTORIES)]) == 2
    _one_error_line(capsys, "eval ppl")


def test_help_exits_zero(capsys):
    assert main(["quantize", "--help"]) == 0
    assert "--overwrite" in capsys.readouterr().out


@pytest.mark.vllm
def test_eval_ppl_vllm_exits_zero(random_llama):
    """The engine is shut down before the interpreter exits: exit 0, not SIGABRT (134)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_quarot.cli", "eval", "ppl", str(random_llama),
         "--backend", "vllm", "--text", str(TINYSTORIES), "--seqlen", "128",
         "--max-windows", "2", "--dtype", "float32"],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"vLLM perplexity \(float32\): [\d.]+", proc.stdout)
    assert "terminate called" not in proc.stderr


def test_options_table_in_the_docs_is_current():
    """docs/quantize.md's options table is derived from QuantizeOptions (regenerate:
    python -m vllm_quarot.offline.options docs/quantize.md)."""
    from vllm_quarot.offline.options import OPTIONS_BEGIN, OPTIONS_END, options_markdown

    doc = (Path(__file__).parents[1] / "docs" / "quantize.md").read_text()
    table = doc.split(OPTIONS_BEGIN, 1)[1].split(OPTIONS_END, 1)[0]
    assert table.strip() == options_markdown().strip()
    # and --help lists every option the table lists
    help_text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    for f in dataclasses.fields(QuantizeOptions):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text and f"`{flag}" in table, flag


def test_version(capsys):
    from vllm_quarot import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vllm-quarot {__version__}"


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only QuaRotError is a user error (one line, exit 2); anything else propagates
    (Python prints its traceback, exit 1)."""
    import vllm_quarot.offline.quantize as q

    def boom(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(q, "quantize", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["quantize", str(tmp_path), str(tmp_path / "o"), "--scheme", "w4a4"])


def test_readme_tables_are_the_measured_ones():
    """Every table block of the README is pasted from benchmarks/results by
    scripts/readme_tables.py, never edited by hand; the README stays ≤ 250 lines."""
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "readme_tables.py"),
                           "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len((root / "README.md").read_text().splitlines()) <= 250
