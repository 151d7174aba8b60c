"""What buys llm-compressor's QuIP + GPTQ W4A16 g64 advantage? Ablations of our
quantizer at W4A16 g64 on SmolLM2 (or the Qwen2-class surrogate, ``--model
smollm2-qwen2keys``), on the peer benchmark's very windows (run
benchmarks/peers/vs_llmcompressor.py first: it writes WINDOWS.json), scored in float32
(our simulation: the number llm-compressor's in-memory model is compared with).

    .venv/bin/python benchmarks/peers/ablate_w4a16.py --variants base,oproj-online

Variants (every one with --lm-head none, as llm-compressor's ignore=["lm_head"]):

* ``base``: QuaRot (R1/R2 fused, online R4), GPTQ defaults (act-order, static groups,
  weight clip search, damp 0.01, sequential inside each layer);
* ``no-r4``: ``--no-online-hadamard`` (R1/R2 only: what W4A16 was before online R4
  was made its default);
* ``no-clip`` / ``no-act-order`` / ``damp-0.1``: one GPTQ default changed;
* ``oproj-online`` (prototype, not a checkpoint format): an extra online Hadamard of
  size heads·head_dim on o_proj's input (its inverse fused into o_proj's columns), as
  QuIP's input rotation of o_proj mixes all heads where our R2 mixes within a head.
  The quantizer's calibration passes and the simulation apply it through hooks.
* ``rotate-none``: plain GPTQ (no rotation); ``rotate-none-no-clip`` /
  ``rotate-none-no-act-order``: with one GPTQ default changed (llm-compressor's plain
  GPTQ uses min-max scales: no clip search);
* ``base-sN`` / ``no-act-order-sN``: base and no-act-order with ``--seed N`` (other R1
  signs and calibration windows), to pair the act-order comparison over seeds;
* ``dyn-groups[-sN]``: ``--no-act-order --dynamic-groups`` (GPTQ's original group
  scales, from the updated weights);
* ``llmc-quip-sN``: llm-compressor's QuIP (v) + GPTQ W4A16 g64 (the peer benchmark's
  recipe, in .venv-peers) with its random Hadamards drawn from seed N and the
  calibration windows our ``--seed N`` draws (paired with ``base-sN``); its in-memory
  float32 perplexity, as the peer benchmark reports it.

Prints a Markdown table (and writes benchmarks/results/peers_ablation_w4a16_<model>.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_quarot.eval.zoo import DATA_DIR as DATA

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

BASE = {"scheme": "w4a16", "group_size": 64, "lm_head": "none", "nsamples": 32,
        "seqlen": 512, "device": "cpu", "overwrite": True}
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    # name: (quantizer options over BASE, o_proj online Hadamard prototype)
    "base": ({}, False),
    "no-r4": ({"online_hadamard": False}, False),
    "no-clip": ({"w_clip": False}, False),
    "no-act-order": ({"act_order": False}, False),
    "damp-0.1": ({"damp": 0.1}, False),
    "oproj-online": ({}, True),
    "rotate-none": ({"rotate": "none"}, False),
    "rotate-none-no-clip": ({"rotate": "none", "w_clip": False}, False),
    "rotate-none-no-act-order": ({"rotate": "none", "act_order": False}, False),
    # GPTQ's original group scales: from the weights as updated when the loop reaches
    # the group (natural column order)
    "dyn-groups": ({"act_order": False, "dynamic_groups": True}, False),
}
# the act-order and group-scale questions on other R1 signs and calibration draws
# (--seed N), paired with base
for _s in range(1, 5):
    for _name in ("base", "no-act-order", "dyn-groups"):
        VARIANTS[f"{_name}-s{_s}"] = ({**VARIANTS[_name][0], "seed": _s}, False)
LLMC_SEEDS = {f"llmc-quip-s{_s}": _s for _s in range(1, 5)}  # llm-compressor's side


def run_llmc(name: str, model_dir: Path, windows: Path, work: Path) -> dict[str, Any]:
    """llm-compressor QuIP + GPTQ W4A16 g64 with seed N (transforms and calibration draw),
    through the peer benchmark's own step (vs_llmcompressor.quantize_theirs)."""
    from transformers import AutoTokenizer
    from vs_llmcompressor import quantize_theirs

    from vllm_quarot.offline.calibration import file_windows

    seed = LLMC_SEEDS[name]
    calib = file_windows(DATA / "tinystories" / "validation_head.txt",
                         AutoTokenizer.from_pretrained(model_dir), BASE["nsamples"],
                         BASE["seqlen"], seed)
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    own = d / "windows.json"
    own.write_text(json.dumps({"calib": calib.tolist(),
                               "eval": json.loads(windows.read_text())["eval"]}))
    q = quantize_theirs(model_dir, "quip+w4a16-g64", own, d, seed=seed)
    if "error" in q:
        raise SystemExit(f"{name}: {q['error']}")
    return {"variant": name, "sim_ppl": q["inmemory_ppl"], "quant_s": q["oneshot_s"],
            "inmemory": True}


def install_oproj_online() -> None:
    """Prototype: fold a Hadamard of size heads·head_dim into o_proj's input columns and
    apply it online in the quantizer's calibration passes (monkey-patched: measured
    here before any format or runtime work)."""
    import torch

    from vllm_quarot.hadamard import hadamard_transform
    from vllm_quarot.models import O_PROJ
    from vllm_quarot.offline import quantize as q

    rotate_layer = q.rotate_layer

    def rotate_with_oproj(sd: dict[str, torch.Tensor], *args: Any, **kw: Any) -> None:
        rotate_layer(sd, *args, **kw)
        sd[f"{O_PROJ}.weight"] = hadamard_transform(sd[f"{O_PROJ}.weight"])

    q.rotate_layer = rotate_with_oproj

    class OprojRunner(q.LayerRunner):
        def __init__(self, kind: Any, idx: int, sd: dict[str, torch.Tensor], r4: Any,
                     original: bool = False, **kw: Any):
            super().__init__(kind, idx, sd, r4, original=original, **kw)
            if original or r4 is None:  # only the rotated layer
                return
            attn = self.module.get_submodule(O_PROJ.rpartition(".")[0])
            inside = [False]  # the transform belongs to attention's own call of o_proj;
            # the sequential pass also calls o_proj on kept (already transformed) inputs
            attn.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
            attn.register_forward_hook(lambda *_: inside.__setitem__(0, False))
            self.module.get_submodule(O_PROJ).register_forward_pre_hook(
                lambda _m, a: (hadamard_transform(a[0]),) if inside[0] else None)

    q.LayerRunner = OprojRunner


def oproj_sim_hooks(model: Any) -> None:
    from vllm_quarot.hadamard import hadamard_transform
    from vllm_quarot.models import O_PROJ

    for layer in model.model.layers:
        layer.get_submodule(O_PROJ).register_forward_pre_hook(
            lambda _m, a: (hadamard_transform(a[0].float()).to(a[0].dtype),), prepend=True)


def run_variant(name: str, model_dir: Path, windows: Path, work: Path) -> dict[str, Any]:
    import resource

    from vllm_quarot.eval.perplexity import hf_perplexity
    from vllm_quarot.eval.simulate import load_simulated
    from vllm_quarot.offline.options import QuantizeOptions
    from vllm_quarot.offline.quantize import quantize

    if name in LLMC_SEEDS:
        return run_llmc(name, model_dir, windows, work)
    opts, oproj = VARIANTS[name]
    if oproj:
        install_oproj_online()
    o = QuantizeOptions(**{**BASE, **opts},
                        calib=str(DATA / "tinystories" / "validation_head.txt"))
    out = work / name
    t0 = time.monotonic()
    quantize(model_dir, out, o)
    seconds = time.monotonic() - t0
    model = load_simulated(out)
    if oproj:
        oproj_sim_hooks(model)
    ppl = hf_perplexity(model, json.loads(windows.read_text())["eval"])
    return {"variant": name, "sim_ppl": ppl, "quant_s": seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {', '.join([*VARIANTS, *LLMC_SEEDS])}")
    ap.add_argument("--model", choices=("smollm2", "smollm2-qwen2keys"), default="smollm2")
    ap.add_argument("--work", type=Path, default=None,
                    help="the peer benchmark's work folder of --model (default: its own)")
    ap.add_argument("--out", type=Path, default=None,
                    help="Markdown file (default: benchmarks/results/"
                    "peers_ablation_w4a16_<model>.md)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_llmcompressor import model_dir

    if a.work is None:
        a.work = Path.home() / ".cache" / "vllm-quarot" / "peers" / f"{a.model}-c32x512-e8x2048"
    windows = a.work / "windows.json"
    if not windows.is_file():
        raise SystemExit(f"{windows} is missing: run benchmarks/peers/vs_llmcompressor.py "
                         f"--model {a.model} first (it draws the shared windows)")
    abl = a.work / "ablation"
    abl.mkdir(parents=True, exist_ok=True)
    if a.one:
        res = run_variant(a.one, model_dir(a.model), windows, abl)
        (abl / f"{a.one}.json").write_text(json.dumps(res))
        return 0
    rows = []
    for v in a.variants.split(","):
        res_file = abl / f"{v}.json"
        if not res_file.is_file():
            print(f"[ablate] variant {v}", file=sys.stderr, flush=True)
            # one OpenMP thread: see vs_llmcompressor.QUANT_ENV
            subprocess.run(["nice", "-n", "10", sys.executable, __file__, "--one", v,
                            "--model", a.model, "--work", str(a.work)], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        rows.append(json.loads(res_file.read_text()))
    lines = [
        f"# W4A16 g64 on {a.model}: ablations of vllm-quarot's quantizer",
        "",
        f"Command: `python benchmarks/peers/ablate_w4a16.py --model {a.model} --variants "
        f"{a.variants}{' --out ' + str(a.out) if a.out else ''}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared); date "
        f"{datetime.date.today()}. Same calibration (TinyStories 32×512) and evaluation "
        "(WikiText-2 test 8×2048) windows as benchmarks/peers/vs_llmcompressor.py; perplexity "
        "of our float32 simulation; lm_head 16-bit.",
        "",
        "| variant | float32 ppl | quantize s |",
        "|---|---:|---:|",
    ]
    for r in rows:
        inmem = r.get("inmemory")  # llm-compressor's own in-memory model
        lines.append(f"| {r['variant']}{', in-memory' if inmem else ''} | {r['sim_ppl']:.2f} "
                     f"| {r['quant_s']:.0f}{' (oneshot)' if inmem else ''} |")
    # the peer's figures on the same windows, when the benchmark has them
    for recipe, label in (("none+w4a16-g64", "GPTQ"), ("quip+w4a16-g64", "QuIP (v) + GPTQ")):
        theirs = a.work / "llmc" / recipe / "result.json"
        if not theirs.is_file():  # the worker's own record (its parent did not finish)
            theirs = theirs.with_name("worker.json")
        t = json.loads(theirs.read_text()) if theirs.is_file() else {}
        if t.get("inmemory_ppl"):
            lines.append(f"| llm-compressor {label}, in-memory | "
                         f"{t['inmemory_ppl']:.2f} | {t['oneshot_s']:.0f} (oneshot) |")
    md = "\n".join(lines) + "\n"
    print(md)
    (a.out or RESULTS / f"peers_ablation_w4a16_{a.model}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
