"""Issue #29 ablation (where does llm-compressor QuIP's W4A16 lead come from?), simulated
perplexity: per-head R2 only vs an extra full online Hadamard (576) on o_proj's
input, for W4A4 (RTN per channel, 4-bit per-token activations, clip 0.9) and W4A16 g64 RTN.

The rotated float model is built in memory from the HF checkpoint with
vllm_quarot.offline.rotation (fold_norms, rotate_layer with R1 signs, R2 per head, R4 on
down_proj; embedding and untied lm_head rotated, final norm gain folded into lm_head).
Online R4 before down_proj is installed with vllm_quarot.transforms in every variant.
KV cache 16-bit, lm_head and embedding 16-bit (float32) in every variant.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

torch.set_num_threads(1)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from vllm_quarot.eval.perplexity import hf_perplexity, token_windows  # noqa: E402
from vllm_quarot.eval.zoo import DATA_DIR, smollm2_dir  # noqa: E402
from vllm_quarot.format import OnlineHadamard  # noqa: E402
from vllm_quarot.hadamard import hadamard_transform, random_signs  # noqa: E402
from vllm_quarot.offline.rotation import LINEARS, fold_norms, rotate_layer, rotate_rows_in  # noqa: E402
from vllm_quarot.quant import (  # noqa: E402
    dequantize_weight,
    fake_quantize_per_token,
    quantize_weight_rtn,
)
from vllm_quarot.transforms import LinearInputSpec, install_linear_inputs  # noqa: E402

MODEL = str(smollm2_dir())
WIKI = str(DATA_DIR / "wikitext-2-raw" / "wiki.test.raw")


def rotated_state(model, seed: int) -> dict[str, torch.Tensor]:
    """float64 state dict of the R1/R2/R4-rotated, norm-folded, untied model."""
    cfg = model.config
    sd = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    signs = random_signs(cfg.hidden_size, seed)
    hd = cfg.head_dim
    out = {}
    embed = sd["model.embed_tokens.weight"]
    out["model.embed_tokens.weight"] = rotate_rows_in(embed, signs)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        lsd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        fold_norms(lsd)
        rotate_layer(lsd, signs, hd, True, True)
        out.update({p + k: v for k, v in lsd.items()})
    g = sd["model.norm.weight"]
    head = sd.get("lm_head.weight", embed)
    out["lm_head.weight"] = rotate_rows_in(head * g, signs)
    out["model.norm.weight"] = torch.ones_like(g)
    return out


def linear_names(cfg) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in LINEARS]


def variant_state(rot: dict[str, torch.Tensor], cfg, oproj_full: bool, wbits: int | None,
                  group: int) -> dict[str, torch.Tensor]:
    st = dict(rot)
    for name in linear_names(cfg):
        w = rot[name + ".weight"]
        if oproj_full and name.endswith("o_proj"):
            w = hadamard_transform(w)  # W_o @ M (M the normalised Hadamard of 576)
        if wbits is not None and name.endswith(ONLY):
            q, s = quantize_weight_rtn(w, wbits, group, clip_search=CLIP_SEARCH)
            w = dequantize_weight(q, s, group, torch.float64)
        st[name + ".weight"] = w
    return {k: v.float() for k, v in st.items()}


def install(model, cfg, abits: int | None, oproj_full: bool, clip: float = 0.9):
    r4 = OnlineHadamard(size=cfg.intermediate_size)
    specs = {n: LinearInputSpec(r4=r4 if n.endswith("down_proj") else None,
                                bits=abits if n.endswith(ONLY) else None,
                                clip=clip) for n in linear_names(cfg)}
    handles = []
    if oproj_full:
        # online full Hadamard on o_proj's input, *before* its activation quantization
        for n in linear_names(cfg):
            if n.endswith("o_proj"):
                spec = specs.pop(n)
                mod = model.get_submodule(n)

                def hook(_m, args, spec=spec):
                    x = hadamard_transform(args[0].float()).to(args[0].dtype)
                    if spec.bits is not None:
                        x = fake_quantize_per_token(x, spec.bits, spec.clip)
                    return (x,)

                handles.append(mod.register_forward_pre_hook(hook))
    handles += install_linear_inputs(model, specs)
    return handles


VARIANTS = {
    # name: (oproj_full, wbits, group, abits)
    "float_a": (False, None, -1, None),
    "float_b": (True, None, -1, None),
    "w4a4_a": (False, 4, -1, 4),
    "w4a4_b": (True, 4, -1, 4),
    "w4a16g64_a": (False, 4, 64, None),
    "w4a16g64_b": (True, 4, 64, None),
    # decomposition (not in the default list): activations only, per-channel W4A16
    "w16a4_a": (False, None, -1, 4),
    "w16a4_b": (True, None, -1, 4),
    "w4a16_a": (False, 4, -1, None),
    "w4a16_b": (True, 4, -1, None),
}
DEFAULT = ["float_a", "float_b", "w4a4_a", "w4a4_b", "w4a16g64_a", "w4a16g64_b"]
CLIP_SEARCH = True
ONLY = ""  # quantize (weights and activations) only the linears whose name ends so


def main():
    global CLIP_SEARCH, ONLY
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--variants", default=",".join(DEFAULT))
    ap.add_argument("--orig", action="store_true", help="also the unrotated model")
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--no-clip-search", action="store_true")
    ap.add_argument("--only", default="", help="e.g. o_proj: quantize only these linears")
    ap.add_argument("--out", default="oproj_hadamard.jsonl", help="JSON lines, appended")
    a = ap.parse_args()
    CLIP_SEARCH = not a.no_clip_search
    ONLY = a.only
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    model.config.tie_word_embeddings = False
    cfg = model.config
    windows = token_windows(tok, WIKI, a.seqlen, a.windows)

    def log(rec):
        rec.update(seed=a.seed, windows=len(windows), seqlen=a.seqlen, clip_search=CLIP_SEARCH,
                   only=ONLY or "all")
        print(json.dumps(rec), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if a.orig:
        t = time.time()
        ppl = hf_perplexity(model, windows)
        log(dict(variant="orig_float32", ppl=ppl, secs=round(time.time() - t, 1)))
    ids = torch.tensor([windows[0][:256]])
    ref = None
    if a.verify:
        with torch.no_grad():
            ref = model(ids).logits.double()
    t = time.time()
    rot = rotated_state(model, a.seed)
    # untie: give lm_head its own parameter
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    print(f"rotated in {time.time() - t:.1f}s", flush=True)
    for v in a.variants.split(","):
        oproj_full, wbits, group, abits = VARIANTS[v]
        t = time.time()
        st = variant_state(rot, cfg, oproj_full, wbits, group)
        model.load_state_dict(st, strict=True)
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        handles = install(model, cfg, abits, oproj_full)
        tq = time.time() - t
        if ref is not None and wbits is None:
            with torch.no_grad():
                out = model(ids).logits.double()
            d = (out - ref).abs().max().item()
            print(f"verify {v}: max |logit diff| vs original = {d:.3e} "
                  f"(logit scale {ref.abs().max().item():.1f})", flush=True)
        t = time.time()
        ppl = hf_perplexity(model, windows)
        log(dict(variant=v, ppl=ppl, quant_secs=round(tq, 1), secs=round(time.time() - t, 1)))
        for h in handles:
            h.remove()


if __name__ == "__main__":
    main()
