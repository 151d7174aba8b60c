"""Where R1 goes: QuaRot's fused R1 (residual stream, RMSNorm gains folded into the next
linears) against ``--r1 online`` (no R1; a randomized Hadamard on the input of q/k/v,
gate/up and o_proj at run time, after each norm with its gain kept: QuIP's placement),
at the same scheme, on the peer benchmark's calibration and evaluation windows.

    .venv/bin/python benchmarks/peers/r1_placement.py --model smollm2 \
        --schemes w4a4-g64,w4a4kv4-pc,w4a8-g64,w4a16-g64 --seeds 0,1 --seeded w4a4-g64 \
        --float32-only w4a4kv4-pc,w4a8-g64,w4a16-g64

For every scheme, placement and seed (R1's signs / the online Hadamards' signs and the
calibration draw): the quantization (one OpenMP thread, as vs_llmcompressor.py) and
perplexity in float32 (our simulation); for the first seed, unless the scheme is
``--float32-only``, perplexity through vLLM (the plugin) and decode tok/s at 1 and 32
sequences side by side (round-robin passes over those checkpoints, one fresh engine
each; ``--speed-rounds``). Results are cached in the
peer benchmark's work folder (``ours/<options>``: the fused rows are the peer table's
own checkpoints); the table goes to stdout and benchmarks/results/r1_placement_<model>.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_llmcompressor as peers  # noqa: E402

PLACEMENTS = {"fused": ["--r1", "fused"], "online": ["--r1", "online"]}


def options(scheme: str) -> list[str]:
    """``w4a4-g64`` -> the quantizer's options (``-pc``: per-channel weights)."""
    name, _, group = scheme.partition("-")
    gs = "-1" if group == "pc" else group.removeprefix("g")
    return ["--scheme", name, "--group-size", gs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peers.window_args(ap)
    ap.add_argument("--schemes", default="w4a4-g64,w4a8-g64,w4a16-g64",
                    help="SCHEME-gN (group N) or SCHEME-pc (per channel), comma-separated")
    ap.add_argument("--speed-rounds", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="comma-separated quantizer seeds")
    ap.add_argument("--seeded", default="",
                    help="schemes that get every --seeds (default: all; others the first)")
    ap.add_argument("--float32-only", default="",
                    help="schemes scored in float32 only (no vLLM engine): e.g. W4A16 on "
                    "an AVX2 CPU, where it runs on the slow reference ops")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    mdir = peers.model_dir(a.model)
    work = a.work / f"{a.model}-c{a.nsamples}x{a.calib_seqlen}-e{a.max_windows}x{a.seqlen}"
    work.mkdir(parents=True, exist_ok=True)
    windows = work / "windows.json"
    if not windows.is_file():
        peers.make_windows(mdir, windows, a.nsamples, a.calib_seqlen, a.seqlen,
                           a.max_windows)
    seeds = [int(x) for x in a.seeds.split(",")]
    f32_only = {x.strip() for x in a.float32_only.split(",") if x.strip()}
    # (scheme, placement) -> (per-seed quantization results, vLLM score of the first seed)
    rows: dict[tuple[str, str], tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    for scheme in [s.strip() for s in a.schemes.split(",") if s.strip()]:
        for placement, extra in PLACEMENTS.items():
            qs, sc = [], {}
            seeded = {x.strip() for x in a.seeded.split(",") if x.strip()}
            for seed in seeds if not seeded or scheme in seeded else seeds[:1]:
                key = f"{scheme}:{placement}" + (f":seed{seed}" if seed else "")
                peers.RECIPES[key] = [*options(scheme), *extra] + (
                    ["--seed", str(seed)] if seed else [])  # (the folder's name)
                d = peers._ours_dir(work, key)
                peers.log(f"{key}: quantize")
                q = peers.quantize_ours(mdir, key, a.nsamples, a.calib_seqlen, windows, d,
                                        seed=seed)
                qs.append(q)
                if seed == seeds[0] and "error" not in q and scheme not in f32_only:
                    sc = peers.score(d / "ckpt", windows, d, True, a.repeats)
            rows[(scheme, placement)] = (qs, sc)
    served = [(f"{s}:{p}", Path(qs[0]["ckpt"]), True) for (s, p), (qs, sc) in rows.items()
              if sc and "error" not in sc]
    (work / "r1_placement").mkdir(exist_ok=True)
    speed = peers.speed_rounds(served, windows, work / "r1_placement", a.speed_rounds,
                               a.repeats) if a.speed_rounds > 0 and served else {}
    lines = [
        f"# R1 fused vs online — {a.model}", "",
        f"`{Path(sys.argv[0]).as_posix()} {' '.join(sys.argv[1:])}`  ",
        f"{platform.machine()} ({peers.cpu_name()}), {time.strftime('%Y-%m-%d')}; "
        f"calibration {a.nsamples} × {a.calib_seqlen} TinyStories tokens, WikiText-2 test "
        f"{a.max_windows} × {a.seqlen}; float32 ppl per seed ({', '.join(map(str, seeds))}"
        f"{'; ' + a.seeded + ' only' if a.seeded else ''}) and their mean; vLLM ppl and "
        f"decode for seed {seeds[0]}: medians over "
        f"{a.speed_rounds} round-robin passes × {a.repeats} generations of "
        f"{peers.NEW_TOKENS} tokens (fresh eager engine each); ratio = online / fused of "
        "the same scheme; quantize: wall time of seed "
        f"{seeds[0]} (one thread, another job on the other core).", "",
        "| scheme | R1 | float32 ppl | mean | vLLM ppl | quantize | tok/s @1 | tok/s @32 | "
        "@1 ratio | @32 ratio |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for (scheme, placement), (qs, sc) in rows.items():
        s = speed.get(f"{scheme}:{placement}", {})
        f = speed.get(f"{scheme}:fused", {})
        ratio = [peers.fmt(s[k] / f[k]) if placement == "online" and s.get(k) and f.get(k)
                 else "" for k in ("1", "32")]
        ppls = [q["sim_ppl"] for q in qs if "sim_ppl" in q]
        q0 = qs[0]
        lines.append(
            f"| {scheme} | {placement} | {' / '.join(peers.fmt(p) for p in ppls)} | "
            f"{peers.fmt(statistics.mean(ppls)) if ppls else '–'} | "
            f"{peers.fmt(sc.get('vllm_ppl')) if 'error' not in sc else sc['error']} | "
            f"{peers.fmt(q0['wall_s'] / 60, '.1f') + ' min' if 'wall_s' in q0 else q0.get('error')}"
            f" | {peers.fmt(s.get('1'), '.1f')} | {peers.fmt(s.get('32'), '.0f')} | "
            f"{ratio[0]} | {ratio[1]} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = peers.RESULTS / f"r1_placement_{a.model}.md"
    out.write_text(md)
    peers.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
