"""Which projections dominate a W4A4 checkpoint's loss? Perplexity of the simulation
with the activations of some projections kept at 8 or 16 bits, and with other
activation clip ratios — no re-quantization needed (weights stay as they are).

    .venv/bin/python benchmarks/act_ablation.py CKPT [--windows 4 --seqlen 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))

VARIANTS: dict[str, dict[str, int | None]] = {
    "as quantized": {},
    "16-bit activations everywhere": {"proj": None},
    "8-bit activations everywhere": {"proj": 8},
    "8-bit at down_proj": {"down_proj": 8},
    "8-bit at o_proj": {"o_proj": 8},
    "8-bit at q/k/v_proj": {"q_proj": 8, "k_proj": 8, "v_proj": 8},
    "8-bit at gate/up_proj": {"gate_proj": 8, "up_proj": 8},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--clips", default="0.8,0.85,0.95,1.0")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_quarot.eval.perplexity import hf_perplexity, token_windows
    from vllm_quarot.eval.simulate import load_simulated

    ckpt = Path(a.ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    w = token_windows(tok, DATA / "wikitext-2-raw" / "wiki.test.raw", a.seqlen, a.windows)
    print(f"simulation perplexity, {len(w)}×{a.seqlen} WikiText-2 tokens, {ckpt.name}")
    for name, override in VARIANTS.items():
        ppl = hf_perplexity(load_simulated(ckpt, act_bits_override=override), w)
        print(f"  {name:34} {ppl:9.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp)
        for f in ckpt.iterdir():
            if f.name != "config.json":
                (view / f.name).symlink_to(f)
        cfg = json.loads((ckpt / "config.json").read_text())
        for clip in [float(c) for c in a.clips.split(",")]:
            cfg["quantization_config"]["activation"]["clip_ratio"] = clip
            (view / "config.json").write_text(json.dumps(cfg))
            ppl = hf_perplexity(load_simulated(view), w)
            print(f"  activation clip ratio {clip:<12} {ppl:9.3f}", flush=True)


if __name__ == "__main__":
    main()
