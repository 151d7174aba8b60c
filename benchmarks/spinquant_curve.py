"""Does learning R1/R2 help beyond the windows it sees? The held-out loss of SpinQuant's
training model (fake-quantized as the quantizer will make it) along the training.

    .venv/bin/python benchmarks/spinquant_curve.py --steps 40 --eval-every 10
    .venv/bin/python benchmarks/spinquant_curve.py --weights rtn --batch 4 --lr 0.5

The calibration text (default: WikiText-2 test after twice the accuracy benchmark's
evaluated span, as `accuracy.py --calib wikitext-heldout`) is tokenized once; its last
EVAL_WINDOWS×SEQLEN tokens are the held-out windows, training windows are drawn at
seeded random offsets from the rest. Prints the held-out cross-entropy before
training, every --eval-every steps and at the end, and the time per step; writes
benchmarks/results/spinquant_curve_<name>.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 or a local HF directory")
    ap.add_argument("--calib", type=Path, default=None,
                    help="calibration text (default: WikiText-2 test after 32768 tokens)")
    ap.add_argument("--scheme", default="w4a4kv4")
    ap.add_argument("--weights", choices=("float", "rtn"), default="float",
                    help="weights in the loop: 16-bit (before GPTQ) or RTN")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1.5)
    ap.add_argument("--batch", type=int, default=1, help="windows per step")
    ap.add_argument("--loss", choices=("ce", "kl"), default="ce",
                    help="training loss: cross-entropy (SpinQuant) or KL to the original")
    ap.add_argument("--momentum", type=float, default=0.0,
                    help="Cayley SGD momentum (SpinQuant: 0)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overfit", action="store_true",
                    help="train on the held-out windows themselves, all of them every step "
                    "(a check that the optimiser can lower the loss it is given)")
    ap.add_argument("--references", action="store_true",
                    help="also the held-out cross-entropy of the untrained rotation with "
                    "nothing quantized, activations only and KV cache only (what is at stake)")
    ap.add_argument("--name", default=None, help="results file suffix")
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from vllm_quarot.offline.options import QuantizeOptions
    from vllm_quarot.offline.spinquant import learn_rotations

    if a.model == "smollm2":
        from vllm_quarot.eval.zoo import smollm2_dir

        model = smollm2_dir()
    else:
        model = Path(a.model)
    tok = AutoTokenizer.from_pretrained(model)
    if a.calib is None:
        from accuracy import _heldout

        from vllm_quarot.eval.zoo import default_cache_dir

        text = DATA / "wikitext-2-raw" / "wiki.test.raw"
        a.calib = _heldout(tok, text, 8 * 2048, default_cache_dir() / "accuracy-smollm2")
    ids = tok(a.calib.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    n_eval = a.eval_windows * a.seqlen
    eval_ids = ids[-n_eval:].reshape(a.eval_windows, a.seqlen)
    train = ids[:-n_eval]
    g = torch.Generator().manual_seed(a.seed)
    starts = torch.randint(0, train.numel() - a.seqlen, (a.steps * a.batch,), generator=g)
    calib_ids = (torch.stack([train[s : s + a.seqlen] for s in starts.tolist()])
                 if a.steps else eval_ids)
    if a.overfit:
        calib_ids, a.batch = eval_ids, a.eval_windows

    o = QuantizeOptions(scheme=a.scheme)
    w_bits, a_bits, kv_bits = o.bits
    t0 = time.time()
    rot = learn_rotations(
        model, calib_ids, w_bits=w_bits if a.weights == "rtn" else 16, a_bits=a_bits,
        kv_bits=kv_bits, act_clip=o.activation_clip, kv_clip=o.kv_clip, seed=a.seed,
        steps=a.steps, lr=a.lr, batch=a.batch,
        eval_ids=eval_ids, eval_every=a.eval_every, momentum=a.momentum, loss=a.loss)
    secs = time.time() - t0
    name = a.name or (f"{a.weights}_lr{a.lr:g}_b{a.batch}_s{a.steps}"
                      + (f"_m{a.momentum:g}" if a.momentum else "")
                      + (f"_{a.loss}" if a.loss != "ce" else "")
                      + ("_overfit" if a.overfit else ""))
    lines = [
        f"SpinQuant training curve, {Path(model).name}, {a.scheme}, weights in the loop: "
        f"{a.weights}; {a.steps} steps × {a.batch}×{a.seqlen} tokens, lr {a.lr:g} (cosine), "
        f"momentum {a.momentum:g}, loss {a.loss}, "
        f"seed {a.seed}; held-out: the last {a.eval_windows}×{a.seqlen} tokens of "
        f"`{a.calib.name}`{' (also the training windows: --overfit)' if a.overfit else ''}; "
        f"{secs:.0f} s ({secs / max(a.steps, 1):.1f} s/step incl. "
        f"evaluations, torch threads {torch.get_num_threads()}).",
        "",
        "Command: `" + " ".join([".venv/bin/python", "benchmarks/spinquant_curve.py",
                                 *sys.argv[1:]]) + "`",
        "",
        "| step | held-out cross-entropy | Δ vs step 0 | mean training loss since the last row | "
        "R1 step α (mean) | α·‖W‖₁ (mean; 1 = capped) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    prev = 0
    for step, loss in rot.heldout:
        seen = rot.losses[prev:step]
        mean = f"{sum(seen) / len(seen):.4f}" if seen else ""
        st = rot.r1_steps[prev:step]
        alpha = f"{sum(s[0] for s in st) / len(st):.3g}" if st else ""
        rot_norm = f"{sum(s[1] for s in st) / len(st):.3f}" if st else ""
        lines.append(f"| {step} | {loss:.4f} | {loss - rot.heldout[0][1]:+.4f} | {mean} | "
                     f"{alpha} | {rot_norm} |")
        prev = step
    if a.references:
        lines += ["", "Held-out cross-entropy of the untrained (randomized Hadamard) rotation, "
                  "by what is quantized:", "", "| quantized | held-out cross-entropy |",
                  "|---|---:|"]
        for label, quantized in (("nothing", (None, None)),
                                 (f"activations {a_bits}-bit", (a_bits, None)),
                                 (f"KV cache {kv_bits}-bit", (None, kv_bits))):
            ref = learn_rotations(model, eval_ids, w_bits=16, a_bits=quantized[0],
                                  kv_bits=quantized[1], act_clip=o.activation_clip,
                                  kv_clip=o.kv_clip, seed=a.seed, steps=0, eval_ids=eval_ids,
                                  progress=False)
            lines.append(f"| {label} | {ref.heldout[0][1]:.4f} |")
        # the trained model itself, before its first step
        weights = " (weights 16-bit)" if a.weights == "float" else ""
        lines.append(f"| {a.scheme.upper()}{weights} | {rot.heldout[0][1]:.4f} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results" / f"spinquant_curve_{name}.md"
    out.write_text(table + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
