"""What a quantizer run will do, decided before any tensor is read: the model's family
and config, and the checkpoint format it writes (``plan_format``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from vllm_quarot import __version__
from vllm_quarot.format import (
    ActivationSpec,
    InputTransform,
    KVCacheSpec,
    LMHeadSpec,
    OnlineHadamard,
    QuaRotFormat,
    R1Spec,
    R2Spec,
    RotationSpec,
    SmoothSpec,
    WeightSpec,
)
from vllm_quarot.hadamard import (
    HadamardSizeError,
    factorize,
    hadamard_matrix,
    has_hadamard,
    random_signs,
)
from vllm_quarot.models import Family, UnsupportedModelError, family_of, head_dim
from vllm_quarot.offline.options import LM_HEADS, QuantizeError, QuantizeOptions
from vllm_quarot.stored_transforms import matrix_sha256


def load_config(model_dir: Path) -> tuple[Any, Family]:
    """The model's config and family; refused unless it is a supported, not yet
    quantized model."""
    if not (model_dir / "config.json").is_file():
        raise QuantizeError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(model_dir)
    try:
        family = family_of(cfg)
    except UnsupportedModelError as e:
        raise QuantizeError(str(e)) from None
    if getattr(cfg, "quantization_config", None):
        raise QuantizeError(f"{model_dir} is already quantized; start from a 16/32-bit model")
    return cfg, family


@dataclasses.dataclass(frozen=True)
class Plan:
    """The checkpoint's format section and the sizes and switches of the run."""

    fmt: QuaRotFormat
    w_bits: int
    a_bits: int | None
    hidden: int
    head_dim: int
    rotate: bool  # R1 (and R2) folded into the weights
    online_r4: bool  # R4 folded into down_proj's input and applied online
    act_clip: float
    out_dtype: torch.dtype
    nsamples: int  # calibration windows (resolved: --nsamples or the default budget)
    seqlen: int
    # --r1 online: each rotated linear's normalised input transform H / √n (float64),
    # by in-layer name (``self_attn.q_proj``); the ±1 matrices go to TRANSFORMS_FILE;
    # the random signs that make them randomized Hadamards (``online_r1_signs``) are
    # folded into the weights and norm gains instead
    transforms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    transform_files: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def fused_r1(self) -> bool:
        """R1 on the residual stream, norm gains folded (not --r1 online)."""
        return self.rotate and not self.transforms


# --r1 online: the linears each Hadamard sits in front of (one matrix per input size,
# the same in every layer; vLLM's merged qkv / gate_up share theirs)
ONLINE_R1 = (("r1_hidden", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                            "mlp.gate_proj", "mlp.up_proj")),
             ("r1_o_in", ("self_attn.o_proj",)))


def online_r1_matrices(cfg: Any, tp: int = 1) -> dict[str, torch.Tensor]:
    """--r1 online: name -> the ±1 matrix H of this version's Hadamard of the input size
    (the runtime applies it as R4 is applied, fused into the 4-bit kernels' quantizer).
    o_proj's input, which tensor parallelism splits, gets one per --tp block (the
    runtime runs it block-diagonally, I_tp ⊗ H, as the tensor-parallel R4); q/k/v and
    gate/up read the whole hidden state on every rank."""
    sizes = {"r1_hidden": cfg.hidden_size,
             "r1_o_in": cfg.num_attention_heads * head_dim(cfg) // tp}
    return {name: hadamard_matrix(n, torch.float32, normalized=False)
            for name, n in sizes.items()}


def _block_diagonal(h: torch.Tensor, blocks: int) -> torch.Tensor:
    """I_blocks ⊗ H/√n in float64: the normalised transform of a whole input."""
    m = h.double() / h.shape[0] ** 0.5
    return torch.block_diag(*[m] * blocks) if blocks > 1 else m


def online_r1_signs(cfg: Any, seed: int) -> dict[str, torch.Tensor]:
    """--r1 online: the random ±1 diagonals D that make each H a randomized Hadamard
    D·H, folded into the layer (``rotation.fold_online_r1_signs``): the input norm's
    and the post-attention norm's gains (and their linears' columns), and v_proj's rows
    (o_proj's input signs follow, repeated over the query heads of each KV head)."""
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return {"input_layernorm": random_signs(cfg.hidden_size, seed + 7919),
            "post_attention_layernorm": random_signs(cfg.hidden_size, seed + 2 * 7919),
            "v_proj": random_signs(kv * head_dim(cfg), seed + 3 * 7919)}


def _output_dtype(cfg: Any) -> torch.dtype:
    return torch.float16 if getattr(cfg, "dtype", None) == torch.float16 else torch.bfloat16


def plan_format(cfg: Any, o: QuantizeOptions, device: torch.device) -> Plan:
    """The QuaRotFormat this run writes; impossible Hadamard orders are refused here."""
    w_bits, a_bits, kv_bits = o.bits
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    hd = head_dim(cfg)
    rotate = o.rotate != "none"
    online_r4 = o.online_r4
    r3 = o.online_rotations and kv_bits is not None
    online_r1 = rotate and o.r1_online
    o_in = cfg.num_attention_heads * hd // o.tp  # o_proj's input on one rank
    if online_r1 and o.r1 == "auto" and not has_hadamard(o_in):
        online_r1 = False  # auto: o_proj's (per-rank) input has no Hadamard; R1 fused
    try:
        if rotate:
            factorize(hidden)
            factorize(hd)
        if online_r1:
            factorize(o_in)
        if online_r4:
            factorize(inter // o.tp)
    except HadamardSizeError as e:
        raise QuantizeError(str(e)) from e
    nsamples, seqlen = o.budget(device)
    seqlen = min(seqlen, getattr(cfg, "max_position_embeddings", None) or seqlen)
    calibration = (f"file:{Path(o.calib).name}" if o.calib
                   else f"self-generated:{o.self_samples}" if o.self_samples else "none")
    act_clip = o.activation_clip
    files = online_r1_matrices(cfg, o.tp) if online_r1 else {}
    records = tuple(InputTransform(name=name, size=files[name].shape[0], linears=linears,
                                   sha256=matrix_sha256(files[name]))
                    for name, linears in ONLINE_R1 if name in files)
    fmt = QuaRotFormat(
        scheme=o.scheme,
        weight=WeightSpec(bits=w_bits, group_size=o.group_size,
                          method=o.weight_method if w_bits < 16 else "none"),
        activation=None if a_bits is None else ActivationSpec(
            bits=a_bits, clip_ratio=act_clip,
            dynamic="static-per-tensor" if o.static else "per-token",
            smooth=None if o.smooth is None else SmoothSpec(
                method=o.smooth, group_size=o.smooth_group, maxima="token",
                reorder=o.smooth_reorder, factor_levels=o.smooth_factor_levels)),
        kv_cache=None if kv_bits is None else KVCacheSpec(bits=kv_bits, clip_ratio=o.kv_clip),
        rotation=RotationSpec(
            r1=R1Spec(kind=("cayley-learned" if o.rotate == "spinquant"
                            else "randomized-hadamard" if rotate and not online_r1
                            else "none"),
                      seed=o.seed, size=hidden if rotate and not online_r1 else 0),
            r2=R2Spec(size=hd) if rotate else None,
            r3=OnlineHadamard.of_size(hd) if r3 else None,
            r4=OnlineHadamard.of_size(inter, o.tp) if online_r4 else None,
            input_transforms=records,
        ),
        tp_blocks=o.tp,
        lm_head=lm_head_spec(o),
        ignore=("lm_head",) if o.lm_head_scheme == "none" else (),
        quantizer={
            "name": "vllm-quarot",
            "version": __version__,
            "scheme": o.scheme,
            "weight_method": o.weight_method,
            "calibration": calibration,
            "nsamples": nsamples if o.calib else (o.self_samples or nsamples),
            "seqlen": seqlen,
            "w_clip": o.w_clip,
            "act_order": o.act_order,
            "dynamic_groups": o.dynamic_groups,
            "rotate": o.rotate,
            **({"r1": "online"} if online_r1 else {}),
            "a8_layers": o.a8_layers,
            "precision": o.precision,
            "online_hadamard": o.online_hadamard,
            "kv_calibrate": o.calibrates_kv,
            "lm_head": o.lm_head_scheme,
        },
    )
    linear_m = {lin: _block_diagonal(files[name], o.tp if name == "r1_o_in" else 1)
                for name, linears in ONLINE_R1 if name in files for lin in linears}
    return Plan(fmt, w_bits, a_bits, hidden, hd, rotate, online_r4, act_clip,
                _output_dtype(cfg), nsamples if o.calib else (o.self_samples or nsamples),
                seqlen, linear_m, files)


def lm_head_spec(o: QuantizeOptions) -> LMHeadSpec | None:
    bits = LM_HEADS[o.lm_head_scheme]
    if bits is None:
        return None
    return LMHeadSpec(bits=bits[0], group_size=o.group_size, activation_bits=bits[1],
                      method=o.weight_method)


def gemm_tflops(device: str | torch.device, hidden: int, inter: int, tokens: int = 1024,
                reps: int = 3) -> float:
    """Measured float32 GEMM rate (TFLOP/s, best of reps) of this device on a layer's
    two largest products (tokens × hidden → inter, tokens × inter → hidden): what the
    calibration forward passes and Hessians run on."""
    import time

    dev = torch.device(device)
    x = torch.randn(tokens, hidden, device=dev)
    w1, w2 = torch.randn(inter, hidden, device=dev), torch.randn(hidden, inter, device=dev)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.nn.functional.linear(torch.nn.functional.linear(x, w1), w2)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * 2 * tokens * hidden * inter / best / 1e12


def estimate_seconds(cfg: Any, o: QuantizeOptions, plan: Plan, rate_tflops: float) -> float:
    """A rough duration of the layer-by-layer work at this GEMM rate: the calibration
    forwards (the sequential pass is about 1.5 of them), the Hessians, GPTQ (float64)
    and the clip search, per layer, times the depth. tqdm's per-layer ETA replaces it
    once the first layer is done."""
    from vllm_quarot.models import linear_sizes

    sizes = linear_sizes(cfg)
    params = sum(n * k for n, k in sizes.values())
    flops = 0.0
    if o.uses_calibration:
        tokens = plan.nsamples * plan.seqlen
        flops += 2 * tokens * params * (1.5 if o.needs_calibration else 1.0)
        if o.needs_calibration:
            inputs = {k for _n, k in sizes.values()}
            flops += sum(2 * tokens * k * k for k in inputs)
    if o.uses_gptq:  # float64: about half the float32 rate
        flops += 2 * sum(2 * n * k * k + k**3 for n, k in sizes.values())
    if o.w_clip and plan.w_bits < 16:
        flops += 80 * 6 * params
    per_layer = flops / (max(rate_tflops, 1e-4) * 1e12)
    return per_layer * cfg.num_hidden_layers
