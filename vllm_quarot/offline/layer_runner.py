"""Running one transformers decoder layer over the calibration hidden states: the
quantizer's forward passes, GPTQ's sequential pass inside a layer, and --verify's
float64 forwards.

Layers run on canonical tensors (``vllm_quarot.models``): a family whose checkpoint
fuses projections runs as its canonical architecture (Phi-3 as Mistral) on the split
tensors; --verify runs the original layer with the family's own class and checks the
two agree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from vllm_quarot.format import OnlineHadamard
from vllm_quarot.models import DOWN_PROJ, O_PROJ, SUB_BLOCKS, Family
from vllm_quarot.offline.checkpoint import activation_buffer
from vllm_quarot.offline.gptq import HessianAccumulator
from vllm_quarot.transforms import LinearInputSpec, install_linear_inputs, transform_input

# GPTQ's order inside a decoder layer: each group's Hessian is taken behind the groups
# quantized before it (the linears of one group share their input)
SEQUENTIAL_GROUPS = tuple(b.linears for b in SUB_BLOCKS)

GroupQuantizer = Callable[[tuple[str, ...], HessianAccumulator], dict[str, torch.Tensor]]


def model_classes(cfg: Any) -> tuple[type, type]:
    """Decoder-layer and rotary-embedding classes of this config's architecture."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    inner = model.model
    return type(inner.layers[0]), type(inner.rotary_emb)


class LayerKind:
    """How a family's layers are built: the original class (for --verify's reference
    forward on the checkpoint's own tensors) and the canonical one the quantizer runs on
    the split tensors, with the family's own rotary embedding for both."""

    def __init__(self, cfg: Any, family: Family, device: torch.device | str = "cpu"):
        self.cfg = copy.deepcopy(cfg)
        self.cfg._attn_implementation = "sdpa"
        self.canonical_cfg = copy.deepcopy(family.canonical_config(cfg))
        self.canonical_cfg._attn_implementation = "sdpa"
        self.original_cls, rotary_cls = model_classes(cfg)
        self.canonical_cls = (self.original_cls if family.canonical is None
                              else model_classes(self.canonical_cfg)[0])
        self.rotary = rotary_cls(config=self.cfg).to(device)
        self.family = family


class RMSNorm64(torch.nn.Module):
    """RMSNorm computed in the input's dtype (transformers' upcasts only to float32,
    which would cap the invariance check at ~1e-7)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=torch.float64))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _use_exact_norms(module: torch.nn.Module) -> None:
    for name, child in list(module.named_modules()):
        if type(child).__name__.endswith("RMSNorm"):
            eps = getattr(child, "variance_epsilon", getattr(child, "eps", 1e-6))
            module.set_submodule(name, RMSNorm64(child.weight.shape[0], eps))


class _StopForward(Exception):
    """Raised by a capture hook once the input it waits for has been seen."""


class LayerRunner:
    """Runs one decoder layer over batches of hidden states: in float64 for --verify,
    in the calibration precision (float32 by default) on the quantizer's device for the
    calibration forward passes. ``r4`` (the checkpoint's online R4, block-diagonal under
    --tp) is applied to down_proj's input as the runtime does (``transforms``)."""

    def __init__(self, kind: LayerKind, idx: int, sd: dict[str, torch.Tensor],
                 r4: OnlineHadamard | None, original: bool = False,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        self.dtype, self.device = dtype, torch.device(device)
        cls, cfg = ((kind.original_cls, kind.cfg) if original
                    else (kind.canonical_cls, kind.canonical_cfg))
        self.module = cls(cfg, layer_idx=idx).eval()
        _use_exact_norms(self.module)
        self.module.to(self.device, dtype)
        self.rotary = kind.rotary
        self.module.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
        if r4 is not None:
            install_linear_inputs(self.module, {DOWN_PROJ: LinearInputSpec(r4=r4)})

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        """Replace one linear's weight (its quantized version) in place."""
        with torch.no_grad():
            self.module.get_submodule(name).weight.copy_(w.to(self.dtype))

    def _position_embeddings(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = h.shape[1]
        pos = torch.arange(t, device=self.device).unsqueeze(0)
        cos, sin = self.rotary(h[:1].to(self.device, self.dtype), pos)
        return cos.to(self.dtype), sin.to(self.dtype)

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, batch: int = 8) -> torch.Tensor:
        pe = self._position_embeddings(h)
        pos = torch.arange(h.shape[1], device=self.device).unsqueeze(0)
        out = torch.empty_like(h)
        for i in range(0, h.shape[0], batch):
            x = h[i : i + batch].to(self.device, self.dtype)
            y = self.module(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
            out[i : i + batch] = (y[0] if isinstance(y, tuple) else y).to(h.dtype).cpu()
        return out

    @torch.no_grad()
    def sequential(self, h: torch.Tensor, quantize_group: GroupQuantizer,
                   meter_spec: dict[str, LinearInputSpec] | None = None, batch: int = 8,
                   spill_dir: Path | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """GPTQ's pass over one decoder layer, sub-block by sub-block (SEQUENTIAL_GROUPS):
        the Hessian of each group's input is accumulated over all calibration windows,
        ``quantize_group(names, hessian)`` quantizes the group and returns its
        dequantized weights, which replace the float ones before the next group's
        input is computed. Intermediate activations (o_proj's input, the residual after
        attention) are kept, so the whole pass costs about one forward of the layer
        plus one of gate/up. Returns the quantized layer's output and, with meter_spec
        (the runtime's quantization of each group's first linear's input), each group's
        relative output error ‖(X − Q_PROJ(X))Wᵀ‖/‖XWᵀ‖ (keyed by the group's first linear).
        Kept activations above the memory budget live in disk-backed memory under
        spill_dir (``activation_buffer``).

        The layer is h1 = h + self_attn(input_layernorm(h)); out = h1 +
        mlp(post_attention_layernorm(h1)): every family of the model map."""
        layer, store = self.module, self.dtype
        attn, mlp = layer.self_attn, layer.mlp
        n = h.shape[0]
        pe = self._position_embeddings(h)
        spans = [slice(i, i + batch) for i in range(0, n, batch)]
        errors: dict[str, float] = {}

        def on(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.device, self.dtype)

        def run_group(group: tuple[str, ...], inputs) -> None:
            """Accumulate the group's Hessian over ``inputs`` (an iterator of its input
            batches), quantize it, load the quantized weights."""
            first = layer.get_submodule(group[0])
            acc = HessianAccumulator(first.in_features, self.device)
            meter = ActErrorMeter((meter_spec or {}).get(group[0]))
            for x in inputs:
                acc.add(x)
                meter.observe(x, first.weight)
            if meter.spec is not None:
                errors[group[0]] = meter.value
            for name, w in quantize_group(group, acc).items():
                layer.get_submodule(name).weight.copy_(w.to(self.dtype))

        def inputs_of(mod: torch.nn.Module, run: Callable[[slice], Any]):
            """Each batch's input of ``mod`` (after its other pre-hooks, e.g. R4)."""
            sink: list[torch.Tensor] = []

            def hook(_m: torch.nn.Module, args: tuple) -> None:
                sink.append(args[0])
                raise _StopForward

            handle = mod.register_forward_pre_hook(hook)
            try:
                for sp in spans:
                    try:
                        run(sp)
                    except _StopForward:
                        pass
                    yield sp, sink.pop()
            finally:
                handle.remove()

        qkv, o_grp, gate_up, down = SEQUENTIAL_GROUPS
        # q/k/v: the normalised layer input
        run_group(qkv, (layer.input_layernorm(on(h[sp])) for sp in spans))
        # o_proj: the attention output behind the quantized q/k/v (kept)
        o_proj = layer.get_submodule(O_PROJ)
        kept = {"o_in": activation_buffer((n, h.shape[1], o_proj.in_features), store,
                                          spill_dir)}

        def o_inputs():
            for sp, x in inputs_of(o_proj, lambda sp: attn(
                    hidden_states=layer.input_layernorm(on(h[sp])), position_embeddings=pe,
                    attention_mask=None)):
                kept["o_in"][sp] = x.to("cpu", store)
                yield x

        run_group(o_grp, o_inputs())
        # gate/up: the normalised residual after the quantized attention (kept)
        h1 = activation_buffer(tuple(h.shape), store, spill_dir)

        def mlp_inputs():
            for sp in spans:
                r = on(h[sp]) + o_proj(on(kept["o_in"][sp]))
                h1[sp] = r.to("cpu", store)
                yield layer.post_attention_layernorm(r)

        run_group(gate_up, mlp_inputs())
        del kept["o_in"]
        # down_proj: its input behind the quantized gate/up (and the online R4)
        run_group(down, (x for _sp, x in inputs_of(
            layer.get_submodule(DOWN_PROJ),
            lambda sp: mlp(layer.post_attention_layernorm(on(h1[sp]))))))
        out = activation_buffer(tuple(h.shape), h.dtype, spill_dir)
        for sp in spans:
            r = on(h1[sp])
            out[sp] = (r + mlp(layer.post_attention_layernorm(r))).to("cpu", h.dtype)
        return out, errors


class ActErrorMeter:
    """Relative output error ‖(X − Q_PROJ(X))Wᵀ‖/‖XWᵀ‖ of the runtime's quantization of a
    linear's input (``spec``, after any R4 the input already went through); nothing
    when spec is None."""

    def __init__(self, spec: LinearInputSpec | None):
        self.spec = None if spec is None else LinearInputSpec(
            bits=spec.bits, clip=spec.clip, blocks=spec.blocks,
            static_scale=spec.static_scale)  # the input arrives already rotated
        self.num = self.den = 0.0

    def observe(self, x: torch.Tensor, w: torch.Tensor) -> None:
        if self.spec is None:
            return
        xq = transform_input(x, self.spec)
        self.num += ((x - xq) @ w.t()).double().pow(2).sum().item()
        self.den += (x @ w.t()).double().pow(2).sum().item()

    @property
    def value(self) -> float:
        return (self.num / max(self.den, 1e-30)) ** 0.5


def load_canonical_model(model_dir: str | Path, dtype: torch.dtype = torch.float32
                         ) -> torch.nn.Module:
    """The whole model as its family's canonical architecture on the split tensors (the
    family's own class when it fuses nothing), with the family's own rotary embedding:
    what SpinQuant trains and the activation statistics read by canonical names."""
    from transformers import AutoConfig

    from vllm_quarot.models import EMBED, LM_HEAD, family_of, layer_index, layer_prefix
    from vllm_quarot.offline.checkpoint import TensorSource

    cfg = AutoConfig.from_pretrained(model_dir)
    fam = family_of(cfg)
    if fam.canonical is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = AutoModelForCausalLM.from_config(fam.canonical_config(cfg), dtype=dtype)
    src = TensorSource(model_dir)
    state: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k in src.keys():
        i = layer_index(k)
        if i is None:
            state[k] = src.get(k).to(dtype)
        else:
            layers.setdefault(i, {})[k[len(layer_prefix(i)):]] = src.get(k).to(dtype)
    for i, sd in layers.items():
        state.update({layer_prefix(i) + k: v for k, v in fam.split(sd, cfg).items()})
    state.setdefault(f"{LM_HEAD}.weight", state[f"{EMBED}.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if m != f"{LM_HEAD}.weight"] or unexpected:
        raise RuntimeError(f"canonical {type(model).__name__} of {model_dir}: missing "
                           f"{missing}, unexpected {unexpected}")
    model.model.rotary_emb = model_classes(cfg)[1](config=cfg)
    return model.eval()
