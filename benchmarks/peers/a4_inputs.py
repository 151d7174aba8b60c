"""Where W4A4 loses: which linear inputs' 4-bit quantization costs the perplexity, in
our checkpoint and in llm-compressor's (imported), and whether folding the RMSNorm gain
into the weights (QuaRot's fused R1) costs precision against keeping it in the
activation (QuIP's online rotation after the norm).

    .venv/bin/python benchmarks/peers/a4_inputs.py --ours OUR_W4A4 --theirs IMPORTED_W4A4

(1) For each checkpoint, the float32 simulation's perplexity on vs_llmcompressor.py's
evaluation windows with every input at 4 bits, then with one group of inputs at 8 bits
(``activation.layer_bits``, every layer): o_proj, down_proj, or q/k/v + gate/up.
(2) On the bf16 model's own calibration activations (the first 4 windows), per layer:
the relative output error of q_proj and gate_proj under the same per-token 4-bit input
quantization (absmax / 7.5) after the same random Hadamard, with the gain folded into
the weight (quantize H·x̂) and kept in the activation (quantize H·(γ ⊙ x̂)).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch

GROUPS = {"o_proj": ["self_attn.o_proj"], "down_proj": ["mlp.down_proj"],
          "q/k/v + gate/up": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                              "mlp.gate_proj", "mlp.up_proj"]}


def with_a8(ck: Path, linears: list[str], layers: int, out: Path) -> Path:
    """A view of ck (tensors linked) whose config keeps `linears` at 8-bit inputs."""
    out.mkdir(parents=True)
    for f in ck.iterdir():
        if f.name != "config.json":
            os.symlink(f.resolve(), out / f.name)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["activation"]["layer_bits"] = {
        f"model.layers.{i}.{n}": 8 for i in range(layers) for n in linears}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def a8_table(cks: dict[str, Path], evals: list[list[int]]) -> None:
    from vllm_quarot.eval.perplexity import hf_perplexity, load_reference

    print("| checkpoint | all inputs A4 | " + " | ".join(f"{g} at A8" for g in GROUPS) + " |")
    print("|---|---:|" + "---:|" * len(GROUPS))
    for who, ck in cks.items():
        layers = json.loads((ck / "config.json").read_text())["num_hidden_layers"]
        cells = [hf_perplexity(load_reference(ck), evals)]
        with tempfile.TemporaryDirectory() as tmp:
            for g, lins in GROUPS.items():
                view = with_a8(ck, lins, layers, Path(tmp) / g.replace("/", "_").replace(" ", ""))
                cells.append(hf_perplexity(load_reference(view), evals))
        print(f"| {who} | {cells[0]:.2f} | " + " | ".join(
            f"{c:.2f} ({c - cells[0]:+.2f})" for c in cells[1:]) + " |", flush=True)


def q4(a: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' dynamic per-token int4 (absmax / 7.5), as the import serves it."""
    from vllm_quarot.interop.ct_import import ct_activation_clip
    from vllm_quarot.quant import fake_quantize_per_token

    return fake_quantize_per_token(a, 4, ct_activation_clip(4))


@torch.no_grad()
def gain_fold(model_dir: Path, calib: list[list[int]]) -> None:
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    d = m.config.hidden_size
    h = random_hadamard_matrix(d, torch.float64, gen=torch.Generator().manual_seed(0))
    h = (h / math.sqrt(d)).float()
    acts: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(m.model.layers):
        for part, lin in (("attention (q_proj)", layer.self_attn.q_proj),
                          ("MLP (gate_proj)", layer.mlp.gate_proj)):
            hooks.append(lin.register_forward_pre_hook(
                lambda _m, a, key=(i, part): acts.__setitem__(key, a[0].reshape(-1, d))))
    m(torch.tensor(calib))
    for hk in hooks:
        hk.remove()
    print("\n| input | rel. output error, gain folded (ours) | gain kept (QuIP) | ratio, "
          "mean [min, max] over layers |")
    print("|---|---:|---:|---:|")
    for part in ("attention (q_proj)", "MLP (gate_proj)"):
        folded, kept, ratio = [], [], []
        for i, layer in enumerate(m.model.layers):
            norm, lin = ((layer.input_layernorm, layer.self_attn.q_proj)
                         if part.startswith("attention")
                         else (layer.post_attention_layernorm, layer.mlp.gate_proj))
            g, w, a = norm.weight, lin.weight, acts[(i, part)]
            ref = a @ w.T
            e_f = ((q4((a / g) @ h.T) @ h) @ (w * g).T - ref).norm() / ref.norm()
            e_k = ((q4(a @ h.T) @ h) @ w.T - ref).norm() / ref.norm()
            folded.append(e_f.item())
            kept.append(e_k.item())
            ratio.append(e_f.item() / e_k.item())
        n = len(ratio)
        print(f"| {part} | {sum(folded) / n:.4f} | {sum(kept) / n:.4f} | "
              f"{sum(ratio) / n:.2f} [{min(ratio):.2f}, {max(ratio):.2f}] |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", type=Path, required=True, help="our W4A4 checkpoint")
    ap.add_argument("--theirs", type=Path, required=True,
                    help="llm-compressor's W4A4 checkpoint, imported (vllm-quarot import)")
    ap.add_argument("--windows", type=Path, default=Path.home() / ".cache" / "vllm-quarot" /
                    "peers" / "smollm2-c32x512-e8x2048" / "windows.json",
                    help="vs_llmcompressor.py's windows (calibration and evaluation)")
    ap.add_argument("--model", type=Path, default=None,
                    help="the 16-bit model (default: SmolLM2-135M-Instruct)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from vllm_quarot.eval.zoo import smollm2_dir

    w = json.loads(a.windows.read_text())
    print(f"# W4A4: where the 4-bit inputs cost (SmolLM2, {datetime.date.today()})\n\n"
          f"Command: `python benchmarks/peers/a4_inputs.py {shlex.join(sys.argv[1:])}`; "
          "float32 simulation, WikiText-2 8×2048 evaluation windows of "
          "vs_llmcompressor.py (perplexity; in brackets: the change from all inputs at "
          "4 bits).\n", flush=True)
    a8_table({"vllm-quarot": a.ours, "llm-compressor (imported)": a.theirs}, w["eval"])
    gain_fold(a.model or smollm2_dir(), w["calib"][:4])


if __name__ == "__main__":
    main()
