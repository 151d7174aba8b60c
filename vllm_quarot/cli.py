"""``vllm-quarot`` command line: quantize, eval."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from vllm_quarot import __version__
from vllm_quarot.errors import QuaRotError
from vllm_quarot.format import FORMAT_VERSION
from vllm_quarot.offline.options import QuantizeOptions, add_arguments

EXIT_ERROR = 2  # bad input: one line "vllm-quarot CMD: error: ..." (QuaRotError)
EXIT_BUG = 1  # anything else: its traceback


class _Parser(argparse.ArgumentParser):
    """argparse without the usage block on errors: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="rotate a Hugging Face checkpoint with QuaRot and quantize it",
        description="Rotate (R1, R2, R4) and quantize a Llama / Mistral / Qwen2 / Qwen3 / "
        f"Phi-3 checkpoint into a vllm-quarot checkpoint (format v{FORMAT_VERSION}) that "
        "`vllm serve OUT_DIR` serves.",
    )
    p.add_argument("model_dir", metavar="MODEL",
                   help="a Hugging Face model directory, or a Hub id (org/name: fetched "
                   "into the HF cache; HF_HUB_OFFLINE=1 uses the cache only)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    add_arguments(p)  # every option of QuantizeOptions, declared there
    p.set_defaults(parser=p)


def _raise_interrupt(signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_quantize(a: argparse.Namespace) -> int:
    from vllm_quarot.offline.quantize import quantize

    opts = QuantizeOptions.from_namespace(a)
    if threading.current_thread() is not threading.main_thread():
        summary = quantize(a.model_dir, a.out_dir, opts)
    else:  # SIGTERM unwinds like Ctrl-C, so the staged output directory is deleted
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            summary = quantize(a.model_dir, a.out_dir, opts)
        finally:
            signal.signal(signal.SIGTERM, previous)
    print(summary.format())
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="perplexity and last-word accuracy through vLLM and "
                        "the simulation; tables; activation statistics").add_subparsers(
                            dest="what", required=True)
    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--quantization", default=None, help="passed to vLLM (e.g. quarot)")
    p.add_argument("--dtype", default="bfloat16", help="vLLM model dtype")
    p.add_argument("--backend", choices=("both", "vllm", "sim"), default="both",
                   help="vLLM, the pure-PyTorch simulation (float32), or both")
    p.set_defaults(parser=p)
    s = ev.add_parser("stats", help="activation statistics before/after rotation + PNG")
    s.add_argument("model", help="the original (unrotated) Hugging Face model")
    s.add_argument("--text", required=True)
    s.add_argument("--tokens", type=int, default=512)
    s.add_argument("--layers", default=None, help="comma-separated; default first/mid/last")
    s.add_argument("--seed", type=int, default=0, help="R1 seed")
    s.add_argument("--png", default="activation_stats.png")
    s.set_defaults(parser=s)
    z = ev.add_parser("zeroshot", help="LAMBADA-style last-word accuracy on TinyStories")
    z.add_argument("model")
    _add_serving_args(z, backends=("both", "vllm", "sim"), default="both")
    _add_zeroshot_args(z)
    z.set_defaults(parser=z)
    t = ev.add_parser("table", help="checkpoints side by side (Markdown): size, "
                      "perplexity, last-word accuracy")
    t.add_argument("models", nargs="+", metavar="model")
    t.add_argument("--text", required=True, help="perplexity text (e.g. WikiText-2 test)")
    t.add_argument("--seqlen", type=int, default=2048)
    t.add_argument("--max-windows", type=int, default=8)
    _add_serving_args(t, backends=("vllm", "sim"), default="vllm")
    _add_zeroshot_args(t)
    t.add_argument("--out", metavar="FILE.md", default=None, help="also write the table")
    t.set_defaults(parser=t)


def _add_serving_args(p: argparse.ArgumentParser, backends: tuple[str, ...],
                      default: str) -> None:
    p.add_argument("--backend", choices=backends, default=default,
                   help="vLLM, or the pure-PyTorch simulation (float32)")
    p.add_argument("--quantization", default="auto",
                   help="auto: quarot for a QuaRot checkpoint, none otherwise; any other "
                   "value is passed to vLLM for every model")
    p.add_argument("--dtype", default="bfloat16", help="vLLM model dtype (float32 is "
                   "several times faster on CPUs without AVX-512 BF16)")


def _add_zeroshot_args(p: argparse.ArgumentParser) -> None:
    from vllm_quarot.eval import zeroshot

    p.add_argument("--zeroshot-data", metavar="FILE", default=None,
                   help="TinyStories text (default: the shared data folder's "
                   "tinystories/validation_head.txt, $QUAROT_DATA_DIR)")
    p.add_argument("--items", type=int, default=zeroshot.DEFAULT_ITEMS,
                   help="last-word items: the first N qualifying paragraphs (0: none)")


def _quantization_for(model: str, choice: str) -> str | None:
    from vllm_quarot.eval.perplexity import is_quarot_checkpoint

    if choice == "auto":
        return "quarot" if is_quarot_checkpoint(model) else None
    return None if choice == "none" else choice


def _scheme_of(model: str) -> str:
    import json

    cfg = json.loads((Path(model) / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    if qc.get("scheme"):
        return str(qc["scheme"])
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def _size_mib(model: str) -> float:
    return sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 2**20


def _run_eval_zeroshot(a: argparse.Namespace) -> int:  # noqa: C901
    import time

    from transformers import AutoTokenizer

    from vllm_quarot.eval import zeroshot
    from vllm_quarot.eval.perplexity import load_reference

    if a.items < 1:
        raise QuaRotError("--items must be at least 1")
    items = zeroshot.last_word_items(a.zeroshot_data, a.items)
    encoded = zeroshot.encode_items(AutoTokenizer.from_pretrained(a.model), items)
    n_tok = sum(e.n_target for e in encoded)
    print(f"{len(items)} last-word items ({n_tok} target tokens)")
    results = {}
    if a.backend in ("both", "vllm"):
        t0 = time.monotonic()
        results["vllm"] = zeroshot.serve_eval(
            a.model, _quantization_for(a.model, a.quantization), encoded,
            dtype=a.dtype).zeroshot
        print(f"vLLM ({a.dtype}): {results['vllm'].format()} "
              f"[{time.monotonic() - t0:.1f} s]")
    if a.backend in ("both", "sim"):
        t0 = time.monotonic()
        results["sim"] = zeroshot.hf_zeroshot(load_reference(a.model), encoded)
        print(f"simulation (float32): {results['sim'].format()} "
              f"[{time.monotonic() - t0:.1f} s]")
    if len(results) == 2:
        v, s = results["vllm"], results["sim"]
        differ = sum(x != y for x, y in zip(v.correct, s.correct, strict=True))
        dlp = max(abs(x - y) for x, y in zip(v.logprobs, s.logprobs, strict=True))
        print(f"vLLM - simulation: accuracy {v.accuracy - s.accuracy:+.4f} ({differ} items "
              f"differ), mean log-likelihood {v.mean_logprob - s.mean_logprob:+.5f}, "
              f"max per-item |diff| {dlp:.5f}")
    return 0


def _ratio(x: float | None, first: float | None) -> str:
    return f"{x / first:.4f}" if x is not None and first else "–"


def _run_eval_table(a: argparse.Namespace) -> int:
    import time

    from transformers import AutoTokenizer

    from vllm_quarot.eval import perplexity as evaluate
    from vllm_quarot.eval import zeroshot

    for m in a.models:  # fail before the first (slow) model, not after it
        _model_dir(m)
    _text_file(a.text)
    items = zeroshot.last_word_items(a.zeroshot_data, a.items) if a.items > 0 else []
    rows = []
    for m in a.models:
        t0 = time.monotonic()
        tok = AutoTokenizer.from_pretrained(m)
        windows = evaluate.token_windows(tok, a.text, a.seqlen, a.max_windows)
        encoded = zeroshot.encode_items(tok, items) if items else None
        if a.backend == "vllm":
            r = zeroshot.serve_eval(m, _quantization_for(m, a.quantization), encoded,
                                    windows, dtype=a.dtype)
            ppl, zs = r.perplexity, r.zeroshot
        else:
            model = evaluate.load_reference(m)
            ppl = evaluate.hf_perplexity(model, windows)
            zs = zeroshot.hf_zeroshot(model, encoded) if encoded else None
            del model
        rows.append((m, ppl, zs))
        print(f"{m}: perplexity {ppl:.4f}" + (f", {zs.format()}" if zs else "")
              + f" [{time.monotonic() - t0:.1f} s]", file=sys.stderr, flush=True)
    backend = f"vLLM ({a.dtype})" if a.backend == "vllm" else "simulation (float32)"
    lines = [
        f"{backend}; perplexity: {Path(a.text).name}, {len(windows)} windows of "
        f"{a.seqlen} tokens" + (f"; last-word: {len(items)} TinyStories items "
                                "(accuracy, mean target log-likelihood in nats)"
                                if items else ""),
        "",
        "| model | scheme | size (MiB) | perplexity | ppl / first | last-word acc "
        "| acc / first | target log-lik |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = [Path(m).name for m in a.models]
    if len(set(names)) < len(names):
        names = list(a.models)
    ppl0, zs0 = rows[0][1], rows[0][2]
    for name, (m, ppl, zs) in zip(names, rows, strict=True):
        acc = f"{zs.accuracy:.4f}" if zs else "–"
        lik = f"{zs.mean_logprob:.4f}" if zs else "–"
        acc_ratio = _ratio(zs.accuracy, zs0.accuracy) if zs and zs0 else "–"
        lines.append(f"| {name} | {_scheme_of(m)} | {_size_mib(m):.1f} | {ppl:.4f} "
                     f"| {_ratio(ppl, ppl0)} | {acc} | {acc_ratio} | {lik} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if a.out:
        Path(a.out).write_text(table, encoding="utf-8")
        print(f"wrote {a.out}")
    return 0


def _run_eval(a: argparse.Namespace) -> int:
    if a.what == "zeroshot":
        return _run_eval_zeroshot(a)
    if a.what == "table":
        return _run_eval_table(a)
    from transformers import AutoTokenizer

    from vllm_quarot.eval import perplexity as evaluate

    _model_dir(a.model)
    _text_file(a.text)
    tok = AutoTokenizer.from_pretrained(a.model)
    if a.what == "stats":
        from vllm_quarot.eval.act_stats import activation_stats, plot
        from vllm_quarot.offline.layer_runner import load_canonical_model

        model = load_canonical_model(a.model)
        n = model.config.num_hidden_layers
        layers = ([int(x) for x in a.layers.split(",")] if a.layers
                  else sorted({0, n // 2, n - 1}))
        ids = evaluate.token_windows(tok, a.text, a.tokens, 1)
        import torch

        stats = activation_stats(model, torch.tensor(ids), layers, a.seed)
        for st in stats:
            print(st.row())
        plot(stats, a.png, f"{Path(a.model).name}: inputs of q_proj and down_proj")
        print(f"wrote {a.png}")
        return 0
    windows = evaluate.token_windows(tok, a.text, a.seqlen, a.max_windows)
    n_tok = len(windows) * (a.seqlen - 1)
    print(f"{len(windows)} windows of {a.seqlen} tokens ({n_tok} scored)")
    results = {}
    if a.backend in ("both", "vllm"):
        results["vllm"] = evaluate.serve_perplexity(a.model, windows, a.quantization, a.dtype)
        print(f"vLLM perplexity ({a.dtype}): {results['vllm']:.4f}")
    if a.backend in ("both", "sim"):
        results["sim"] = evaluate.hf_perplexity(evaluate.load_reference(a.model), windows)
        print(f"simulation perplexity (float32): {results['sim']:.4f}")
    if len(results) == 2:
        print(f"vLLM / simulation: {results['vllm'] / results['sim']:.5f}")
    return 0


def _model_dir(model: str) -> Path:
    """A model directory given on the command line, or a one-line error."""
    if not (Path(model) / "config.json").is_file():
        raise QuaRotError(f"{model}: no config.json (not a model directory)")
    return Path(model)


def _text_file(path: str) -> Path:
    if not Path(path).is_file():
        raise QuaRotError(f"text file {path} does not exist")
    return Path(path)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``vllm-quarot export CKPT OUT --to compressed-tensors`` (vllm_quarot/interop)."""
    p = sub.add_parser("export", help="write a QuaRot checkpoint in another tool's format "
                       "(compressed-tensors: stock vLLM serves it without the plugin)")
    p.add_argument("ckpt", metavar="CKPT", help="a vllm-quarot checkpoint directory")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--to", choices=("compressed-tensors",), default="compressed-tensors")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    def run(a: argparse.Namespace) -> int:
        from vllm_quarot.interop.compressed_tensors import export_checkpoint

        print(export_checkpoint(a.ckpt, a.out_dir, a.to, a.overwrite).format())
        return 0

    p.set_defaults(parser=p, run=run)


def _add_import(sub: argparse._SubParsersAction) -> None:
    """``vllm-quarot import CT_CKPT OUT`` (vllm_quarot/interop/ct_import.py)."""
    p = sub.add_parser("import", help="make an llm-compressor (compressed-tensors) "
                       "checkpoint with online transforms (QuIP, SpinQuant R4) a vllm-quarot "
                       "one that the plugin serves on CPU and at tensor parallelism")
    p.add_argument("ckpt", metavar="CT_CKPT", help="a compressed-tensors checkpoint directory")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    def run(a: argparse.Namespace) -> int:
        from vllm_quarot.interop.ct_import import import_checkpoint

        print(import_checkpoint(a.ckpt, a.out_dir, a.overwrite).format())
        return 0

    p.set_defaults(parser=p, run=run)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vllm-quarot", description=__doc__)
    ap.add_argument("--version", action="version", version=f"vllm-quarot {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_import(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 on a bad option or input (one line on stderr), 1
    on a bug (its traceback), 128 + the signal when interrupted (130: Ctrl-C, 143:
    SIGTERM)."""
    logging.basicConfig(level=logging.INFO, format="[vllm-quarot] %(message)s")
    try:
        a, extra = build_parser().parse_known_args(argv)
        if extra:  # reported by the subcommand's parser: "vllm-quarot quantize: error: ..."
            a.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    cmd = f"vllm-quarot {a.cmd}" + (f" {a.what}" if a.cmd == "eval" else "")
    try:
        if a.cmd == "quantize":
            return _run_quantize(a)
        if a.cmd in ("export", "import"):
            return a.run(a)
        return _run_eval(a)
    except QuaRotError as e:
        print(f"{cmd}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        name = str(e) if str(e) in signal.Signals.__members__ else "SIGINT"
        print(f"{cmd}: interrupted ({name})", file=sys.stderr)
        return 128 + signal.Signals[name].value


if __name__ == "__main__":
    sys.exit(main())
