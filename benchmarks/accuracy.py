"""The one perplexity harness: the accuracy table (QuaRot paper's Table 1, on small
models) and the studies that are row sets of it.

For every row: quantize with `vllm-quarot quantize` (cached under --work), optionally
derive a variant of that checkpoint (same weights, another config: a row set's view),
then measure perplexity through vLLM (the serving path, when vLLM can serve the row)
and through the pure-PyTorch simulation, and report the checkpoint size.

    .venv/bin/python benchmarks/accuracy.py --model smollm2      # WikiText-2
    .venv/bin/python benchmarks/accuracy.py --model stories260k  # TinyStories, sim only
    .venv/bin/python benchmarks/accuracy.py --model smollm2-qwen2keys --rows 0,14,15,16
        # SmolLM2 with Qwen2's massive key biases: the KV4 rows
    .venv/bin/python benchmarks/accuracy.py --row-set tp-blocks --no-vllm
        # --tp 1/2/8 checkpoints (block-diagonal R4, per-slice scales)
    .venv/bin/python benchmarks/accuracy.py --row-set a8 --seeds 1
        # --a8-layers 0/2/4/auto from one W4A4KV4 checkpoint (weights shared)
    .venv/bin/python benchmarks/accuracy.py --row-set act --no-vllm --seeds 1
        # which projections' 4-bit activations cost most; other activation clips

Writes benchmarks/results/accuracy_<model>[_<row set>].md and prints the same table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUAROT_DATA_DIR", ROOT.parent / "shared" / "data"))


class Row(NamedTuple):
    """label; quantize options (None: the 16-bit original); seeded (one checkpoint per
    R1 seed); view: (name, fn(ckpt, out) -> checkpoint) derives a variant that shares
    the weights; sim: keyword arguments of load_simulated (analysis-only overrides, so
    simulation only)."""

    label: str
    opts: dict | None
    seeded: bool = False
    view: tuple[str, Callable[[Path, Path], Path]] | None = None
    sim: dict | None = None


# Options not given are the CLI's defaults (GPTQ: sequential in each layer, weight
# clip search, act-order, damp 0.01), so a row shows what a user gets. Seeded rows are
# quantized once per R1 seed (--seeds) and reported as mean ± standard deviation: at 4
# bits one seed's figure moves by ~10 %, more than many method differences.
ROWS: list[Row] = [Row(*r) for r in [
    ("bf16", None, False),
    ("W8A8, no rotation", dict(scheme="w8a8", weight_method="rtn", rotate="none"), False),
    ("W8A8, QuaRot", dict(scheme="w8a8", weight_method="rtn"), False),
    ("W8A8 static, QuaRot", dict(scheme="w8a8-static", weight_method="rtn"), False),
    ("W4A16 GPTQ, QuaRot", dict(scheme="w4a16"), True),
    ("W4A4KV4 RTN, no rotation", dict(scheme="w4a4kv4", weight_method="rtn", rotate="none"),
     False),
    ("W4A4KV4 QuaRot-RTN", dict(scheme="w4a4kv4", weight_method="rtn"), True),
    ("W4A4KV4 QuaRot-GPTQ", dict(scheme="w4a4kv4"), True),
    ("W4A4 (KV16) QuaRot-GPTQ", dict(scheme="w4a4"), True),
    ("W4A4KV4 QuaRot-GPTQ, --a8-layers auto", dict(scheme="w4a4kv4", a8_layers="auto"), True),
    ("W4A4KV4 SpinQuant-GPTQ", dict(scheme="w4a4kv4", rotate="spinquant"), True),
    ("W4A8KV4 QuaRot-GPTQ", dict(scheme="w4a8kv4"), True),
    ("W4A8KV4 QuaRot-GPTQ, group 64", dict(scheme="w4a8kv4", group_size=64), True),
    ("W4A8 (KV16) QuaRot-GPTQ", dict(scheme="w4a8"), False),
    ("KV4 only, QuaRot, KV calibrated (default)", dict(scheme="kv4", weight_method="rtn"),
     False),
    ("KV4 only, no rotation (plain int4 per token-head)",
     dict(scheme="kv4", weight_method="rtn", rotate="none", kv_calibrate=False), False),
    ("KV4 only, QuaRot R3 on every layer (--no-kv-calibrate)",
     dict(scheme="kv4", weight_method="rtn", kv_calibrate=False), False),
    ("W4A4KV4 QuaRot-RTN, --no-kv-calibrate", dict(scheme="w4a4kv4", weight_method="rtn",
                                                   kv_calibrate=False), False),
    ("W4A8KV4 QuaRot-RTN", dict(scheme="w4a8kv4", weight_method="rtn"), False),
    ("W4A8KV4 QuaRot-RTN, --no-kv-calibrate", dict(scheme="w4a8kv4", weight_method="rtn",
                                                   kv_calibrate=False), False),
]]


def _strip_smooth(src: Path, dst: Path) -> Path:
    """dst = the checkpoint src without Rotated Runtime Smooth: activation.smooth null and
    no smooth_perm tensors (every other file and tensor as it is)."""
    import shutil

    from safetensors.torch import load_file, save_file

    if (dst / "config.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    def top_level_weights(d: str, names: list[str]) -> list[str]:
        # the weights and config are rewritten below; quarot/ (the KV shift) is copied
        return [n for n in names if Path(d) == src and (n.endswith(".safetensors")
                                                       or n == "config.json")]

    shutil.copytree(src, tmp, ignore=top_level_weights)
    for f in src.glob("*.safetensors"):
        t = load_file(f)
        save_file({k: v for k, v in t.items() if not k.endswith(".smooth_perm")},
                  tmp / f.name, metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["activation"]["smooth"] = None
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmp.rename(dst)
    return dst


# Rotated Runtime Smooth (--smooth runtime) as benchmarks/rrs_variants.py chose it: groups
# of 64 channels reordered by their calibration maxima. Each "without" row is the same
# checkpoint with activation.smooth and the channel orders removed (a view): GPTQ's
# Hessians and the KV calibration see 16-bit activations, so --smooth changes no weight
# (tests/test_rrs.py checks it), and each pair differs in the activation quantization only.
def _levels_view(levels: int) -> tuple[str, Callable[[Path, Path], Path]]:
    """The RRS checkpoint with integer smoothing factors 1..levels (format v9; what
    --smooth-levels writes: the weights do not depend on the smoothing)."""
    def make(ckpt: Path, out: Path) -> Path:
        from vllm_quarot.format import FORMAT_VERSION

        cfg = json.loads((ckpt / "config.json").read_text())
        qc = cfg["quantization_config"]
        qc["activation"]["smooth"]["factor_levels"] = levels
        qc["format_version"] = FORMAT_VERSION
        return _config_view(ckpt, out, cfg)
    return f"levels-{levels}", make


# Rows 20-23 keep float smoothing factors (--smooth-levels 0, 0.10's RRS); rows 27-28 are
# the same checkpoints with integer factors 1..16 (v9, the 0.12 default), also a view.
RRS = dict(smooth="runtime", smooth_group=64, smooth_reorder=True, smooth_levels=0)
ROWS += [
    Row("W4A4KV4 QuaRot-GPTQ + RRS, float factors (--smooth-levels 0)",
        dict(scheme="w4a4kv4", **RRS), True),
    Row("W4A4KV4 QuaRot-GPTQ (row 20 without RRS)", dict(scheme="w4a4kv4", **RRS), True,
        view=("no-smooth", _strip_smooth)),
    Row("W4A4 (KV16) QuaRot-GPTQ + RRS, float factors (--smooth-levels 0)",
        dict(scheme="w4a4", **RRS), True),
    Row("W4A4 (KV16) QuaRot-GPTQ (row 22 without RRS)", dict(scheme="w4a4", **RRS), True,
        view=("no-smooth", _strip_smooth)),
]
# the KV4 alternatives of issue #31 beside row 14 (the default: pivots auto); the key
# variants are the simulation of row 14's checkpoint with other keys (nothing serves them)
_KV4 = dict(scheme="kv4", weight_method="rtn")
ROWS += [
    Row("KV4 only, KV calibrated, --kv-pivots 0 (no IntactKV)", {**_KV4, "kv_pivots": "0"},
        False),
    Row("KV4 only, KV calibrated, keys 8-bit (K8V4; simulation only)", _KV4, False,
        sim={"kv_keys": "int8"}),
    Row("KV4 only, KV calibrated, keys per channel per 16-token page (KIVI; simulation "
        "only)", _KV4, False, sim={"kv_keys": "channel"}),
]
ROWS += [
    Row("W4A4KV4 QuaRot-GPTQ + RRS, integer factors 1..16 (--smooth runtime; row 20's "
        "checkpoints)", dict(scheme="w4a4kv4", **RRS), True, view=_levels_view(16)),
    Row("W4A4 (KV16) QuaRot-GPTQ + RRS, integer factors 1..16 (row 22's checkpoints)",
        dict(scheme="w4a4", **RRS), True, view=_levels_view(16)),
]


def _a8_view(n: int | str) -> tuple[str, Callable[[Path, Path], Path]]:
    """The checkpoint with the n sub-blocks of largest 4-bit activation error at 8 bits,
    chosen from the errors the quantizer measured (``--a8-layers N``'s own choice);
    GPTQ's weights do not depend on the activation bits, so the weights are shared."""
    def make(ckpt: Path, out: Path) -> Path:
        from vllm_quarot.offline.quantize import select_a8_layers

        cfg = json.loads((ckpt / "config.json").read_text())
        qc = cfg["quantization_config"]
        errors = qc["quantizer"].get("activation_errors")
        if not errors:
            raise SystemExit(f"{ckpt} was not quantized with --a8-layers")
        qc["activation"]["layer_bits"] = dict(sorted(
            select_a8_layers(errors, str(n), cfg["num_hidden_layers"]).items()))
        qc["quantizer"]["a8_layers"] = str(n)
        return _config_view(ckpt, out, cfg)
    return f"a8-{n}", make


def _clip_view(clip: float) -> tuple[str, Callable[[Path, Path], Path]]:
    """The checkpoint served with another activation clip ratio (weights unchanged)."""
    def make(ckpt: Path, out: Path) -> Path:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["quantization_config"]["activation"]["clip_ratio"] = clip
        return _config_view(ckpt, out, cfg)
    return f"clip-{clip}", make


def _config_view(ckpt: Path, out: Path, cfg: dict) -> Path:
    """out: ckpt's files symlinked, with cfg as its config.json."""
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


_W4A4KV4 = dict(scheme="w4a4kv4")
_ACT = {"16-bit activations everywhere": {"proj": None},
        "8-bit activations everywhere": {"proj": 8},
        "8-bit at down_proj": {"down_proj": 8},
        "8-bit at o_proj": {"o_proj": 8},
        "8-bit at q/k/v_proj": {"q_proj": 8, "k_proj": 8, "v_proj": 8},
        "8-bit at gate/up_proj": {"gate_proj": 8, "up_proj": 8}}
# the studies: each a list of rows of this harness (--row-set NAME), after the 16-bit
# reference
_BF16 = ROWS[0]
ROW_SETS: dict[str, list[Row]] = {
    "table1": ROWS,
    # tensor-parallel-ready checkpoints: block-diagonal R4 I_N ⊗ H_{inter/N} and
    # per-(token, 1/N slice) activation scales on o_proj and down_proj
    "tp-blocks": [_BF16] + [Row(f"W4A4KV4 QuaRot-GPTQ, --tp {n}", {**_W4A4KV4, "tp": n}, True)
                  for n in (1, 2, 8)],
    # keeping the N sub-blocks of largest 4-bit activation error at 8 bits
    "a8": [_BF16] + [Row(f"W4A4KV4 QuaRot-GPTQ, --a8-layers {n}", {**_W4A4KV4, "a8_layers": "auto"},
               True, view=_a8_view(n)) for n in (0, 2, 4, "auto")],
    # which projections' 4-bit activations cost most (simulation overrides), and the
    # activation clip ratio, on one W4A4KV4 checkpoint
    "act": [_BF16, Row("W4A4KV4 QuaRot-GPTQ, as quantized", _W4A4KV4, True)]
    + [Row(f"W4A4KV4 QuaRot-GPTQ, {k}", _W4A4KV4, True, sim={"act_bits_override": v})
       for k, v in _ACT.items()]
    + [Row(f"W4A4KV4 QuaRot-GPTQ, activation clip {c}", _W4A4KV4, True, view=_clip_view(c))
       for c in (0.8, 0.85, 0.95, 1.0)],
}

MODELS = {
    # name: (text, seqlen, vLLM can serve it, calibration text)
    "smollm2": ("wikitext-2-raw/wiki.test.raw", 2048, True, "tinystories/validation_head.txt"),
    "stories260k": ("tinystories/validation_head.txt", 512, False,
                    "tinystories/validation_head.txt"),
    # SmolLM2 with Qwen2's massive key biases planted (models.smollm2_qwen2_keys_dir)
    "smollm2-qwen2keys": ("wikitext-2-raw/wiki.test.raw", 2048, True,
                          "tinystories/validation_head.txt"),
    # SmolLM2 with a real Qwen2.5's key/query statistics and its own attention sink
    # (zoo.smollm2_qwen25_dir)
    "smollm2-qwen25": ("wikitext-2-raw/wiki.test.raw", 2048, True,
                       "tinystories/validation_head.txt"),
}


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from vllm_quarot.eval.zoo import smollm2_dir

        return smollm2_dir()
    if name == "smollm2-qwen2keys":
        from vllm_quarot.eval.zoo import smollm2_qwen2_keys_dir

        return smollm2_qwen2_keys_dir()
    if name == "smollm2-qwen25":
        from vllm_quarot.eval.zoo import smollm2_qwen25_dir

        return smollm2_qwen25_dir()
    return DATA / "stories260K" / "hf"


def size_mib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20


def _key(opts: object) -> str:
    """Cache name: every quantizer option, defaults included (a changed default or row
    never reuses a stale checkpoint)."""
    import dataclasses
    import hashlib

    from vllm_quarot.offline.options import QuantizeOptions

    def full(o: object) -> object:
        if not isinstance(o, dict):
            return o
        q = QuantizeOptions(**o)
        d = dataclasses.asdict(q)
        if d.get("smooth") is None:  # rows without --smooth keep their pre-RRS keys
            for f in ("smooth", "smooth_group", "smooth_reorder", "smooth_levels"):
                d.pop(f, None)
        elif d.get("smooth_levels") == 0:  # float factors: the 0.10 checkpoints (v7)
            d.pop("smooth_levels")
        if q.calibrates_kv and q.pivots is None:
            # 0.10: the pivots are found before the first layer's KV choice (0.9 grew
            # them layer by layer, and the layers before the first sink were calibrated
            # without the pivots they are served with)
            d["kv_recipe"] = "sinks-first"
        return d

    resolved = [full(x) for x in opts] if isinstance(opts, list) else full(opts)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def _heldout(tok, text_file: Path, n_tokens: int, work: Path) -> Path:
    """The evaluation text from well after its first n_tokens (the scored windows): a
    calibration set in the evaluation's domain that shares no token with it."""
    text = text_file.read_text(encoding="utf-8")
    ids = tok(text, verbose=False).input_ids  # a whole text: no length warning
    start = len(tok.decode(ids[: 2 * n_tokens]))  # twice the scored span: a margin
    out = work / f"{text_file.stem}-after-{2 * n_tokens}-tokens.txt"
    work.mkdir(parents=True, exist_ok=True)
    if not out.is_file():
        out.write_text(text[start:], encoding="utf-8")
    return out


def overrides(pairs: list[str], opts: dict) -> dict:
    """--set OPTION=VALUE pairs (VALUE parsed as JSON when it is, else a string); a
    spinquant_* option only applies to SpinQuant rows."""
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set wants OPTION=VALUE, got {pair!r}")
        if k.startswith("spinquant_") and opts.get("rotate") != "spinquant":
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} ± {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--row-set", choices=sorted(ROW_SETS), default="table1",
                    help="which rows: the accuracy table or one of the studies")
    ap.add_argument("--max-windows", type=int, default=8,
                    help="perplexity windows of seqlen tokens (None: the whole text)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--calib", default=None, choices=("tinystories", "wikitext-heldout"),
                    help="calibration text (default: the model's, TinyStories); "
                    "wikitext-heldout: the evaluation text after its evaluated windows "
                    "(in-domain, disjoint from what is scored, as the paper calibrates "
                    "on WikiText-2 train)")
    ap.add_argument("--seeds", type=int, default=3, help="R1 seeds of the seeded rows")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeded rows use seeds FIRST .. FIRST+SEEDS-1 (to split runs)")
    ap.add_argument("--rows", default=None,
                    help="comma-separated row numbers (default all); ROW:N = N seeds")
    ap.add_argument("--work", default=None, help="where quantized checkpoints are cached")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the model dtype vLLM serves in (the simulation runs in float32)")
    ap.add_argument("--no-sim", action="store_true",
                    help="seeded rows: vLLM for every seed instead of the simulation")
    ap.add_argument("--spinquant-steps", type=int, default=None,
                    help="override the CLI default for the SpinQuant row")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="override a quantizer option (QuantizeOptions field, e.g. "
                    "spinquant_weights=rtn) in the rows that use it; part of the cache key")
    ap.add_argument("--sim-rows", default="all",
                    help="rows also scored by the simulation (seed 0) when vLLM serves "
                    "them ('all' for every row); rows vLLM cannot serve always are")
    ap.add_argument("--cached-only", action="store_true",
                    help="table of the rows (seeds) already quantized and scored; skip the rest")
    ap.add_argument("--out", default=None, help="default benchmarks/results/accuracy_<model>.md")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_quarot.eval.perplexity import (
        hf_perplexity,
        load_reference,
        serve_perplexity,
        token_windows,
    )
    from vllm_quarot.eval.simulate import load_simulated
    from vllm_quarot.eval.zoo import default_cache_dir
    from vllm_quarot.offline.quantize import QuantizeOptions, quantize

    text, seqlen, servable, calib = MODELS[a.model]
    base = model_dir(a.model)
    work = Path(a.work) if a.work else default_cache_dir() / f"accuracy-{a.model}"
    tok = AutoTokenizer.from_pretrained(base)
    windows = token_windows(tok, DATA / text, seqlen, a.max_windows)
    if a.calib == "wikitext-heldout":
        calib = str(_heldout(tok, DATA / text, len(windows) * seqlen, work))
    # --rows 7,11,12:1 -> row 12 with one seed only
    rows = ROW_SETS[a.row_set]
    picked = ([(int(r.split(":")[0]), int(r.split(":")[1]) if ":" in r else None)
               for r in a.rows.split(",")] if a.rows else [(i, None) for i in range(len(rows))])
    results = []
    for i, n_seeds in picked:
        label, opts, seeded, view, sim_kw = rows[i]
        vals, sims, mib, secs = [], [], 0.0, []
        first = a.first_seed if seeded else 0
        for seed in range(first, first + ((n_seeds or a.seeds) if seeded else 1)):
            ckpt, row = base, None
            if opts is not None:
                row = {**opts, "seed": seed, "calib": str(DATA / calib),  # abs: as is
                       "nsamples": a.nsamples, "seqlen": a.calib_seqlen}
                row.update(overrides(a.set + ([f"spinquant_steps={a.spinquant_steps}"]
                                              if a.spinquant_steps is not None else []), opts))
                # the options decide the checkpoint: rows (and row sets) with the same
                # options share one, whatever their row number
                ckpt = next(iter(sorted(work.glob(f"row*-seed{seed}-{_key(row)}"))),
                            work / f"row{i:02d}-seed{seed}-{_key(row)}")
                if a.cached_only and not (ckpt / "config.json").is_file():
                    continue
                if not (ckpt / "config.json").is_file():
                    print(f"[accuracy] quantizing: {label}, seed {seed}", flush=True)
                    t = time.time()
                    s = quantize(base, ckpt, QuantizeOptions(**row))
                    secs.append(time.time() - t)
                    print(f"[accuracy]   {secs[-1]:.0f} s; worst layer error "
                          f"{max(s.layer_errors.values(), default=0):.4f}", flush=True)
                if view is not None:
                    ckpt = view[1](ckpt, work / f"{ckpt.name}-{view[0]}")
            # vLLM (the serving path) scores seed 0; the simulation (the runtime's maths in
            # float32, several times faster than bf16 vLLM on an AVX2 CPU) every seed of a
            # seeded row, and seed 0 of the rows in --sim-rows
            serve = servable and not a.no_vllm and seed == 0 and sim_kw is None
            with_sim = not servable or sim_kw is not None or (seeded and not a.no_sim) or (
                seed == 0 and (a.sim_rows == "all" or str(i) in a.sim_rows.split(",")))
            # scores are cached beside the checkpoint, per evaluation set and variant
            key = _key([row, text, seqlen, len(windows)]
                       + ([view and view[0], json.dumps(sim_kw, sort_keys=True)]
                          if view or sim_kw else []))
            cache = next(iter(sorted(work.glob(f"scores-row*-seed{seed}-{key}.json"))),
                         work / f"scores-row{i:02d}-seed{seed}-{key}.json")
            got = json.loads(cache.read_text()) if cache.is_file() else {}
            vkey = "vllm" if a.vllm_dtype == "bfloat16" else f"vllm_{a.vllm_dtype}"
            if a.cached_only:  # what was scored, nothing more
                serve, with_sim = serve and vkey in got, with_sim and "sim" in got
                if not (serve or with_sim):
                    continue
            if serve and vkey not in got:
                got[vkey] = serve_perplexity(ckpt, windows, "quarot" if opts else None,
                                             dtype=a.vllm_dtype)
            if with_sim and "sim" not in got:
                got["sim"] = hf_perplexity(load_simulated(ckpt, **sim_kw) if sim_kw
                                           else load_reference(ckpt), windows)
            work.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(got))
            v, sim = (got.get(vkey) if serve else None), (got.get("sim") if with_sim else None)
            if v is not None:
                vals.append(v)
            if sim is not None:
                sims.append(sim)
            mib = size_mib(ckpt)
            print(f"[accuracy] {label} seed {seed}: vLLM {v} sim {sim}", flush=True)
        if vals or sims:
            results.append((i, label, vals, sims, mib, secs))

    bf16 = [r for r in results if r[1] == "bf16"]
    ref_v = bf16[0][2][0] if bf16 and bf16[0][2] else None
    ref_s = bf16[0][3][0] if bf16 and bf16[0][3] else None
    n_tok = len(windows) * (seqlen - 1)
    lines = [
        f"{a.model}, rows `{a.row_set}`: perplexity on `{text}` ({len(windows)}×{seqlen} "
        f"tokens, {n_tok} scored); "
        f"calibration: {a.nsamples}×{a.calib_seqlen} tokens of `{calib}`. vLLM "
        f"({a.vllm_dtype}, the serving path) scores R1 seed 0; the simulation (float32) "
        "every seed: mean ± standard deviation over the seeds in brackets. 'vs bf16' "
        "compares simulation with simulation (vLLM with vLLM where a row has no simulation).",
        "",
        "| # | configuration | ppl vLLM (seed 0) | ppl simulation | vs bf16 | vLLM/sim "
        "(seed 0) | size MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for i, label, vals, sims, mib, _secs in results:
        if sims and ref_s:
            rel = f"{(sum(sims) / len(sims) / ref_s - 1) * 100:+.1f}%"
        elif vals and ref_v:
            rel = f"{(vals[0] / ref_v - 1) * 100:+.1f}%"
        else:
            rel = ""
        vs = f"{vals[0]:.2f}" if vals else "—"
        ss = _stat(sims) if sims else "—"
        if len(sims) > 1:
            ss += " [" + ", ".join(f"{v:.2f}" for v in sims) + "]"
        ratio = f"{vals[0] / sims[0]:.4f}" if vals and sims else ""
        lines.append(f"| {i} | {label} | {vs} | {ss} | {rel} | {ratio} | {mib:.1f} |")
    table = "\n".join(lines)
    print(table)
    suffix = "" if a.row_set == "table1" else "_" + a.row_set.replace("-", "_")
    out = (Path(a.out) if a.out
           else ROOT / "benchmarks" / "results" / f"accuracy_{a.model}{suffix}.md")
    out.write_text(table + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
