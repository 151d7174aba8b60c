"""llm-compressor's side of benchmarks/peers/vs_llmcompressor.py: runs in .venv-peers
(scripts/peers_venv.sh), never in the main venv (llm-compressor pins its own
transformers and compressed-tensors).

    .venv-peers/bin/python benchmarks/peers/llmc_worker.py --model DIR --recipe NAME \
        --windows WINDOWS.json --out CKPT_DIR --result RESULT.json

WINDOWS.json holds {"calib": [[ids...], ...], "eval": [[ids...], ...]}: the very token
windows the orchestrator gives our quantizer and vLLM. The worker runs ``oneshot`` on
the calibration windows (float32 model on the CPU), scores the evaluation windows with
llm-compressor's in-memory model (float32 fake quantization, online transforms as
hooks: what llm-compressor itself evaluates after oneshot), saves the compressed
checkpoint and writes RESULT.json (oneshot seconds, in-memory perplexity, recipe text).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

GROUP = 64  # the W4 recipes' group size (ours: --group-size 64)


def _w4(act_bits: int | None, group: int = GROUP) -> dict[str, Any]:
    """A compressed-tensors config group: symmetric INT4 weights per group of `group`
    inputs (min-max observer, llm-compressor's default) and, with act_bits, dynamic
    symmetric per-token INT activations."""
    scheme: dict[str, Any] = {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": group, "dynamic": False},
    }
    if act_bits is not None:
        scheme["input_activations"] = {"num_bits": act_bits, "type": "int",
                                       "symmetric": True, "strategy": "token",
                                       "dynamic": True}
    return {"group_0": scheme}


def build_recipe(name: str) -> list[Any]:
    """The modifiers of each recipe (llm-compressor's defaults where not named:
    GPTQ block 128, dampening 0.01, actorder static; lm_head left in 16 bits)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    try:
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    except ImportError:  # older layout
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    ignore = ["lm_head"]
    rot, _, scheme = name.partition("+")
    mods: list[Any] = []
    if rot == "quip":
        mods.append(QuIPModifier(rotations=["v"], transform_type="random-hadamard",
                                 targets="Linear", ignore=ignore))
    elif rot == "spinquant":
        # R1/R2/R4 (no learning): random Hadamards, the only type that builds the
        # non-power-of-two sizes (576, 1536) of SmolLM2
        mods.append(SpinQuantModifier(rotations=["R1", "R2", "R4"],
                                      transform_type="random-hadamard"))
    elif rot == "smoothquant":
        mods.append(SmoothQuantModifier(smoothing_strength=0.8))
    elif rot != "none":
        raise SystemExit(f"unknown rotation {rot!r} in recipe {name!r}")
    if scheme == "w4a16-g64":
        groups = _w4(None)
    elif scheme == "w4a8-g64":
        groups = _w4(8)
    elif scheme == "w4a4-g64":
        groups = _w4(4)
    elif scheme == "w8a8":
        groups = None
    else:
        raise SystemExit(f"unknown scheme {scheme!r} in recipe {name!r}")
    if groups is None:
        mods.append(GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore))
    else:
        mods.append(GPTQModifier(config_groups=groups, ignore=ignore))
    return mods


def seed_transforms(seed: int) -> None:
    """Every transform factory that compressed-tensors builds without a seed (QuIP's and
    SpinQuant's, as llm-compressor builds them) draws from a generator seeded with
    `seed` instead of torch's default seed."""
    from compressed_tensors.transform.factory.base import TransformFactory

    init = TransformFactory.__init__

    def seeded_init(self: Any, name: str, scheme: Any, seed_: int | None = None) -> None:
        init(self, name, scheme, seed if seed_ is None else seed_)

    TransformFactory.__init__ = seeded_init


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) over the windows, first token of each unscored (the
    orchestrator's vLLM and simulation scoring do the same)."""
    nll, count = 0.0, 0
    for i, w in enumerate(windows):
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])
        nll -= lp.sum().item()
        count += len(w) - 1
        print(f"[llmc_worker] in-memory perplexity: window {i + 1}/{len(windows)}",
              file=sys.stderr, flush=True)
    return math.exp(nll / count)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipe", required=True, help="ROTATION+SCHEME, e.g. quip+w4a16-g64")
    ap.add_argument("--windows", required=True)
    ap.add_argument("--out", required=True, help="where the compressed checkpoint goes")
    ap.add_argument("--result", required=True)
    ap.add_argument("--no-eval", action="store_true", help="skip the in-memory perplexity")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the transforms' random draws (default: compressed-tensors' "
                    "own, an unseeded torch.Generator, i.e. torch's default seed)")
    a = ap.parse_args()
    if a.seed is not None:
        seed_transforms(a.seed)

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    win = json.loads(Path(a.windows).read_text())
    calib, evals = win["calib"], win["eval"]
    seqlen = max(len(w) for w in calib)
    ds = Dataset.from_dict({"input_ids": calib,
                            "attention_mask": [[1] * len(w) for w in calib]})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    recipe = build_recipe(a.recipe)
    t0 = time.monotonic()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=seqlen, pipeline="sequential", tokenizer=tok)
    seconds = time.monotonic() - t0
    print(f"[llmc_worker] oneshot {a.recipe}: {seconds:.1f} s", file=sys.stderr, flush=True)
    ppl = None if a.no_eval else perplexity(model.eval(), evals)
    if ppl is not None:
        print(f"[llmc_worker] in-memory perplexity (float32): {ppl:.4f}", file=sys.stderr)
    # saved in bf16, as our checkpoints and as vLLM serves both (scales and 16-bit
    # tensors cast; the codes are unchanged)
    model.to(torch.bfloat16)
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    Path(a.result).write_text(json.dumps({
        "recipe": a.recipe, "oneshot_s": seconds, "inmemory_ppl": ppl,
        "modifiers": [repr(m) for m in recipe],
        "llmcompressor": llmcompressor.__version__,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
