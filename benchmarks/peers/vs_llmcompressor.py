"""vllm-quarot beside llm-compressor and stock vLLM: the same model, the same
calibration and evaluation token windows, one table.

    bash scripts/peers_venv.sh          # .venv-peers: llm-compressor 0.14 (their side)
    .venv/bin/python benchmarks/peers/vs_llmcompressor.py --model smollm2
    .venv/bin/python benchmarks/peers/vs_llmcompressor.py --model smollm2-qwen2keys \
        --recipes none+w4a16-g64,quip+w4a16-g64

For every recipe ROTATION+SCHEME (llm-compressor's modifiers: GPTQ alone, QuIP (input
random Hadamard on every linear), SpinQuant R1/R2/R4 (random Hadamards, not learned),
SmoothQuant; then GPTQ at the scheme) it

* quantizes with llm-compressor (benchmarks/peers/llmc_worker.py in .venv-peers) and
  with ``vllm-quarot quantize`` at the same scheme (its defaults: QuaRot R1/R2 fused +
  online R4 for the rotated recipes, R1 online after the norms at W4A4 since 0.14,
  ``--rotate none`` beside plain GPTQ; ``--lm-head none`` as
  their ``ignore=["lm_head"]``), both on the same calibration windows (our quantizer's
  own draw: ``--calib`` TinyStories, ``--nsamples`` × ``--calib-seqlen``, seed 0 — the
  windows are written to WINDOWS.json and handed to llm-compressor as its dataset);
  wall time and peak RSS of each quantization process;
* scores perplexity on the same WikiText-2 windows: through vLLM (bf16 prompt
  log-probs) — stock vLLM (``VLLM_PLUGINS=none``: our plugin not loaded) for their
  checkpoints, the plugin for ours — and in float32: llm-compressor's in-memory model
  after oneshot for theirs, our simulation for ours. A checkpoint stock vLLM cannot
  serve gets its one-line error in the table and only the float32 figure;
* measures decode tokens/s in vLLM at 1 and 32 sequences (64 new tokens each, median
  of --repeats; ``vllm_quarot.eval.throughput``, as every benchmark here) for every
  checkpoint vLLM serves.

Results are cached per step under --work (delete a step's folder to redo it); the
table (Markdown) goes to stdout and benchmarks/results/peers_llmcompressor_<model>.md,
the plot to the .png beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_quarot.eval.zoo import DATA_DIR as DATA

ROOT = Path(__file__).resolve().parents[2]
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results"

# recipe -> our quantizer's options at the same scheme
RECIPES: dict[str, list[str]] = {
    "none+w4a16-g64": ["--scheme", "w4a16", "--group-size", "64", "--rotate", "none"],
    "quip+w4a16-g64": ["--scheme", "w4a16", "--group-size", "64"],
    "spinquant+w4a16-g64": ["--scheme", "w4a16", "--group-size", "64"],
    "smoothquant+w8a8": ["--scheme", "w8a8"],
    "quip+w4a8-g64": ["--scheme", "w4a8", "--group-size", "64"],
    "quip+w4a4-g64": ["--scheme", "w4a4", "--group-size", "64"],
}
DEFAULT_RECIPES = ",".join(RECIPES)
LABELS = {
    "none": "GPTQ", "quip": "QuIP (v) + GPTQ", "spinquant": "SpinQuant R1/R2/R4 + GPTQ",
    "smoothquant": "SmoothQuant + GPTQ",
}
NEW_TOKENS = 64
# Quantization and the float32 scoring run with one OpenMP thread: on this shared,
# oversubscribed 2-core machine a 2-thread GPTQ (thousands of small ops, an OpenMP
# barrier each) was measured > 50x slower than a 1-thread one (a descheduled thread
# stalls every barrier). Both tools get the same setting; vLLM keeps its own.
QUANT_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def model_dir(name: str) -> Path:
    from vllm_quarot.eval.zoo import smollm2_dir, smollm2_qwen2_keys_dir

    return smollm2_qwen2_keys_dir() if name == "smollm2-qwen2keys" else smollm2_dir()


def run_measured(cmd: list[str], logfile: Path, env: dict[str, str] | None = None,
                 ) -> tuple[int, float, float]:
    """Run cmd (output to logfile, progress lines echoed); return (exit status, wall
    seconds, peak RSS GiB of the process tree's largest process, from wait4)."""
    log("$ " + shlex.join(cmd))
    t0 = time.monotonic()
    with logfile.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - t0, ru.ru_maxrss / 2**20


def cpu_name() -> str:
    """The CPU's model name and the SIMD it offers to the kernels (results differ by ISA)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), platform.processor() or "unknown CPU")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")
           if f in flags]
    return f"{name}, {os.cpu_count()} CPUs, {'/'.join(isa) or 'no AVX2'}"


def size_mib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20


def last_error(logfile: Path) -> str:
    """The one-line reason a step failed: the root cause a vLLM worker logged when the
    engine died of it or failed to start (the last line only says "see stack trace
    above" / "see root cause above"), else the last exception line of the log."""
    import re

    lines = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines()
             if ln.strip()]
    if any("EngineDeadError" in ln or "Engine core initialization failed" in ln
           for ln in lines):
        root = [m.group(1) for ln in lines
                if (m := re.search(r"\] (\w+(?:Error|Exception): .*)$", ln))]
        if root:
            return root[0][:300]
    for ln in reversed(lines):
        if ("Error" in ln or "Exception" in ln) and not ln.startswith(("File ", "^")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


RETRY_FAILED = False  # --retry-failed: redo the steps whose cached result is a failure


def cached(res: Path) -> dict[str, Any] | None:
    """A finished step's cached result, or None to run it. A failure is cached too (a
    refusal by stock vLLM is a result of the table); after a transient one (a killed
    worker, a timed-out step, a broken environment) --retry-failed redoes them."""
    if not res.is_file():
        return None
    out = json.loads(res.read_text())
    if RETRY_FAILED and "error" in out:
        log(f"retrying {res.parent.name}/{res.name}: it failed with {out['error'][:120]}")
        return None
    return out


def make_windows(mdir: Path, out: Path, nsamples: int, calib_seqlen: int, seqlen: int,
                 max_windows: int) -> None:
    from transformers import AutoTokenizer

    from vllm_quarot.eval.perplexity import token_windows
    from vllm_quarot.offline.calibration import file_windows

    tok = AutoTokenizer.from_pretrained(mdir)
    calib = file_windows(DATA / "tinystories" / "validation_head.txt", tok, nsamples,
                         calib_seqlen, 0)
    evals = token_windows(tok, DATA / "wikitext-2-raw" / "wiki.test.raw", seqlen, max_windows)
    out.write_text(json.dumps({"calib": calib.tolist(), "eval": evals}))


def quantize_theirs(mdir: Path, recipe: str, windows: Path, d: Path,
                    seed: int | None = None) -> dict[str, Any]:
    """llm-compressor's oneshot of recipe on the windows' calibration part into d/ckpt
    (in .venv-peers; seed: of their random transforms, llmc_worker.py --seed)."""
    res = d / "result.json"
    if (done := cached(res)) is not None:
        return done
    if not PEERS_PY.is_file():
        raise SystemExit(f"{PEERS_PY} is missing: run bash scripts/peers_venv.sh first")
    d.mkdir(parents=True, exist_ok=True)
    ck = d / "ckpt"
    rc, wall, rss = run_measured(
        ["nice", "-n", "10", str(PEERS_PY), str(ROOT / "benchmarks/peers/llmc_worker.py"),
         "--model", str(mdir), "--recipe", recipe, "--windows", str(windows),
         "--out", str(ck), "--result", str(d / "worker.json"),
         *([] if seed is None else ["--seed", str(seed)])], d / "quantize.log", QUANT_ENV)
    if rc != 0:
        out = {"error": last_error(d / "quantize.log")}
    else:
        out = json.loads((d / "worker.json").read_text())
        out.update(wall_s=wall, peak_rss_gib=rss, mib=size_mib(ck))
    res.write_text(json.dumps(out, indent=1))
    return out


IMPORTED = "llm-compressor, imported"  # their checkpoint, `vllm-quarot import`ed


def import_theirs(d: Path, windows: Path, repeats: int) -> tuple[dict[str, Any],
                                                                 dict[str, Any]] | None:
    """Their checkpoint with online transforms (which stock vLLM serves on CUDA only)
    through `vllm-quarot import` and the plugin: (the import's facts, its vLLM score);
    None when it has no transforms (stock vLLM serves it)."""
    ck = d / "ckpt"
    qc = json.loads((ck / "config.json").read_text()).get("quantization_config") or {}
    if not qc.get("transform_config"):
        return None
    imp = d / "imported"
    facts = d / "import.json"
    if cached(facts) is None:
        from vllm_quarot.errors import QuaRotError
        from vllm_quarot.interop.ct_import import import_checkpoint

        t0 = time.monotonic()
        try:
            summary = import_checkpoint(ck, imp, overwrite=True).format()
            out = {"wall_s": time.monotonic() - t0, "mib": size_mib(imp), "ckpt": str(imp),
                   "summary": summary}
        except QuaRotError as e:
            out = {"error": str(e)}
        facts.write_text(json.dumps(out, indent=1))
    out = json.loads(facts.read_text())
    if "error" not in out and "sim_ppl" not in out:  # our float32 simulation of it
        from vllm_quarot.eval.perplexity import hf_perplexity, load_reference

        out["sim_ppl"] = hf_perplexity(load_reference(imp),
                                       json.loads(windows.read_text())["eval"])
        facts.write_text(json.dumps(out, indent=1))
    return out, ({} if "error" in out else score(imp, windows, d, True, repeats))


def quantize_ours(mdir: Path, recipe: str, nsamples: int, calib_seqlen: int, windows: Path,
                  d: Path, seed: int = 0) -> dict[str, Any]:
    res = d / "result.json"
    if (done := cached(res)) is not None:
        return done
    d.mkdir(parents=True, exist_ok=True)
    ck = d / "ckpt"
    opts = [*RECIPES[recipe], "--lm-head", "none", "--calib",
            str(DATA / "tinystories" / "validation_head.txt"), "--nsamples", str(nsamples),
            "--seqlen", str(calib_seqlen), "--seed", str(seed), "--device", "cpu", "--overwrite"]
    rc, wall, rss = run_measured(
        ["nice", "-n", "10", sys.executable, "-m", "vllm_quarot.cli", "quantize", str(mdir),
         str(ck), *opts], d / "quantize.log", QUANT_ENV)
    out: dict[str, Any] = {"options": opts, "ckpt": str(ck)}
    if rc != 0:
        out["error"] = last_error(d / "quantize.log")
    else:
        out.update(wall_s=wall, peak_rss_gib=rss, mib=size_mib(ck))
        # the float32 simulation on the evaluation windows
        from vllm_quarot.eval.perplexity import hf_perplexity, load_reference

        evals = json.loads(windows.read_text())["eval"]
        out["sim_ppl"] = hf_perplexity(load_reference(ck), evals)
    res.write_text(json.dumps(out, indent=1))
    return out


def score(ck: Path, windows: Path, d: Path, plugin: bool, repeats: int) -> dict[str, Any]:
    """vLLM perplexity and decode speed of ck in a subprocess (stock vLLM: plugin off)."""
    res = d / ("score.json" if plugin else "score_stock.json")
    if (done := cached(res)) is not None:
        return done
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if not plugin:
        env["VLLM_PLUGINS"] = "none"  # no plugin by that name: ours is not loaded
    logf = res.with_suffix(".log")
    rc, _, _ = run_measured(
        ["nice", "-n", "10", sys.executable, __file__, "--score", str(ck), "--windows",
         str(windows), "--score-out", str(res), "--repeats", str(repeats)], logf, env)
    if rc != 0 or not res.is_file():
        res.write_text(json.dumps({"error": last_error(logf)}))
    return json.loads(res.read_text())


def speed_rounds(entries: list[tuple[str, Path, bool]], windows: Path, work: Path,
                 rounds: int, repeats: int) -> dict[str, dict[str, float]]:
    """Decode tok/s of every served checkpoint, side by side: `rounds` round-robin
    passes over all of them (one fresh engine per checkpoint and pass, `repeats` timed
    generations each), so that the other jobs on this shared machine load every
    checkpoint alike; the median over all samples. Cached in work/speed.json."""
    cache = work / "speed.json"
    key = json.dumps([[n, str(c), p] for n, c, p in entries] + [rounds, repeats])
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())["speed"]
    samples: dict[str, dict[str, list[float]]] = {n: {"1": [], "32": []} for n, _, _ in entries}
    for r in range(rounds):
        for name, ck, plugin in entries:
            log(f"speed round {r + 1}/{rounds}: {name}")
            out = work / "speed_sample.json"
            out.unlink(missing_ok=True)
            env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
            if not plugin:
                env["VLLM_PLUGINS"] = "none"
            rc, _, _ = run_measured(
                ["nice", "-n", "10", sys.executable, __file__, "--score", str(ck),
                 "--windows", str(windows), "--score-out", str(out), "--repeats",
                 str(repeats), "--speed-only"], work / "speed_sample.log", env)
            if rc == 0 and out.is_file():
                res = json.loads(out.read_text())
                samples[name]["1"] += res["tok_s_1_all"]
                samples[name]["32"] += res["tok_s_32_all"]
    speed = {n: {k: statistics.median(v) for k, v in d.items() if v} for n, d in samples.items()}
    cache.write_text(json.dumps({"key": key, "speed": speed, "samples": samples}))
    return speed


def _score_main(ck: str, windows: str, out: str, repeats: int, speed_only: bool = False,
                ) -> int:
    """(subprocess) perplexity through vLLM, then decode tok/s at 1 and 32 sequences
    (vllm_quarot.eval.throughput: synthetic prompts, greedy, ignore_eos, warm-up)."""
    from vllm import LLM

    from vllm_quarot.eval.perplexity import eval_cpu_env, shutdown_llm, vllm_perplexity
    from vllm_quarot.eval.throughput import decode_tokens_per_s

    evals = json.loads(Path(windows).read_text())["eval"]
    seqlen = max(len(w) for w in evals)
    eval_cpu_env()  # a step of 2048-token prompts may take over vLLM's 300 s here
    llm = LLM(ck, dtype="bfloat16", enforce_eager=True, max_model_len=seqlen + 8,
              max_num_seqs=32, seed=0)
    try:
        ppl = None
        if not speed_only:
            t0 = time.monotonic()
            ppl = vllm_perplexity(llm, evals)
            log(f"vLLM perplexity {ppl:.4f} [{time.monotonic() - t0:.0f} s]")
        vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
        speed, every = {}, {}
        for n in (1, 32):
            # one sample per call (each after its own short warm-up): every sample is kept
            # for the round-robin median of speed_rounds
            runs = [decode_tokens_per_s(llm, n, NEW_TOKENS, vocab=vocab)
                    for _ in range(repeats)]
            speed[n], every[n] = statistics.median(runs), runs
            log(f"decode {n} seq: {speed[n]:.1f} tok/s (median of {repeats})")
    finally:
        shutdown_llm(llm)
    Path(out).write_text(json.dumps({"vllm_ppl": ppl, "tok_s_1": speed[1],
                                     "tok_s_32": speed[32], "tok_s_1_all": every[1],
                                     "tok_s_32_all": every[32]}))
    return 0


def baseline(mdir: Path, windows: Path, d: Path, repeats: int) -> dict[str, Any]:
    res = d / "result.json"
    d.mkdir(parents=True, exist_ok=True)
    if not res.is_file():
        from vllm_quarot.eval.perplexity import hf_perplexity, load_reference

        evals = json.loads(windows.read_text())["eval"]
        res.write_text(json.dumps({"sim_ppl": hf_perplexity(load_reference(mdir), evals),
                                   "mib": size_mib(mdir)}))
    return {**json.loads(res.read_text()), **score(mdir, windows, d, False, repeats)}


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def table(model: str, args: argparse.Namespace, base: dict[str, Any],
          rows: list[tuple[str, str, dict[str, Any], dict[str, Any]]]) -> str:
    ref = base.get("vllm_ppl")
    lines = [
        f"# vllm-quarot beside llm-compressor {args.llmc_version}: {model}",
        "",
        f"Command: `python benchmarks/peers/vs_llmcompressor.py --model {model} --recipes "
        f"{args.recipes}"
        + (f" --speed-rounds {args.speed_rounds}" if args.speed_rounds != 2 else "")
        + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
        + (" --only-cached" if args.only_cached else "") + "`  ",
        f"Machine: {platform.machine()} ({cpu_name()}; shared with other jobs); date "
        f"{datetime.date.today()}.  ",
        f"Calibration: {args.nsamples}×{args.calib_seqlen} TinyStories tokens (the same "
        f"windows for both); evaluation: WikiText-2 test, {args.max_windows}×{args.seqlen} "
        "tokens. vLLM ppl: bf16 prompt log-probs (stock vLLM for llm-compressor's "
        "checkpoints, the plugin for ours and for theirs imported with `vllm-quarot "
        "import`); float32 ppl: llm-compressor's in-memory model after oneshot / our "
        "simulation (of ours, and of theirs imported). Checkpoint MiB: llm-compressor ties the "
        "embedding and lm_head (one bf16 copy), ours stores both (--lm-head none: 16-bit). "
        "Quantization: wall time and peak RSS of the "
        "whole process (model load and save included), one OpenMP thread each. "
        "Decode: tokens/s, 64 new tokens per sequence, eager; "
        + (f"median of {args.speed_rounds} round-robin passes over all checkpoints × "
           f"{args.repeats} generations (fresh engine per pass)." if args.speed_rounds > 0
           and not args.only_cached else
           f"the scoring engine's own {args.repeats} generation(s), one checkpoint at a "
           "time beside whatever else ran: not a speed comparison (no round-robin "
           "phase: --speed-rounds 0 or --only-cached)."),
        "",
        "| recipe | tool | served by | vLLM ppl | vs bf16 | float32 ppl | quant time | "
        "peak RSS | ckpt MiB | tok/s @1 | tok/s @32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| bf16 | – | stock vLLM | {fmt(ref)} | – | {fmt(base.get('sim_ppl'))} | – | – | "
        f"{fmt(base.get('mib'), '.1f')} | {fmt(base.get('tok_s_1'), '.1f')} | "
        f"{fmt(base.get('tok_s_32'), '.1f')} |",
    ]
    notes = []
    for recipe, tool, q, s in rows:
        if "error" in q:
            lines.append(f"| {recipe} | {tool} | quantization failed | – | – | – | – | – | "
                         f"– | – | – |")
            notes.append(f"{tool} {recipe}: quantization failed: {q['error']}")
            continue
        served = {"llm-compressor": "stock vLLM", IMPORTED: "vLLM + vllm-quarot import"}.get(
            tool, "vLLM + vllm-quarot")
        if "error" in s:
            notes.append(f"{tool} {recipe}: {served} refused it: {s['error']}")
            served = f"not served ({len(notes)})"
        elif not s:
            served = "(vLLM step not run yet)"
        ppl = s.get("vllm_ppl")
        rel = f"{(ppl / ref - 1) * 100:+.1f} %" if ppl and ref else "–"
        f32 = q.get("inmemory_ppl", q.get("sim_ppl"))
        wall = q.get("wall_s")
        when = ("–" if wall is None else f"{wall / 60:.1f} min" if wall >= 60 else
                f"{wall:.0f} s") + (" (import)" if tool == IMPORTED else
                                    q.get("time_note", ""))
        rss = q.get("peak_rss_gib")
        lines.append(
            f"| {recipe} | {tool} | {served} | {fmt(ppl)} | {rel} | {fmt(f32)} | "
            f"{when} | {'–' if rss is None else f'{rss:.2f} GiB'} | {q['mib']:.1f} | "
            f"{fmt(s.get('tok_s_1'), '.1f')} | {fmt(s.get('tok_s_32'), '.1f')} |")
    if notes:
        lines += ["", *[f"({i}) {n}" for i, n in enumerate(notes, 1)]]
    return "\n".join(lines) + "\n"


def plot(path: Path, model: str, base: dict[str, Any],
         rows: list[tuple[str, str, dict[str, Any], dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r for r, *_ in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, key) in zip(axes, [("perplexity (float32; lower is better)", "ppl"),
                                       ("quantization time (min)", "time"),
                                       ("decode tok/s @32 (vLLM)", "tok32")], strict=True):
        for k, tool in enumerate(("llm-compressor", "vllm-quarot")):
            vals = []
            for r in recipes:
                q, s = next(((q, s) for rr, t, q, s in rows if rr == r and t == tool),
                            ({}, {}))
                v = {"ppl": q.get("inmemory_ppl", q.get("sim_ppl")),
                     "time": q["wall_s"] / 60 if "wall_s" in q else None,
                     "tok32": s.get("tok_s_32")}[key]
                vals.append(v or 0.0)
            xs = [i + (k - 0.5) * 0.38 for i in range(len(recipes))]
            ax.bar(xs, vals, 0.38, label=tool)
        if key == "ppl" and base.get("sim_ppl"):
            ax.axhline(base["sim_ppl"], color="k", ls="--", lw=1, label="bf16 model (fp32)")
        ax.set_xticks(range(len(recipes)), recipes, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model}: vllm-quarot vs llm-compressor (same windows); 0 = not measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ours_dir(work: Path, recipe: str) -> Path:
    return work / "ours" / " ".join(RECIPES[recipe]).replace("--", "").replace(" ", "_")


def _cached_table(a: argparse.Namespace, mdir: Path, work: Path, recipes: list[str]) -> int:
    """--only-cached: the table of what is finished, written beside the full one."""
    def read(p: Path) -> dict[str, Any] | None:
        return json.loads(p.read_text()) if p.is_file() else None

    base = {**(read(work / "bf16" / "result.json") or {}),
            **(read(work / "bf16" / "score_stock.json") or {})}
    rows = []
    for recipe in recipes:
        for tool, d, plugin in (("llm-compressor", work / "llmc" / recipe, False),
                                (IMPORTED, work / "llmc" / recipe, True),
                                ("vllm-quarot", _ours_dir(work, recipe), True)):
            q = read(d / ("import.json" if tool == IMPORTED else "result.json"))
            if tool == IMPORTED and q is None:
                continue
            if tool == "llm-compressor" and q is None and (d / "worker.json").is_file():
                # the worker finished, its parent did not record the process figures
                q = {**read(d / "worker.json"), "mib": size_mib(d / "ckpt")}
                q["wall_s"], q["time_note"] = q.get("oneshot_s"), " (oneshot)"
            if q is None and tool == "vllm-quarot" and recipe.endswith("w4a16-g64") \
                    and not recipe.startswith("none"):
                # the same quantizer options as ablate_w4a16.py's "base" variant (run
                # in-process there): its figures, marked as such
                b = read(work / "ablation" / "base.json")
                if b is not None:
                    ck = work / "ablation" / "base"
                    q = {"sim_ppl": b["sim_ppl"], "wall_s": b["quant_s"],
                         "peak_rss_gib": b["peak_rss_gib"], "mib": size_mib(ck),
                         "ckpt": str(ck)}
                    recipe_note = f"{recipe} (ablate_w4a16 base)"
                    rows.append((recipe_note, tool, q, read(d / "score.json") or {}))
                continue
            if q is None:
                continue
            s = read(d / ("score.json" if plugin else "score_stock.json")) or {}
            rows.append((recipe, tool, q, s))
    md = table(a.model, a, base, rows)
    md = md.replace("\n\n| recipe", "\n\nPartial: the steps finished so far "
                    "(--only-cached); decode speeds are single-engine medians, not the "
                    "round-robin phase.\n\n| recipe", 1)
    print(md)
    out = a.out or RESULTS / f"peers_llmcompressor_{a.model}.md"
    out.write_text(md)
    plot(out.with_suffix(".png"), a.model, base, rows)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def window_args(ap: argparse.ArgumentParser) -> None:
    """The model, calibration / evaluation windows and decode repeats (shared with
    r1_placement.py: the same windows, the same work folder)."""
    ap.add_argument("--model", choices=("smollm2", "smollm2-qwen2keys"), default="smollm2")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path,
                    default=Path.home() / ".cache" / "vllm-quarot" / "peers")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=DEFAULT_RECIPES,
                    help=f"comma-separated, from {', '.join(RECIPES)}")
    window_args(ap)
    ap.add_argument("--no-speed", action="store_true", help="skip every vLLM step")
    ap.add_argument("--only-cached", action="store_true",
                    help="run nothing: the table from the steps finished so far (a step "
                    "not run yet is left out, and the speed phase is skipped)")
    ap.add_argument("--retry-failed", action="store_true",
                    help="redo the steps whose cached result is a failure (finished steps "
                    "are cached, failures included)")
    ap.add_argument("--out", type=Path, default=None, help="Markdown file (and .png beside)")
    ap.add_argument("--score", help=argparse.SUPPRESS)
    ap.add_argument("--windows", help=argparse.SUPPRESS)
    ap.add_argument("--score-out", help=argparse.SUPPRESS)
    ap.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--speed-rounds", type=int, default=2,
                    help="round-robin passes of the decode-speed phase over all served "
                    "checkpoints (each: a fresh engine, --repeats timed generations)")
    a = ap.parse_args()
    if a.score:
        return _score_main(a.score, a.windows, a.score_out, a.repeats, a.speed_only)
    global RETRY_FAILED
    RETRY_FAILED = a.retry_failed
    import torch

    torch.set_num_threads(1)  # the in-process float32 scoring (see QUANT_ENV)
    recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise SystemExit(f"unknown recipe(s) {bad}; choose from {', '.join(RECIPES)}")
    mdir = model_dir(a.model)
    tag = f"{a.model}-c{a.nsamples}x{a.calib_seqlen}-e{a.max_windows}x{a.seqlen}"
    work = a.work / tag
    work.mkdir(parents=True, exist_ok=True)
    windows = work / "windows.json"
    if not windows.is_file():
        make_windows(mdir, windows, a.nsamples, a.calib_seqlen, a.seqlen, a.max_windows)
    a.llmc_version = "0.14"
    base = baseline(mdir, windows, work / "bf16", a.repeats) if not a.no_speed else {}
    rows = []
    if a.only_cached:
        return _cached_table(a, mdir, work, recipes)
    for i, recipe in enumerate(recipes, 1):
        log(f"recipe {i}/{len(recipes)}: {recipe}")
        theirs = quantize_theirs(mdir, recipe, windows, work / "llmc" / recipe)
        s_theirs: dict[str, Any] = {}
        if "error" not in theirs and not a.no_speed:
            s_theirs = score(work / "llmc" / recipe / "ckpt", windows, work / "llmc" / recipe,
                             False, a.repeats)
        rows.append((recipe, "llm-compressor", theirs, s_theirs))
        imported = None if "error" in theirs or a.no_speed else import_theirs(
            work / "llmc" / recipe, windows, a.repeats)
        if imported is not None:
            rows.append((recipe, IMPORTED, imported[0], imported[1]))
        ours_dir = _ours_dir(work, recipe)
        ours = quantize_ours(mdir, recipe, a.nsamples, a.calib_seqlen, windows, ours_dir)
        ours.setdefault("ckpt", str(ours_dir / "ckpt"))
        s_ours: dict[str, Any] = {}
        if "error" not in ours and not a.no_speed:
            s_ours = score(ours_dir / "ckpt", windows, ours_dir, True, a.repeats)
        rows.append((recipe, "vllm-quarot", ours, s_ours))
    if not a.no_speed and a.speed_rounds > 0:
        entries = [("bf16", mdir, False)] if "error" not in base else []
        for recipe, tool, q, sc in rows:
            if "error" in q or "error" in sc or not sc:
                continue
            theirs = tool == "llm-compressor"
            ck = (work / "llmc" / recipe / "ckpt") if theirs else Path(q["ckpt"])
            if tool == IMPORTED:
                entries.append((f"{tool}:{recipe}", ck, True))
                continue
            name = f"{tool}:{recipe}" if theirs else f"{tool}:{ck.parent.name}"
            if all(e[0] != name for e in entries):
                entries.append((name, ck, not theirs))
        speed = speed_rounds(entries, windows, work, a.speed_rounds, a.repeats)
        for d, name in [(base, "bf16")] + [
                (sc, f"{t}:{r}" if t in ("llm-compressor", IMPORTED)
                 else f"{t}:{Path(q['ckpt']).parent.name}")
                for r, t, q, sc in rows if sc and "error" not in sc and "error" not in q]:
            if name in speed:
                d["tok_s_1"], d["tok_s_32"] = speed[name].get("1"), speed[name].get("32")
    md = table(a.model, a, base, rows)
    print(md)
    out = a.out or RESULTS / f"peers_llmcompressor_{a.model}.md"
    out.write_text(md)
    plot(out.with_suffix(".png"), a.model, base, rows)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
