"""``vllm-quarot quantize``: rotate a Hugging Face checkpoint with QuaRot and quantize it.

A run is a sequence of named steps over explicit state (``QuantizeRun``): check the
options, model and output (``prepare``), make the calibration windows
(``calibration``), learn R1/R2 (``spinquant``, with --rotate spinquant), then stream the
model one part at a time — ``embedding``, each ``layer``, the ``head`` — and ``finish``
the checkpoint's format section and metadata. Peak memory is one decoder layer plus the
calibration activations plus the (small) quantized output, never two copies of the
model. ``quantize(..., on_step=f)`` calls ``f(step, seconds, info)`` after every step
(e.g. ``layer.3``, ``save.3`` with the bytes it wrote): the speed benchmark's timing
hook.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_quarot import __version__
from vllm_quarot.format import QuaRotFormat
from vllm_quarot.hadamard import random_signs
from vllm_quarot.kv_shift import write_kv_shift
from vllm_quarot.models import (
    EMBED,
    FINAL_NORM,
    LINEARS,
    LM_HEAD,
    SUB_BLOCKS,
    Family,
    layer_index,
    layer_prefix,
)
from vllm_quarot.offline import kv_calibration
from vllm_quarot.offline.calibration import calibration_ids, spinquant_ids
from vllm_quarot.offline.checkpoint import (
    RunProgress,
    ShardedWriter,
    TensorSource,
    activation_buffer,
    check_output_dir,
    staged_dir,
)
from vllm_quarot.offline.gptq import HessianAccumulator, gptq_quantize
from vllm_quarot.offline.hub import resolve_model
from vllm_quarot.offline.layer_runner import SEQUENTIAL_GROUPS, LayerKind, LayerRunner, RMSNorm64
from vllm_quarot.offline.options import (
    PRECISIONS,
    SCHEMES,
    QuantizeError,
    QuantizeOptions,
    check_model_fits,
    check_options,
    parse_a8_layers,
    resolve_device,
    shard_bytes,
    tp_serving_warning,
)
from vllm_quarot.offline.plan import (
    Plan,
    estimate_seconds,
    gemm_tflops,
    load_config,
    online_r1_signs,
    plan_format,
)
from vllm_quarot.offline.rotation import (
    fold_norms,
    fold_online_r1_signs,
    rotate_layer,
    rotate_rows_in,
)
from vllm_quarot.offline.verify import Verifier
from vllm_quarot.quant import (
    dequantize_weight,
    pack_weight,
    qmax,
    quantize_weight_rtn,
    smooth_order,
)
from vllm_quarot.stored_transforms import write_transforms
from vllm_quarot.transforms import linear_input_specs

if TYPE_CHECKING:
    from vllm_quarot.offline.spinquant import LearnedRotations

log = logging.getLogger("vllm_quarot.quantize")

__all__ = ["SCHEMES", "QuantizeError", "QuantizeOptions", "QuantizeSummary", "quantize"]

COPY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
StepHook = Callable[[str, float, dict[str, Any]], None]


@dataclasses.dataclass
class QuantizeSummary:
    out_dir: Path
    seconds: float
    peak_rss_gib: float
    checkpoint_bytes: int
    layer_errors: dict[str, float]
    verify_max_rel_err: float | None
    kv_choices: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def format(self) -> str:
        lines = [
            f"wrote {self.out_dir} ({self.checkpoint_bytes / 2**20:.1f} MiB of tensors)",
            f"time {self.seconds:.1f} s, peak RSS {self.peak_rss_gib:.2f} GiB",
        ]
        if self.layer_errors:
            worst = sorted(self.layer_errors.items(), key=lambda kv: -kv[1])[:5]
            lines.append("largest relative output errors: "
                         + ", ".join(f"{k} {v:.4f}" for k, v in worst))
        if self.kv_choices:
            r3 = [i for i, c in sorted(self.kv_choices.items()) if c["r3"]]
            shifted = sum(1 for c in self.kv_choices.values() if c["k_shift"] or c["v_shift"])
            worst_kv = max(self.kv_choices.items(), key=lambda kv: kv[1]["error"])
            lines.append(f"KV cache: R3 on {len(r3)} of {len(self.kv_choices)} layers, "
                         f"shift on {shifted}; largest attention error layer {worst_kv[0]} "
                         f"{worst_kv[1]['error']:.4f}; pivots "
                         f"{max(c.get('pivots', 0) for c in self.kv_choices.values())}")
        if self.verify_max_rel_err is not None:
            lines.append(f"verify: rotated fp64 model vs original, max rel err "
                         f"{self.verify_max_rel_err:.2e}")
        return "\n".join(lines)


def _check_tensors(src: TensorSource, cfg: Any) -> None:
    """Every tensor the architecture needs is in the checkpoint (names only: cheap).
    An untied model without lm_head falls back to the embedding, as transformers does."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    missing = sorted(set(model.state_dict()) - {f"{LM_HEAD}.weight"} - set(src.keys()))
    if missing:
        raise QuantizeError(
            f"{src.dir} lacks {len(missing)} tensor(s) of a {type(model).__name__}: "
            + ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else ""))


def quantize(model_dir: str | Path, out_dir: str | Path, o: QuantizeOptions,
             on_step: StepHook | None = None) -> QuantizeSummary:
    """Rotate and quantize model_dir (a local directory or a Hugging Face Hub id) into
    out_dir.

    Options, model and OUT_DIR are checked before anything heavy; the checkpoint is
    written into a hidden stage beside OUT_DIR and renamed to OUT_DIR only once every
    file is complete, so an interrupted run never leaves a checkpoint-looking OUT_DIR.
    """
    run = QuantizeRun(model_dir, Path(out_dir), o, on_step)
    try:
        # inside the try: an interrupt just after prepare() made .OUT_DIR.partial
        # must still clean it up (or say how to --resume)
        run.prepare()
        run.spinquant()
        with staged_dir(run.out_dir, o.overwrite) as stage:
            writer = ShardedWriter(stage, shard_bytes(o.max_shard_size))
            run.stream(writer)
            files = writer.close()
            run.finish(stage, sum(f.stat().st_size for f in files))
    except BaseException:
        if hasattr(run, "progress"):  # refused or interrupted before: nothing on disk
            run.progress.close_after_failure()
        raise
    run.progress.remove()
    return run.summary()


class QuantizeRun:
    """One quantizer run: its inputs, what it has made so far, and its named steps."""

    def __init__(self, model_dir: str | Path, out_dir: Path, o: QuantizeOptions,
                 on_step: StepHook | None = None):
        self.t0 = time.time()
        self.model_dir_arg, self.out_dir, self.o = model_dir, out_dir, o
        self.on_step = on_step
        # made by the steps, in order
        self.model_dir: Path
        self.cfg: Any
        self.family: Family
        self.plan: Plan
        self.src: TensorSource
        self.tok: Any
        self.progress: RunProgress
        self.kind: LayerKind
        self.rotations: LearnedRotations | None = None
        self._calib: list[torch.Tensor | None] = []
        self.part: dict[str, torch.Tensor] = {}  # the tensors of the part being made
        self.writer: ShardedWriter | None = None
        self.r1: torch.Tensor | None = None  # ±1 signs of R1, or a learned dense R1
        self.r2: list[torch.Tensor] | None = None  # learned per-layer R2s (SpinQuant)
        self.verifier: Verifier | None = None
        self.layer_errors: dict[str, float] = {}
        # relative output error of each sub-block's first linear from quantizing its
        # input at the scheme's activation bits (--a8-layers auto picks from these)
        self.act_errors: dict[str, float] = {}
        # --kv-calibrate: each layer's choice and its (k, v) shift vectors
        self.kv_choices: dict[int, dict[str, Any]] = {}
        self.kv_shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.checkpoint_bytes = 0
        # --r1 online: the last rotated Hessian (source, transform, Mᵀ·H·M)
        self._rot_hessian: tuple[Any, torch.Tensor, HessianAccumulator] | None = None
        # kv_cache.pivots: --kv-pivots N, or (auto) the sinks scan_sinks finds
        self.kv_pivots = o.pivots or 0

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a named step (on a GPU: its kernels included) and report it, with what
        the step adds to the yielded dict, to the on_step hook."""
        info: dict[str, Any] = {}
        if self.on_step is None:
            yield info
            return
        cuda = getattr(self, "device", torch.device("cpu")).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield info
        if cuda:
            torch.cuda.synchronize()
        self.on_step(name, time.perf_counter() - t, info)

    # ------------------------------------------------------------------ steps

    def prepare(self) -> None:
        """Options, model, output directory and the format to write: everything that can
        be refused is refused here, before any tensor is read. The run's progress
        directory is made last, so that nothing is left behind by a refusal."""
        o = self.o
        with self.step("prepare"):
            check_options(o)
            # provenance: a local directory's name, or the Hub id (@revision)
            self.source = (Path(self.model_dir_arg).name if Path(self.model_dir_arg).exists()
                           else str(self.model_dir_arg)) + (f"@{o.revision}" if o.revision
                                                            else "")
            self.model_dir = resolve_model(self.model_dir_arg, o.revision)
            self.cfg, self.family = load_config(self.model_dir)
            check_model_fits(self.cfg, o)
            self.device = resolve_device(o.device)
            self.dtype = PRECISIONS[o.precision]
            self.plan = plan_format(self.cfg, o, self.device)
            warning = tp_serving_warning(self.cfg, o.tp)
            if warning:
                log.warning(warning)
            check_output_dir(self.out_dir, o.overwrite, self.model_dir)
            self.src = TensorSource(self.model_dir)
            _check_tensors(self.src, self.cfg)
            self.tok = AutoTokenizer.from_pretrained(self.model_dir)
            self.kind = LayerKind(self.cfg, self.family, self.device)
            log.info(self.describe())
            if not o.resume:
                rate = gemm_tflops(self.device, self.cfg.hidden_size,
                                   self.cfg.intermediate_size, tokens=256, reps=1)
                eta = estimate_seconds(self.cfg, o, self.plan, rate)
                log.info("quantize: estimated %s for %d layers (float32 GEMM rate %.2f "
                         "TFLOP/s on %s, measured now; the progress bar's ETA follows "
                         "the real layers)", _duration(eta), self.cfg.num_hidden_layers,
                         rate, self.device)
            self.progress = RunProgress(self.out_dir, self._fingerprint(), o.resume)
            self.progress.open()

    def describe(self) -> str:
        """The plan, printed before the first layer."""
        o, p, q = self.o, self.plan, self.plan.fmt.quantizer
        parts = [f"{o.scheme} ({self.family.name}, {self.cfg.num_hidden_layers} layers) "
                 f"on {self.device}"]
        if o.bits[0] < 16:
            parts.append(f"weights {'GPTQ' if o.uses_gptq else 'RTN'}")
        if o.uses_calibration:
            source = q["calibration"]
            default = "" if o.nsamples and o.seqlen else (
                f" (default for {'kv4' if not o.needs_calibration else self.device.type}; "
                "--nsamples/--seqlen to change)")
            parts.append(f"calibration {source}, {p.nsamples} × {p.seqlen} tokens{default}")
        if o.calibrates_kv:
            parts.append("KV cache calibrated per layer")
        elif p.fmt.kv_cache is not None:
            parts.append("KV cache: R3 on every layer (--no-kv-calibrate)")
        return "quantize: " + "; ".join(parts)

    def calib_ids(self) -> torch.Tensor | None:
        """The calibration windows, made on first use (only when a step needs them)."""
        if not self._calib:
            with self.step("calibration"):
                self._calib.append(calibration_ids(self.model_dir, self.tok, self.o,
                                                   self.plan)
                                   if self.o.uses_calibration else None)
        return self._calib[0]

    def spinquant(self) -> None:
        """--rotate spinquant: R1 and the R2s learned on the calibration windows, kept
        with the run's progress so that --resume does not learn them again."""
        o, n_layers = self.o, self.cfg.num_hidden_layers
        if o.rotate != "spinquant":
            if self.plan.fused_r1:
                self.r1 = random_signs(self.plan.hidden, o.seed)
            return
        from vllm_quarot.offline.spinquant import LearnedRotations, learn_rotations

        if self.progress.has("rotations"):
            t = self.progress.load("rotations")
            rot = LearnedRotations(r1=t["r1"], r2=[t[f"r2.{i}"] for i in range(n_layers)],
                                   losses=t["losses"].tolist(), seconds=float(t["seconds"]))
        else:
            ids = spinquant_ids(self.tok, o, self.plan, self.calib_ids)
            assert ids is not None
            log.info("learning R1/R2 (SpinQuant, Cayley SGD): %d steps, lr %g, %s weights "
                     "in the loop, on %s", o.spinquant_steps, o.spinquant_lr,
                     "RTN" if o.spinquant_weights_in_loop else "16-bit", self.device)
            fmt = self.plan.fmt
            with self.step("spinquant"):
                rot = learn_rotations(
                    self.model_dir, ids,
                    w_bits=self.plan.w_bits if o.spinquant_weights_in_loop else 16,
                    a_bits=self.plan.a_bits,
                    kv_bits=fmt.kv_cache.bits if fmt.kv_cache else None,
                    act_clip=self.plan.act_clip, kv_clip=o.kv_clip, group_size=o.group_size,
                    seed=o.seed, steps=o.spinquant_steps, lr=o.spinquant_lr,
                    online_r4=self.plan.online_r4, r3=fmt.rotation.r3 is not None,
                    tp_blocks=o.tp, device=str(self.device))
            self.progress.save("rotations", {
                "r1": rot.r1, **{f"r2.{i}": r for i, r in enumerate(rot.r2)},
                "losses": torch.tensor(rot.losses, dtype=torch.float64),
                "seconds": torch.tensor(rot.seconds, dtype=torch.float64)}, state={})
        self.rotations = rot
        self.r1, self.r2 = rot.r1, rot.r2

    def stream(self, writer: ShardedWriter) -> None:
        """Embedding, layers, head into writer; parts a previous run finished (--resume)
        are read back from the run's progress instead of being made again."""
        self.writer = writer
        p, h_cal = self.progress, None
        if p.has("embed"):
            self._publish_part("embed")
        else:
            with self.step("embedding"):
                h_cal = self.embedding(self.calib_ids())
            self._finish_part("embed", h_cal)
        n = self.cfg.num_hidden_layers
        parts = [f"layer-{i:05d}" for i in range(n)]
        first = next((i for i, part in enumerate(parts) if not p.has(part)), n)
        for part in parts[:first]:
            self._publish_part(part)
        if p.has("embed") and h_cal is None:
            h_cal = self._restore()
        if first < n and self.o.calibrates_kv and self.o.pivots is None:
            with self.step("sinks"):
                self.scan_sinks()
        for i in tqdm(range(first, n), desc=f"quantize {self.o.scheme}", unit="layer",
                      initial=first, total=n):
            with self.step(f"layer.{i}"):
                h_cal = self.layer(i, h_cal)
            with self.step(f"save.{i}") as info:
                info["bytes"] = sum(t.numel() * t.element_size() for t in self.part.values())
                self._finish_part(parts[i], h_cal)
        with self.step("head"):
            self.head(h_cal)
        self._publish(self.part)

    def finish(self, stage: Path, checkpoint_bytes: int) -> None:
        """The format section after the choices the run made (8-bit layers, learned
        rotations, KV choices), validated, and the metadata files."""
        with self.step("finish"):
            self.checkpoint_bytes = checkpoint_bytes
            fmt = self.plan.fmt
            quantizer = dict(fmt.quantizer)
            changes: dict[str, Any] = {}
            if self.o.a8_layers is not None:
                bits = select_a8_layers(self.act_errors, self.o.a8_layers,
                                        self.cfg.num_hidden_layers)
                assert fmt.activation is not None
                changes["activation"] = fmt.activation.model_copy(
                    update={"layer_bits": dict(sorted(bits.items()))})
                # what the choice was made from (each sub-block's first linear)
                quantizer["activation_errors"] = {k: round(v, 5)
                                                  for k, v in self.act_errors.items()}
            if self.rotations is not None:
                rot, o = self.rotations, self.o
                quantizer["spinquant"] = {
                    "steps": o.spinquant_steps, "lr": o.spinquant_lr,
                    "weights_in_loop": "rtn" if o.spinquant_weights_in_loop else "float",
                    "loss_first": rot.losses[0] if rot.losses else None,
                    "loss_last": rot.losses[-1] if rot.losses else None,
                    "seconds": round(rot.seconds, 1)}
            if self.kv_choices:
                changes.update(_kv_changes(fmt, self.kv_choices))
                quantizer["kv_calibration"] = {str(i): self.kv_choices[i]
                                               for i in sorted(self.kv_choices)}
            kv_cache = changes.get("kv_cache", fmt.kv_cache)
            if kv_cache is not None and self.kv_pivots:  # IntactKV (--kv-pivots)
                changes["kv_cache"] = kv_cache.model_copy(update={"pivots": self.kv_pivots})
            quantizer["source"] = self.source
            fmt = fmt.replace(**changes, quantizer=quantizer)
            if fmt.kv_cache is not None and fmt.kv_cache.shift:
                write_kv_shift(stage, self.kv_shifts)
            if self.plan.transform_files:  # --r1 online's randomized Hadamards
                write_transforms(stage, self.plan.transform_files)
            _write_metadata(self.model_dir, stage, fmt, self.plan.out_dtype, self.o)

    def summary(self) -> QuantizeSummary:
        return QuantizeSummary(
            out_dir=self.out_dir,
            seconds=time.time() - self.t0,
            peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            checkpoint_bytes=self.checkpoint_bytes,
            layer_errors=self.layer_errors,
            verify_max_rel_err=self.verifier.max_err if self.verifier else None,
            kv_choices=self.kv_choices,
        )

    # ------------------------------------------------------------ the parts

    def embedding(self, calib_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Write the rotated embedding; return the calibration windows' hidden states
        (float32) and start the --verify models."""
        embed = self.src.get(f"{EMBED}.weight").double()
        embed_rot = rotate_rows_in(embed, self.r1) if self.r1 is not None else embed
        self._emit(f"{EMBED}.weight", embed_rot.to(self.plan.out_dtype))
        if self.o.verify:
            self.verifier = Verifier(self.tok, embed, embed_rot, self.r1)
        if calib_ids is None:
            return None
        h = activation_buffer((*calib_ids.shape, embed_rot.shape[1]), torch.float32,
                              self.spill_dir)
        for i in range(calib_ids.shape[0]):
            h[i] = embed_rot[calib_ids[i]]
        return h

    @torch.no_grad()
    def scan_sinks(self) -> None:
        """--kv-pivots auto: find the attention sinks before any layer's KV choice is made,
        so that every layer is calibrated with the pivots the checkpoint will serve. A
        layer calibrated without them and served with them can lose badly: a key error
        common to every quantized token (the 4-bit clip of a large shared key bias)
        cancels in the softmax only while the sink's key carries it too (SmolLM2's
        Qwen2.5 surrogate, layer 0: +18 % perplexity). The original model (the scores do
        not depend on R1/R2) runs over the first KV calibration windows, layer by layer."""
        ids = self.calib_ids()
        assert ids is not None
        ids = ids[:kv_calibration.MAX_WINDOWS, :kv_calibration.MAX_TOKENS]
        h = self.src.get(f"{EMBED}.weight")[ids].to(self.dtype)
        shares: list[float] = []
        for i in tqdm(range(self.cfg.num_hidden_layers), desc="attention sinks", unit="layer",
                      leave=False):
            # the family's split projections (Phi-3's fused qkv_proj), unrotated
            sd = self.family.split(self._source_layer(i), self.cfg)
            runner = LayerRunner(self.kind, i, sd, None, dtype=self.dtype, device=self.device)
            x = h.to(runner.device, runner.dtype)
            q, k, _v = kv_calibration.layer_qkv(runner.module, x, runner._position_embeddings(x))
            lead = kv_calibration.leading_attention(q.float().cpu(), k.float().cpu(),
                                                    kv_calibration.MAX_AUTO_PIVOTS)
            shares.append(lead[0])
            self.kv_pivots = max(self.kv_pivots, kv_calibration.sinks(lead))
            h = runner(h)
        log.info("KV cache: %d pivot token(s) kept exact (token 0 draws up to %.0f %% of "
                 "the attention, in layer %d)", self.kv_pivots, 100 * max(shares),
                 max(range(len(shares)), key=shares.__getitem__))

    def _source_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Decoder layer i's tensors as the input model stores them, by in-layer name."""
        prefix = layer_prefix(i)
        return {k[len(prefix):]: self.src.get(k) for k in self.src.keys() if k.startswith(prefix)}

    def layer(self, i: int, h_cal: torch.Tensor | None) -> torch.Tensor | None:
        """Fold norms, rotate, quantize and write decoder layer i; return the calibration
        hidden states after it (computed with its quantized weights).

        With calibration data the linears are quantized sequentially, as GPTQ and
        QuaRot do: q/k/v from the layer's input, then o_proj from the attention output
        of the already quantized q/k/v, then gate/up, then down_proj, each Hessian taken
        behind the sub-blocks quantized before it."""
        prefix = layer_prefix(i)
        raw = {k: v.double() for k, v in self._source_layer(i).items()}
        if self.verifier is not None:
            self.verifier.original_layer(LayerRunner(self.kind, i, raw, None, original=True))
        sd = self.family.split(raw, self.cfg)
        # the gains fold only where R1 must commute with the norm (fused R1): --r1
        # online and --rotate none keep them (plain GPTQ W4A16 g64 on the Qwen2-class
        # surrogate: folded 60.40, kept 49.13; benchmarks/results/README.md)
        if self.plan.fused_r1:
            fold_norms(sd)
        r4 = self.plan.fmt.rotation.r4
        if self.plan.rotate:
            rotate_layer(sd, self.r1, self.plan.head_dim,
                         r2=self.r2[i] if self.r2 is not None else True,
                         r4=self.plan.online_r4, r4_blocks=self.o.tp)
        if self.plan.transforms:  # --r1 online: randomize its Hadamards (exact)
            fold_online_r1_signs(sd, online_r1_signs(self.cfg, self.o.seed),
                                 self.plan.head_dim)
        if h_cal is not None and self.o.calibrates_kv:  # may fuse SmoothAttention into sd
            self.calibrate_kv(i, sd, h_cal)
        if self.verifier is not None:  # the rotated (and smoothed) layer = the original
            self.verifier.rotated_layer(LayerRunner(self.kind, i, sd, r4))
        out = None
        if h_cal is None:
            for name in LINEARS:
                self.linear(sd, prefix, name, None)
        else:
            def quantize_group(group: tuple[str, ...],
                               hessian: HessianAccumulator) -> dict[str, torch.Tensor]:
                for name in group:
                    self.linear(sd, prefix, name, hessian)
                return {name: sd[f"{name}.weight"] for name in group}

            runner = LayerRunner(self.kind, i, sd, r4, dtype=self.dtype, device=self.device)
            meter = None
            if self.o.a8_layers:  # ranked by the per-token error (smoothing orders are
                # computed in this very pass)
                meter = linear_input_specs(self.plan.fmt, [b.linears[0] for b in SUB_BLOCKS],
                                           smooth=False)
            out, errors = runner.sequential(h_cal, quantize_group, meter,
                                            spill_dir=self.spill_dir)
            self.act_errors.update({prefix + k: v for k, v in errors.items()})
            if self.o.smooth_reorders:  # each group's inputs in their smoothing order
                for group in SEQUENTIAL_GROUPS:
                    perm = smooth_order(runner.input_maxima[group[0]])
                    for name in group:
                        self._emit(f"{prefix}{name}.smooth_perm", perm.clone())
        for k, v in sd.items():
            if not any(k.startswith(n + ".") for n in LINEARS):
                self._emit(prefix + k, v.to(self.plan.out_dtype))
        return out  # the quantized layer's output feeds the next one

    def calibrate_kv(self, i: int, sd: dict[str, torch.Tensor], h_cal: torch.Tensor) -> None:
        """Choose layer i's KV4 treatment (R3, SmoothAttention, shift) on the first
        calibration windows; fuse the smoothing into sd's q/k_proj."""
        runner = LayerRunner(self.kind, i, sd, None, dtype=self.dtype, device=self.device)
        h = h_cal[:kv_calibration.MAX_WINDOWS, :kv_calibration.MAX_TOKENS]
        x = h.to(runner.device, runner.dtype)
        cos, sin = runner._position_embeddings(x)
        q, k, v = kv_calibration.layer_qkv(runner.module, x, (cos, sin))
        kv = self.plan.fmt.kv_cache
        assert kv is not None
        q, k, v = q.cpu(), k.cpu(), v.cpu()
        # the attention sinks: every window starts a sequence, so its first tokens play
        # the part they play at serving time
        lead = kv_calibration.leading_attention(q, k, kv_calibration.MAX_AUTO_PIVOTS)
        cal = kv_calibration.calibrate_layer(
            q, k, v, kv.bits, kv.clip_ratio, r3_allowed=self.plan.fmt.rotation.r3 is not None,
            smooth_allowed=not self.family.qk_norm, pivots=self.kv_pivots)
        if cal.smooth is not None:
            kv_calibration.apply_smoothing(sd, cal.smooth.double(), self.cfg.num_attention_heads)
        self.kv_choices[i] = {**cal.choice.summary(), "pivots": self.kv_pivots,
                              "leading_attention": [round(x, 4) for x in lead]}
        self.kv_shifts[i] = (cal.k_shift, cal.v_shift)

    def linear(self, sd: dict[str, torch.Tensor], prefix: str, name: str,
               hessian: HessianAccumulator | None) -> None:
        """Quantize one linear (GPTQ or RTN) and write its packed codes, scales, static
        input scale and bias; sd's weight becomes the dequantized one."""
        o, plan, key = self.o, self.plan, f"{prefix}{name}"
        w = sd[f"{name}.weight"]
        m = plan.transforms.get(name)  # --r1 online: quantize W·M, the runtime's x·M input
        if m is not None:
            w = w @ m.to(w.dtype)
            hessian = self._rotated_hessian(hessian, m) if hessian is not None else None
        if plan.w_bits >= 16:
            self._emit(f"{key}.weight", w.to(plan.out_dtype))
        else:
            deq = self._quantize_weight(key, w, plan.w_bits, o.group_size, hessian)
            # the calibration forward runs on unrotated inputs: (W·M)_q·Mᵀ
            sd[f"{name}.weight"] = deq if m is None else deq @ m.t().to(deq.dtype)
            if o.static:  # max calibration, as AMD Quark's per-tensor static W8A8
                assert hessian is not None and plan.a_bits is not None
                amax = torch.tensor([hessian.amax * plan.act_clip], dtype=torch.float32)
                self._emit(f"{key}.input_scale", (amax / qmax(plan.a_bits)).clamp(min=1e-12))
        if f"{name}.bias" in sd:
            self._emit(f"{key}.bias", sd[f"{name}.bias"].to(plan.out_dtype))

    def _rotated_hessian(self, hessian: HessianAccumulator,
                         m: torch.Tensor) -> HessianAccumulator:
        """The Hessian of x·M from that of x: Mᵀ·H·M (once per group: q/k/v and gate/up
        share their input and its transform)."""
        cached = self._rot_hessian
        if cached is not None and cached[0] is hessian and cached[1] is m:
            return cached[2]
        md = m.to(hessian.h.device, torch.float64)
        rot = HessianAccumulator(md.shape[0], hessian.h.device)
        rot.h, rot.n, rot.amax = md.t() @ hessian.h @ md, hessian.n, float("nan")
        self._rot_hessian = (hessian, m, rot)
        return rot

    def _quantize_weight(self, key: str, w: torch.Tensor, bits: int, group_size: int,
                         hessian: HessianAccumulator | None) -> torch.Tensor:
        """GPTQ (with a Hessian) or RTN codes of w; writes key's packed codes and scales,
        records its output error; returns the dequantized weight (float64)."""
        o = self.o
        # the maths (GPTQ, clip search) on the quantizer's device, where the Hessian is;
        # codes, scales and the dequantized weight come back to the host for writing
        w_dev = w.to(self.device, torch.float64)
        if o.uses_gptq:
            assert hessian is not None
            q, s = gptq_quantize(w_dev, hessian.h, bits, group_size, o.w_clip, o.damp,
                                 act_order=o.act_order, dynamic_groups=o.dynamic_groups)
        else:
            q, s = quantize_weight_rtn(w_dev, bits, group_size, o.w_clip)
        deq = dequantize_weight(q, s, group_size, torch.float64)
        self.layer_errors[key] = _weight_error(w_dev, deq, hessian)
        q, s, deq = q.cpu(), s.cpu(), deq.cpu()
        self._emit(f"{key}.weight_packed", pack_weight(q, bits))
        self._emit(f"{key}.weight_scale", s)
        return deq

    def head(self, h_cal: torch.Tensor | None) -> None:
        """Write the final norm and the (untied, rotated) lm_head (--lm-head: quantized,
        GPTQ on the final normalised calibration states when the layers use GPTQ);
        finish --verify on the logits. The final norm's gain folds into the head only
        under the fused R1 (as the layers' gains, see layer())."""
        g_final = self.src.get(f"{FINAL_NORM}.weight").double()
        name = f"{LM_HEAD}.weight" if f"{LM_HEAD}.weight" in self.src else f"{EMBED}.weight"
        head = self.src.get(name).double()
        fold = self.plan.fused_r1
        g_kept = torch.ones_like(g_final) if fold else g_final
        head_rot = head * g_final if fold else head
        if self.r1 is not None:
            head_rot = rotate_rows_in(head_rot, self.r1)
        self._emit(f"{FINAL_NORM}.weight", g_kept.to(self.plan.out_dtype))
        spec = self.plan.fmt.lm_head
        if spec is None:
            self._emit(f"{LM_HEAD}.weight", head_rot.to(self.plan.out_dtype))
        else:
            hessian = None
            if self.o.uses_gptq:
                assert h_cal is not None
                # the lm_head's input: the final RMSNorm's output, on the quantizer's
                # device like the layers' Hessians
                hessian = HessianAccumulator(head_rot.shape[1], self.device)
                norm = RMSNorm64(head_rot.shape[1], self.cfg.rms_norm_eps).to(
                    self.device, self.dtype)
                with torch.no_grad():
                    norm.weight.copy_(g_kept)
                    for i in range(h_cal.shape[0]):
                        hessian.add(norm(h_cal[i].to(self.device, self.dtype)))
            self._quantize_weight(LM_HEAD, head_rot, spec.bits, spec.group_size, hessian)
        if self.verifier is not None:
            self.verifier.finish(self.cfg.rms_norm_eps, g_final, head, head_rot, g_kept)

    # ------------------------------------------------------ progress, output

    @property
    def spill_dir(self) -> Path:
        return self.progress.dir / "spill"

    def _emit(self, name: str, t: torch.Tensor) -> None:
        self.part[name] = t

    def _finish_part(self, name: str, h_cal: torch.Tensor | None) -> None:
        """Persist the part just made (its linears under the checkpoint's names: fused
        ones concatenated) with the state the next one starts from, then hand its
        tensors to the writer (as read back, as a resumed run would)."""
        state_tensors = {} if h_cal is None else {"h_cal": h_cal}
        for i, (k, v) in self.kv_shifts.items():
            state_tensors.update({f"kv.{i}.k_shift": k, f"kv.{i}.v_shift": v})
        if self.verifier is not None:
            state_tensors.update({"verify.h_orig": self.verifier.h_orig,
                                  "verify.h_rot": self.verifier.h_rot})
        state = {"layer_errors": self.layer_errors, "act_errors": self.act_errors,
                 "kv_choices": {str(i): c for i, c in self.kv_choices.items()},
                 "verify_max_err": self.verifier.max_err if self.verifier else None}
        self.progress.save(name, self.family.fuse(self.part), state, state_tensors)
        self.part = {}
        self._publish_part(name)

    def _publish_part(self, name: str) -> None:
        self._publish(self.progress.load(name))

    def _publish(self, tensors: dict[str, torch.Tensor]) -> None:
        assert self.writer is not None
        for k in sorted(tensors):  # one order whether made now or read back
            self.writer.add(k, tensors[k])

    def _restore(self) -> torch.Tensor | None:
        """The state after the last finished part: calibration hidden states, errors
        so far and the --verify models' hidden states."""
        st, t = self.progress.state, self.progress.state_tensors()
        self.layer_errors = dict(st.get("layer_errors") or {})
        self.act_errors = dict(st.get("act_errors") or {})
        self.kv_choices = {int(i): c for i, c in (st.get("kv_choices") or {}).items()}
        self.kv_pivots = max([self.kv_pivots, *(c.get("pivots", 0)
                                                for c in self.kv_choices.values())])
        self.kv_shifts = {i: (t[f"kv.{i}.k_shift"], t[f"kv.{i}.v_shift"])
                          for i in self.kv_choices}
        if self.o.verify:
            self.verifier = Verifier.restored(
                t["verify.h_orig"], t["verify.h_rot"], self.r1, st.get("verify_max_err") or 0.0)
        if "h_cal" not in t:
            return None
        h = activation_buffer(tuple(t["h_cal"].shape), t["h_cal"].dtype, self.spill_dir)
        h.copy_(t["h_cal"])
        return h

    def _fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one: every option that
        changes the output, the input model (config and weight files) and this version."""
        o = self.o
        opts = {k: v for k, v in dataclasses.asdict(o).items()
                if k not in ("overwrite", "resume")}
        opts["device"] = resolve_device(o.device).type
        files = sorted({p.name: p.stat().st_size for p in set(self.src.where.values())}.items())
        return {"options": opts, "model": str(self.model_dir.resolve()),
                "config_sha256": hashlib.sha256(
                    (self.model_dir / "config.json").read_bytes()).hexdigest(),
                "weight_files": files, "version": __version__}


# --a8-layers auto: a sub-block whose 4-bit activation error is this many times the
# median of its kind (q/k/v, o_proj, gate/up, down_proj) over the layers
A8_AUTO_FACTOR = 2.0
_GROUP_OF = {b.linears[0]: b.linears for b in SUB_BLOCKS}


def select_a8_layers(act_errors: dict[str, float], spec: str,
                     n_layers: int) -> dict[str, int]:
    """The linears whose inputs stay at 8 bits: every linear of each chosen sub-block
    (q/k/v and gate/up share their input). act_errors maps each sub-block's first
    linear (model.layers.i.self_attn.q_proj, ...) to its relative output error."""
    choice = parse_a8_layers(spec)
    if isinstance(choice, list):
        firsts = []
        for name in choice:
            layer = layer_index(name)
            leaf = name.rpartition(".")[2]
            block = next((b for b in SUB_BLOCKS if any(n.endswith(leaf) for n in b.linears)),
                         None)
            if block is None or layer is None or not 0 <= layer < n_layers:
                raise QuantizeError(f"--a8-layers: {name} is not a linear of this model "
                                    f"({n_layers} layers)")
            firsts.append(layer_prefix(layer) + block.linears[0])
    else:
        score = _a8_scores(act_errors)
        ranked = sorted(score, key=lambda k: -score[k])
        if choice == "auto":
            firsts = [k for k in ranked if score[k] > A8_AUTO_FACTOR]
        else:
            firsts = ranked[: int(choice)]
        for k in ranked[: max(len(firsts), 5)]:
            log.info("activation error %s: %.4f (%.2f× the median of its kind)%s", k,
                     act_errors[k], score[k], " -> 8-bit" if k in firsts else "")
    out = {}
    for first in firsts:
        i = layer_index(first)
        assert i is not None
        for name in _GROUP_OF[first[len(layer_prefix(i)):]]:
            out[layer_prefix(i) + name] = 8
    return out


def _a8_scores(act_errors: dict[str, float]) -> dict[str, float]:
    """Each sub-block's activation error over the median of its kind."""
    by_kind: dict[str, list[float]] = {}
    for k, v in act_errors.items():
        by_kind.setdefault(k.split(".", 3)[3], []).append(v)
    med = {kind: sorted(v)[len(v) // 2] for kind, v in by_kind.items()}
    return {k: v / max(med[k.split(".", 3)[3]], 1e-12) for k, v in act_errors.items()}


def _kv_changes(fmt: QuaRotFormat, choices: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The format's changes after --kv-calibrate: R3 on the layers that chose it, shifts
    when any layer shifts."""
    assert fmt.kv_cache is not None
    r3 = fmt.rotation.r3
    if r3 is not None:
        r3 = r3.model_copy(update={"layers": tuple(i for i in sorted(choices)
                                                   if choices[i]["r3"])})
    shift = any(c["k_shift"] or c["v_shift"] for c in choices.values())
    return {"kv_cache": fmt.kv_cache.model_copy(update={"shift": shift}),
            "rotation": fmt.rotation.model_copy(update={"r3": r3})}


def _weight_error(w: torch.Tensor, deq: torch.Tensor, h: HessianAccumulator | None) -> float:
    """Relative output error ‖(W-Ŵ)X‖/‖WX‖ (via H), or relative weight error w/o data."""
    d = w - deq
    if h is None:
        return (d.norm() / w.norm()).item()
    d, w = d.to(h.h.device), w.to(h.h.device)
    num = torch.einsum("ij,jk,ik->", d, h.h, d)
    den = torch.einsum("ij,jk,ik->", w, h.h, w)
    return (num / den).clamp(min=0).sqrt().item()


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 \
        else f"{s:.0f} s"


def _r4_text(fmt: QuaRotFormat) -> str:
    r4 = fmt.rotation.r4
    if r4 is None:
        return "off"
    return str(r4.size) if r4.blocks == 1 else f"{r4.blocks} blocks of {r4.block_size}"


def _write_metadata(model_dir: Path, out_dir: Path, fmt: QuaRotFormat, dtype: torch.dtype,
                    o: QuantizeOptions) -> None:
    cfg_dict = json.loads((model_dir / "config.json").read_text())
    cfg_dict["tie_word_embeddings"] = False
    cfg_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg_dict.pop("dtype", None)
    cfg_dict["quantization_config"] = fmt.to_dict()
    (out_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    for name in COPY_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    q = fmt.quantizer
    r1_online = (" (--r1 online: randomized Hadamards after the norms, on q/k/v, gate/up, "
                 "o_proj)" if fmt.rotation.input_transforms else "")
    card = f"""# QuaRot {fmt.scheme} checkpoint

Made by vllm-quarot {__version__} from `{q.get("source", model_dir.name)}`.

| | |
|---|---|
| scheme | `{fmt.scheme}` |
| weights | {fmt.weight.bits}-bit, {fmt.weight.method}, group size {fmt.weight.group_size} |
| activations | {fmt.activation or "16-bit"} |
| KV cache | {fmt.kv_cache or "16-bit"} |
| lm_head | {fmt.lm_head.name + " (" + fmt.lm_head.method + ")" if fmt.lm_head else "16-bit"} |
| rotation | {o.rotate}{r1_online}, R1 seed {o.seed}, online R4 {_r4_text(fmt)} |
| tensor-parallel blocks | {fmt.tp_blocks} (same numbers at every TP size dividing it) |
| calibration | {q["calibration"]} ({q["nsamples"]} × {q["seqlen"]} tokens) |

Serve it with `vllm serve THIS_DIR --quantization quarot` (vllm-quarot installed).
"""
    (out_dir / "README.md").write_text(card)
