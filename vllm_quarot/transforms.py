"""What the runtime does online, installed on a transformers model: the one place where
the online rotations and the activation / KV fake quantization are written.

Around each quantized linear the vLLM plugin (``runtime/``) computes
``x → R4 (down_proj only) → quantize per token (or per (token, block) on the
row-parallel linears of a tensor-parallel checkpoint, or with a static scale, or with
Rotated Runtime Smooth: per (token, group of channels in the smoothing order))``, and in
the KV cache ``keys, values → minus their shift → R3 on queries and keys → 4-bit per
token and head (float16 for the first kv_cache.pivots tokens)``. ``linear_input_specs``
/ ``kv_spec`` derive these from a checkpoint format, ``install_linear_inputs`` /
``install_kv_attention`` put them on a transformers model as forward pre-hooks and an
attention function. Their users:

- the simulation (``eval/simulate.py``): the reference that vLLM's outputs are tested
  against;
- SpinQuant's training (``offline/spinquant.py``): the same numerics with
  straight-through gradients, so that the rotations are learned against the model that
  is served (block-diagonal R4 and per-block scales under ``--tp``);
- the quantizer's layer runner (``offline/layer_runner.py``): R4 only (calibration runs
  16-bit activations), and the activation-error meter of ``--a8-layers``;
- the KV calibration (``offline/kv_calibration.py``): the KV quantizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_quarot.format import OnlineHadamard, QuaRotFormat
from vllm_quarot.hadamard import block_hadamard_transform, hadamard_factor, hadamard_transform
from vllm_quarot.models import DOWN_PROJ, LM_HEAD, ROW_PARALLEL, canonical_parts
from vllm_quarot.quant import (
    fake_quantize_asym,
    fake_quantize_per_token_blocks,
    fake_smooth_quantize,
    quantize_static,
    smooth_factor_levels,
)
from vllm_quarot.stored_transforms import apply_matrix, is_plain_hadamard

Active = Callable[[], bool]


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """xq's value with x's (identity) gradient: the straight-through estimator."""
    return x + (xq - x).detach()


@dataclass(frozen=True)
class LinearInputSpec:
    """What happens to one linear's input before its integer GEMM."""

    r4: OnlineHadamard | None = None  # the online Hadamard (down_proj), block-diagonal
    bits: int | None = None  # None: 16-bit activations
    clip: float = 1.0
    blocks: int = 1  # one scale per (token, block of K_PROJ/blocks): TP row-parallel inputs
    static_scale: torch.Tensor | None = None  # calibrated per-tensor scale [1]
    # Rotated Runtime Smooth (activation.smooth): channels per smoothing group (0: off)
    # and the channel order (smooth_perm; None: natural order)
    smooth_group: int = 0
    smooth_perm: torch.Tensor | None = None
    smooth_levels: int = 0  # integer smoothing factors 1..L (quant.smooth_factor_levels)
    # an imported checkpoint's stored online transform (normalised; block-diagonal)
    matrix: torch.Tensor | None = None
    # the stored matrix is this version's plain Hadamard (``quantize --r1 online``): over
    # a whole input the runtime runs it as R4 (HadamardTransform), and so does this, in
    # the same order of float operations (a dense product rounds differently, and the
    # first token's attention output, one row of 4-bit values, sits on exact ties)
    plain_hadamard: bool = False

    def matrix_runs_as_r4(self, k: int) -> bool:
        """The stored matrix is a plain Hadamard over the whole input of k channels, or
        over each of its tensor-parallel blocks."""
        return (self.plain_hadamard and self.matrix is not None
                and self.matrix.shape[0] * self.blocks == k)

    def hadamard_blocks(self, k: int) -> tuple[int, int] | None:
        """(order of one block, blocks) of the Hadamard run before the quantizer on an
        input of k channels, as the runtime runs R4: R4 itself or a stored matrix that
        runs as it does; None: none."""
        if self.r4 is not None:
            return self.r4.block_size, self.r4.blocks
        return (k // self.blocks, self.blocks) if self.matrix_runs_as_r4(k) else None


def linear_input_specs(fmt: QuaRotFormat, names: Iterable[str],
                       input_scales: dict[str, torch.Tensor] | None = None,
                       override: dict[str, int | None] | None = None,
                       smooth_perms: dict[str, torch.Tensor] | None = None,
                       smooth: bool = True,
                       matrices: dict[str, torch.Tensor] | None = None,
                       ) -> dict[str, LinearInputSpec]:
    """The runtime's treatment of each named module's input (canonical, fused or
    ``lm_head`` names). override (analysis only) maps a name suffix (``down_proj``,
    ``layers.29.mlp.down_proj``) to other activation bits, None = 16-bit. With
    ``activation.smooth`` the decoder layers' linears smooth their inputs (smooth_perms:
    each one's ``smooth_perm`` tensor when ``reorder``); smooth=False quantizes them per
    token instead (the quantizer's --a8-layers ranking, measured before the orders
    exist). matrices: ``stored_transforms.read_transforms`` of a checkpoint with
    ``rotation.input_transforms``."""
    act, r4 = fmt.activation, fmt.rotation.r4
    static = act is not None and act.static
    rrs = act.smooth if act is not None and smooth else None
    specs = {}
    for name in names:
        group, perm, levels = 0, None, 0
        if name == LM_HEAD:
            assert fmt.lm_head is not None
            bits, clip, blocks, scale = fmt.lm_head.activation_bits, 1.0, 1, None
        else:
            bits, clip = act.for_module(name) if act is not None else (None, 1.0)
            row_parallel = any(p.endswith(ROW_PARALLEL) for p in canonical_parts(name))
            blocks = fmt.tp_blocks if row_parallel else 1
            scale = None
            if static:
                scale = (input_scales or {}).get(name)
                if scale is None:
                    from vllm_quarot.errors import CheckpointFormatError

                    raise CheckpointFormatError(
                        f"{name}.input_scale is missing from the checkpoint")
            if rrs is not None:
                group = rrs.group_size
                levels = smooth_factor_levels(rrs.factor_levels, bits)
                perm = (smooth_perms or {}).get(name) if rrs.reorder else None
                if rrs.reorder and perm is None:
                    from vllm_quarot.errors import CheckpointFormatError

                    raise CheckpointFormatError(
                        f"{name}.smooth_perm is missing from the checkpoint")
        for suffix, b in (override or {}).items():
            if name.endswith(suffix):
                bits = b
        stored = fmt.rotation.input_transform(name) if name != LM_HEAD else None
        specs[name] = LinearInputSpec(
            r4=r4 if name.endswith(DOWN_PROJ) else None, bits=bits, clip=clip, blocks=blocks,
            static_scale=scale, smooth_group=group,
            smooth_perm=None if perm is None else perm.long(), smooth_levels=levels,
            matrix=None if stored is None else (matrices or {})[stored.name],
            plain_hadamard=stored is not None and is_plain_hadamard(stored.sha256, stored.size))
    return specs


def transform_input(x: torch.Tensor, spec: LinearInputSpec, had_k: torch.Tensor | None = None,
                    ste: bool = False, quantize: bool = True) -> torch.Tensor:
    """The input as the runtime's kernel sees it: R4 (computed in float32 at least, as
    the kernels do) or the stored transform, then the activation fake quantization
    (when quantize)."""
    if spec.matrix is not None and not spec.matrix_runs_as_r4(x.shape[-1]):
        x = apply_matrix(x, spec.matrix)
    had = spec.hadamard_blocks(x.shape[-1])
    if had is not None:
        if had_k is None:
            had_k = hadamard_factor(had[0], torch.float32).to(x.device)
        dtype = x.dtype
        x = block_hadamard_transform(x if dtype == torch.float64 else x.float(),
                                     had[1], had_k.to(x.device)).to(dtype)
    if not quantize or spec.bits is None:
        return x
    with torch.no_grad():
        if spec.static_scale is not None:
            s = spec.static_scale.to(x.device)
            xq = (quantize_static(x.detach(), s, spec.bits).float() * s).to(x.dtype)
        elif spec.smooth_group:
            perm = None if spec.smooth_perm is None else spec.smooth_perm.to(x.device)
            xq = fake_smooth_quantize(x.detach(), spec.bits, spec.clip, spec.smooth_group,
                                      perm, spec.smooth_levels)
        else:
            xq = fake_quantize_per_token_blocks(x.detach(), spec.bits, spec.clip, spec.blocks)
    return _ste(x, xq) if ste else xq


def install_linear_inputs(model: torch.nn.Module, specs: dict[str, LinearInputSpec],
                          ste: bool = False, active: Active | None = None,
                          quantize: bool = True) -> list:
    """A forward pre-hook on each named module applying its spec; ``active`` (when
    given) switches the quantization (not the rotations, which the weights carry) off
    while it returns False. Returns the hook handles."""
    handles = []
    for name, spec in specs.items():
        mod = model.get_submodule(name)
        had_k = None
        had = spec.hadamard_blocks(getattr(mod, "in_features", 0))
        if had is not None:
            p = next(iter(mod.parameters()), None)
            dtype = torch.float64 if p is not None and p.dtype == torch.float64 else \
                torch.float32
            had_k = hadamard_factor(had[0], dtype)
            if p is not None:
                had_k = had_k.to(p.device)

        def hook(_m, args, spec=spec, had_k=had_k):
            on = quantize and (active is None or active())
            return (transform_input(args[0], spec, had_k, ste=ste, quantize=on),)

        handles.append(mod.register_forward_pre_hook(hook))
    return handles


# ----------------------------------------------------------------------- KV cache


@dataclass(frozen=True)
class KVSpec:
    """The 4-bit KV cache: bits, clip, R3 (on the layers it applies to), the
    per-layer key/value shifts (layer -> (k, v) [kv_heads, head_dim]) or None, and the
    pivots: the first ``pivots`` tokens of every sequence keep float16 keys and values
    (kv_cache.pivots, IntactKV; 0: none)."""

    bits: int
    clip: float
    r3: OnlineHadamard | None
    shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    pivots: int = 0
    # analysis only (the simulation's accuracy rows; nothing serves them): keys "int8"
    # (8-bit per token and head, vLLM's turboquant_k8v4 point) or "channel" (4-bit per
    # channel over each 16-token page, KIVI's keys) instead of 4-bit per token
    keys: str | None = None


def kv_spec(fmt: QuaRotFormat, shifts=None) -> KVSpec | None:
    kv = fmt.kv_cache
    if kv is None:
        return None
    return KVSpec(kv.bits, kv.clip_ratio, fmt.rotation.r3, shifts if kv.shift else None,
                  kv.pivots)


def kv_fake_quant(x: torch.Tensor, bits: int, clip: float, ste: bool = False,
                  pivots: int = 0) -> torch.Tensor:
    """Keys or values [..., T, D] (T from a sequence's first token) as the 4-bit cache
    returns them: asymmetric per token and head, except the first ``pivots`` tokens,
    which the cache keeps in float16 (kv_cache.pivots)."""
    with torch.no_grad():
        xq = _keep_pivots(fake_quantize_asym(x.detach(), bits, clip), x.detach(), pivots)
    return _ste(x, xq) if ste else xq


def _keep_pivots(xq: torch.Tensor, x: torch.Tensor, pivots: int) -> torch.Tensor:
    """xq with its first ``pivots`` positions replaced by x's, in float16 as the cache
    keeps them (kv_cache.pivots)."""
    if pivots:
        xq[..., :pivots, :] = x[..., :pivots, :].half().to(xq.dtype)
    return xq


def quantize_kv_states(layer: int, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, spec: KVSpec, ste: bool = False,
                       quantize: bool = True,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(query, key, value, value shift to add back or None) after RoPE, as the cache
    attends: keys and values minus their shift, R3 on queries and keys (float32),
    fake-quantized keys and values but for the pivots (the first ``spec.pivots``
    positions: T must start at the sequence's first token). Shapes
    [B, heads or kv_heads, T, D]."""
    dtype = key.dtype
    k, v = key.float(), value.float()
    v_add = None
    if spec.shifts is not None:
        k_shift, v_shift = spec.shifts[layer]
        k = k - k_shift.to(k.device)[:, None, :]
        v = v - v_shift.to(v.device)[:, None, :]
        v_add = v_shift
    if spec.r3 is not None and spec.r3.applies_to(layer):
        had = hadamard_factor(query.shape[-1], torch.float32).to(query.device)
        query = hadamard_transform(query.float(), had).to(query.dtype)
        k = hadamard_transform(k, had)
    if quantize:
        k = (kv_fake_quant(k, spec.bits, spec.clip, ste, spec.pivots) if spec.keys is None
             else _analysis_keys(k, spec))
        v = kv_fake_quant(v, spec.bits, spec.clip, ste, spec.pivots)
    return query, k.to(dtype), v, v_add


KEY_PAGE = 16  # tokens per page of the "channel" analysis keys


def _analysis_keys(k: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """Keys [..., T, D] under an analysis variant (KVSpec.keys), pivots exact."""
    if spec.keys == "int8":
        kq = fake_quantize_asym(k, 8, 1.0)
    elif spec.keys == "channel":
        t, pad = k.shape[-2], (-k.shape[-2]) % KEY_PAGE
        pages = F.pad(k, (0, 0, 0, pad)).unflatten(-2, (-1, KEY_PAGE))  # [..., P, 16, D]
        kq = fake_quantize_asym(pages.transpose(-1, -2), spec.bits, spec.clip)
        kq = kq.transpose(-1, -2).flatten(-3, -2)[..., :t, :]
    else:
        raise ValueError(f"unknown analysis key variant {spec.keys!r}")
    return _keep_pivots(kq, k, spec.pivots)


_ATTENTION_COUNT = itertools.count()


def install_kv_attention(model: torch.nn.Module, spec: KVSpec, ste: bool = False,
                         active: Active | None = None) -> str:
    """Give the model an attention function (transformers' AttentionInterface, one per
    call) that applies ``quantize_kv_states`` after RoPE, runs SDPA and adds the value
    shift back to the output."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = f"quarot_kv{spec.bits}_{next(_ATTENTION_COUNT)}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        on = active is None or active()
        q, k, v, v_add = quantize_kv_states(module.layer_idx, query, key, value, spec,
                                            ste=ste, quantize=on)
        out, weights = sdpa_attention_forward(module, q, k, v.to(k.dtype), attention_mask,
                                              **kwargs)
        if v_add is None:
            return out, weights
        # out: [B, T, heads, D]; query head h reads KV head h // group
        group = q.shape[1] // v.shape[1]
        vs = v_add.to(out.device).repeat_interleave(group, dim=0)
        return (out.float() + vs).to(out.dtype), weights

    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    return name
