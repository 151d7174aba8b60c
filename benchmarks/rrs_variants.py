"""Rotated Runtime Smooth (RRS) variants, measured in the simulation only (no kernel,
no re-quantization): the study behind the choice of ``--smooth runtime``.

Loads a W4A4(KV4) checkpoint's simulation, switches its per-token activation
quantization off and quantizes every linear input (after the online R4) with a
variant instead:

* ``checkpoint``: the simulation of the checkpoint as it is (what vLLM serves);
* ``pertoken``: per-token quantization at the checkpoint's bits and clip (QuaRot);
* ``rrs:<maxima>:g<G>[:reorder][:clip<c>]``: the input is divided by smoothing
  factors, one per group of G channels, quantized per token at the scheme's bits
  and multiplied back (what an integer GEMM does when it scales each K group's partial
  sum). The factors are the group's largest |x| over a set of tokens: ``step`` (every
  token of the forward pass: one window here), ``tok<T>`` (runs of T consecutive tokens
  of a sequence; ``tok1`` = each token alone), or ``chan`` (G = 1, per-channel maxima
  over the step: the paper's unrestricted Runtime Smooth, which no integer GEMM can
  apply, for reference). ``reorder`` groups channels by their calibration maxima
  (sorted, G per group) instead of their natural order.

    .venv/bin/python benchmarks/rrs_variants.py CKPT --calib FILE \
        --variants pertoken rrs:step:g64 rrs:tok1:g64:reorder --max-windows 8

Prints one row per variant (perplexity on WikiText-2 test, the windows of
benchmarks/accuracy.py) and writes them to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))


def parse_variant(spec: str) -> dict:
    parts = spec.split(":")
    if parts[0] in ("pertoken", "checkpoint"):
        return {"kind": parts[0]}
    if parts[0] != "rrs" or len(parts) < 3:
        raise SystemExit(f"bad variant {spec!r}")
    v = {"kind": "rrs", "maxima": parts[1], "group": int(parts[2].removeprefix("g")),
         "reorder": False, "clip": None}
    for p in parts[3:]:
        if p == "reorder":
            v["reorder"] = True
        elif p.startswith("clip"):
            v["clip"] = float(p.removeprefix("clip"))
        else:
            raise SystemExit(f"bad variant option {p!r} in {spec!r}")
    return v


def _token_sets(m: torch.Tensor, maxima: str) -> torch.Tensor:
    """m [B, T, NG] (each token's group maxima) -> the smoothing factors broadcast to it."""
    if maxima == "step":
        return m.amax(dim=(0, 1), keepdim=True)
    if maxima.startswith("tok"):
        t0 = int(maxima.removeprefix("tok"))
        b, t, ng = m.shape
        pad = (-t) % t0
        mp = torch.nn.functional.pad(m, (0, 0, 0, pad))
        s = mp.reshape(b, -1, t0, ng).amax(dim=2, keepdim=True).expand(-1, -1, t0, -1)
        return s.reshape(b, -1, ng)[:, :t]
    raise SystemExit(f"unknown maxima {maxima!r}")


def rrs_fake_quant(x: torch.Tensor, bits: int, clip: float, group: int, maxima: str,
                   perm: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, K] -> smoothed, quantized per token, unsmoothed (float32)."""
    if maxima == "tok1":  # what the runtime serves (activation.smooth)
        from vllm_quarot.quant import fake_smooth_quantize

        return fake_smooth_quantize(x, bits, clip, group, perm)
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    if perm is not None:
        xf = xf[..., perm]
    b, t, k = xf.shape
    if maxima == "chan":
        s = xf.abs().amax(dim=(0, 1), keepdim=True).clamp(min=1e-12)  # [1, 1, K]
        y = xf / s
    else:
        g = xf.reshape(b, t, k // group, group)
        s = _token_sets(g.abs().amax(-1), maxima).clamp(min=1e-12)  # [B, T, NG]
        y = (g / s[..., None]).reshape(b, t, k)
    a = (y.abs().amax(-1, keepdim=True) * (clip / qmax)).clamp(min=1e-12)
    q = torch.round(y / a).clamp(-qmax - 1, qmax)
    deq = q * a
    if maxima == "chan":
        out = deq * s
    else:
        out = (deq.reshape(b, t, k // group, group) * s[..., None]).reshape(b, t, k)
    if perm is not None:
        out = out[..., torch.argsort(perm)]
    return out.to(x.dtype)


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith("_proj")]


@torch.no_grad()
def calibration_maxima(model: torch.nn.Module, calib_windows: list[list[int]]
                       ) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of every linear's input (after R4, 16-bit activations)."""
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name in linear_names(model):
        def hook(_m, args, name=name):
            a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0)
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    for w in calib_windows:
        model(torch.tensor([w]))
    for h in handles:
        h.remove()
    return amax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--calib", required=True, help="calibration text (channel maxima)")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_quarot.eval.perplexity import hf_perplexity, token_windows
    from vllm_quarot.eval.simulate import load_simulated
    from vllm_quarot.format import QuaRotFormat
    from vllm_quarot.quant import fake_quantize_per_token, smooth_order

    fmt = QuaRotFormat.from_dict(
        json.loads((Path(a.ckpt) / "config.json").read_text())["quantization_config"])
    assert fmt.activation is not None and not fmt.activation.static
    bits, clip0 = fmt.activation.bits, fmt.activation.clip_ratio
    tok = AutoTokenizer.from_pretrained(a.ckpt)
    windows = token_windows(tok, DATA / "wikitext-2-raw/wiki.test.raw", a.seqlen,
                            a.max_windows)
    cal = token_windows(tok, a.calib, a.calib_seqlen, a.calib_windows)
    base = load_simulated(a.ckpt) if "checkpoint" in a.variants else None
    # the same model with 16-bit activations at the linears (R4 still applied)
    model = load_simulated(a.ckpt, act_bits_override={"_proj": None})
    names = linear_names(model)
    amax = calibration_maxima(model, cal)
    rows = []
    for spec in a.variants:
        v = parse_variant(spec)
        t0 = time.time()
        if v["kind"] == "checkpoint":
            ppl = hf_perplexity(base, windows)
        else:
            handles = []
            for name in names:
                perm = (smooth_order(amax[name]).long()
                        if v["kind"] == "rrs" and v["reorder"] else None)

                def hook(_m, args, perm=perm, v=v):
                    if v["kind"] == "pertoken":
                        return (fake_quantize_per_token(args[0], bits, clip0),)
                    return (rrs_fake_quant(args[0], bits, v["clip"] or clip0, v["group"],
                                           v["maxima"], perm),)
                handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
            ppl = hf_perplexity(model, windows)
            for h in handles:
                h.remove()
        rows.append((spec, ppl))
        print(f"[rrs] {spec}: {ppl:.3f} ({time.time() - t0:.0f} s)", flush=True)
    lines = [f"`{' '.join(sys.argv)}`", "", "| variant | perplexity |", "|---|---:|"]
    lines += [f"| {s} | {p:.3f} |" for s, p in rows]
    print("\n".join(lines))
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
