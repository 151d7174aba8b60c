"""SpinQuant: learn the residual rotation R1 and the per-layer R2 (Liu et al. 2024).

Starting from QuaRot's randomized Hadamard R1 = diag(s)·M and the per-head Hadamard
R2, the rotations are trained with Cayley SGD on the orthogonal group to minimise the
next-token cross-entropy of the model *as the quantizer will produce it*, with fake
quantization in the loop and straight-through gradients. Weights stay frozen; only R1
(hidden×hidden) and one R2 (head_dim×head_dim) per decoder layer are trained. The fixed
online Hadamards R3 (queries/keys after RoPE) and R4 (down_proj's input) stay as they are.

The model computed in the loop, in the conventions of ``rotation.py`` (weights [out, in],
activations row vectors):

- RMSNorm gains folded into the following linears (norms become unit-gain);
- the residual stream is x·R1: q/k/v/gate/up weights W·R1, o/down weights R1ᵀ·W;
  the embedding E·R1 (applied to the looked-up rows) and the lm_head (H·diag(g))·R1
  (applied as ``final_norm_g(x·R1ᵀ)·Hᵀ``, which is the same function: a unit-gain
  RMSNorm commutes with R1), both unquantized;
- R2 per head on v_proj's output rows (R2ᵀ·W_v,h, bias b_h·R2) and o_proj's input
  columns (W_o,h·R2);
- R4 (fixed Hadamard of the intermediate size; block-diagonal with ``tp_blocks`` blocks,
  as a ``--tp N`` checkpoint serves it) folded into down_proj's input and applied online
  to its input; R3 (fixed Hadamard of head_dim) on queries and keys after RoPE
  when ``r3`` and a KV cache bit width are given;
- fake quantization as the runtime computes it (``vllm_quarot.quant``): weights RTN
  symmetric per output channel (group) at ``w_bits`` (no clip search; the quantizer
  passes 16 — weights unquantized — when GPTQ makes the final weights, as SpinQuant
  does, and RTN's bits before RTN); the inputs of all
  seven linears per token at ``a_bits`` with ``act_clip`` (per (token, block) on o_proj and
  down_proj under ``tp_blocks``); keys and values asymmetric per
  token and head at ``kv_bits`` with ``kv_clip``. Every quantizer passes gradients
  straight through (identity), as SpinQuant's.

The learned matrices are fused by the quantizer exactly as the Hadamard ones are:
``rotate_rows_in(E, r1)``, ``fold_norms`` + ``rotate_layer(sd, r1, head_dim, r2=r2[i],
r4=online_r4)`` and ``rotate_rows_in(lm_head * g_final, r1)``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vllm_quarot.format import OnlineHadamard
from vllm_quarot.hadamard import block_hadamard_transform, random_signs
from vllm_quarot.models import ATTN_IN as _ATTN_IN
from vllm_quarot.models import DOWN_PROJ, LINEARS, MLP_IN, O_PROJ, layer_prefix
from vllm_quarot.offline.layer_runner import load_canonical_model
from vllm_quarot.offline.rotation import fold_norms, r1_matrix, r2_matrix
from vllm_quarot.quant import dequantize_weight, quantize_with_scales, weight_scales
from vllm_quarot.transforms import (
    KVSpec,
    LinearInputSpec,
    install_kv_attention,
    install_linear_inputs,
)

__all__ = ["CayleySGD", "LearnedRotations", "learn_rotations", "orthonormalize"]

ORTHO_TOL = 1e-6
MOMENTUM = 0.0  # SpinQuant's setting (its SGDG is built without momentum)


@dataclasses.dataclass
class LearnedRotations:
    r1: torch.Tensor  # float64 [hidden, hidden], orthogonal; the residual stream is x @ r1
    r2: list[torch.Tensor]  # float64 [head_dim, head_dim] per decoder layer
    losses: list[float]  # training loss per step (before that step's update)
    seconds: float
    # (step, mean loss on the held-out windows) before training, every eval_every steps
    # and after the last step: whether learning helped beyond the windows it saw
    heldout: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    # R1's Cayley step per step: α and α·‖W‖₁ (1.0 when the 1-norm cap, not lr, set it)
    r1_steps: list[tuple[float, float]] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------- optimizer


class CayleySGD(torch.optim.Optimizer):
    """SGD (with optional momentum) on the orthogonal group via the Cayley transform.

    Li, Zhang & Todorovic, "Efficient Riemannian Optimization on the Stiefel Manifold via
    the Cayley Transform" (ICLR 2020), Algorithm 1, for square parameters X (XᵀX = I):

        M ← β·M − G                                  (G: the Euclidean gradient)
        Ŵ = M·Xᵀ − ½·X·(Xᵀ·M·Xᵀ),   W = Ŵ − Ŵᵀ       (skew-symmetric)
        M ← W·X                                      (momentum kept in the tangent space)
        α = min(lr, 2q / (‖W‖₁ + ε))
        X ← (I − α/2·W)⁻¹ (I + α/2·W) X              (the Cayley transform)

    The paper approximates the last line by a few fixed-point iterations
    Y ← X + α/2·W(X + Y); here the small linear system is solved exactly, so every step
    maps orthogonal matrices to orthogonal matrices (to rounding: the update is computed
    in float64 whatever the parameter's dtype). ‖W‖₁ is the induced 1-norm (max column
    sum), as in SpinQuant's SGDG, whose learning rate 1.5 therefore acts as a cap:
    α·‖W‖₁ ≤ 2q bounds the rotation per step. Parameters must be square and orthogonal.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 q: float = 0.5, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, q=q, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, q, eps = group["lr"], group["momentum"], group["q"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"CayleySGD needs square matrices, got {tuple(p.shape)}")
                x = p.detach().double()
                g = p.grad.detach().double()
                state = self.state[p]
                m = state.get("momentum_buffer")
                m = -g if m is None else beta * m - g
                w_hat = m @ x.t() - 0.5 * x @ (x.t() @ m @ x.t())
                w = w_hat - w_hat.t()
                state["momentum_buffer"] = w @ x
                norm1 = w.abs().sum(0).max().item()
                alpha = min(lr, 2.0 * q / (norm1 + eps))
                # diagnostics: the step, and the rotation it makes (α·‖W‖₁ = 2q at the cap)
                state["step_size"] = alpha
                state["step_norm"] = alpha * norm1
                eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
                a = 0.5 * alpha * w
                x_new = torch.linalg.solve(eye - a, x + a @ x)
                p.copy_(x_new.to(p.dtype))
        return loss


def orthonormalize(r: torch.Tensor) -> torch.Tensor:
    """The nearest orthogonal matrix (polar factor U·V_PROJᵀ of the SVD), in float64."""
    u, _, vh = torch.linalg.svd(r.detach().double().cpu())
    return u @ vh


def _ortho_error(r: torch.Tensor) -> float:
    eye = torch.eye(r.shape[0], dtype=torch.float64)
    return (r.t() @ r - eye).abs().max().item()


# --------------------------------------------------------------------------- fake quant


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """xq's value with x's (identity) gradient: the straight-through estimator."""
    return x + (xq - x).detach()


def _fq_weight(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """RTN symmetric per output channel (group), as ``quantize_weight_rtn`` without the
    clip search, straight-through."""
    with torch.no_grad():
        wd = w.detach()
        scale = weight_scales(wd, bits, group_size)
        deq = dequantize_weight(quantize_with_scales(wd, scale, bits, group_size), scale,
                                group_size, w.dtype)
    return _ste(w, deq)


# False while the teacher's logits are computed (loss="kl"): the same rotated model with
# every fake quantizer off is the original model (rotation invariance)
_FAKE_QUANT = [True]


def _quantizing() -> bool:
    return _FAKE_QUANT[0]


# --------------------------------------------------------------------------- the model


class _RotatedModel:
    """The frozen model with norms folded (and R4 folded into down_proj), whose forward
    takes R1 and the R2s and fuses them (plus the weight fake quantization) each call."""

    def __init__(self, model_dir: Path, *, w_bits: int, a_bits: int | None,
                 kv_bits: int | None, act_clip: float, kv_clip: float, group_size: int,
                 online_r4: bool, r3: bool, device: str, tp_blocks: int = 1):
        model = load_canonical_model(model_dir, torch.float32)  # Phi-3: as Mistral
        cfg = model.config
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        self.hidden = cfg.hidden_size
        self.head_dim = (getattr(cfg, "head_dim", None)
                         or cfg.hidden_size // cfg.num_attention_heads)
        self.n_layers = cfg.num_hidden_layers
        self.device = torch.device(device)
        model.eval().requires_grad_(False)
        # the served numerics (transforms.py): R4 block-diagonal over tp_blocks, the
        # row-parallel inputs quantized per (token, block), R3 and the KV quantizer
        self.r4 = (OnlineHadamard.of_size(cfg.intermediate_size, tp_blocks)
                   if online_r4 else None)
        self.specs = {
            layer_prefix(i)[len("model."):] + name: LinearInputSpec(
                r4=self.r4 if name == DOWN_PROJ else None, bits=a_bits, clip=act_clip,
                blocks=tp_blocks if name in (O_PROJ, DOWN_PROJ) else 1)
            for i in range(self.n_layers) for name in LINEARS}
        if kv_bits is not None:
            install_kv_attention(model, KVSpec(kv_bits, kv_clip, OnlineHadamard.of_size(
                self.head_dim) if r3 else None), ste=True, active=_quantizing)
        else:
            model.set_attn_implementation("sdpa")
        self.model = model
        self.base = model.model
        self._prepare_layers()  # on the host: the folded weights go to the device once
        model.to(self.device)
        self.r1: torch.Tensor | None = None  # the float32 R1 of the current forward
        self.base.norm.register_forward_pre_hook(lambda _m, args: (args[0] @ self.r1.t(),))
        install_linear_inputs(self.base, self.specs, ste=True, active=_quantizing)

    def _prepare_layers(self) -> None:
        """Fold the norms (and R4) in float64; keep per layer the stacked weights that
        read the residual stream ([q; k; v; gate; up], rotated as W·R1) and the ones that
        write it ([o | down], rotated as R1ᵀ·W), float32 on the device."""
        self.w_in, self.w_out, self.split_in, self.split_out = [], [], [], []
        self.v_bias: list[torch.Tensor | None] = []
        self.out_bias: list[dict[str, torch.Tensor]] = []
        self.overrides_fixed: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.base.layers):
            sd = {k: v.detach().double().cpu() for k, v in layer.state_dict().items()}
            fold_norms(sd)
            if self.r4 is not None:
                sd[f"{DOWN_PROJ}.weight"] = block_hadamard_transform(sd[f"{DOWN_PROJ}.weight"],
                                                                self.r4.blocks)
            ins = [sd[f"{n}.weight"] for n in _ATTN_IN + MLP_IN]
            outs = [sd[f"{O_PROJ}.weight"], sd[f"{DOWN_PROJ}.weight"]]
            self.split_in.append([w.shape[0] for w in ins])
            self.split_out.append([w.shape[1] for w in outs])
            self.w_in.append(torch.cat(ins, 0).float().to(self.device))
            self.w_out.append(torch.cat(outs, 1).float().to(self.device))
            vb = sd.get("self_attn.v_proj.bias")
            self.v_bias.append(None if vb is None else vb.float().to(self.device))
            self.out_bias.append({n: sd[f"{n}.bias"].float().to(self.device)
                                  for n in (O_PROJ, DOWN_PROJ) if f"{n}.bias" in sd})
            p = f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self.overrides_fixed[f"{p}{norm}.weight"] = sd[f"{norm}.weight"].float().to(
                    self.device)
            # the module's own (unfolded) linear weights are never used: free them
            for n in LINEARS:
                layer.get_submodule(n).weight = torch.nn.Parameter(
                    torch.empty(0, device=self.device), requires_grad=False)

    def _weights(self, r1: torch.Tensor, r2: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rotated (and fake-quantized) weights of every decoder layer."""
        hd = self.head_dim
        out: dict[str, torch.Tensor] = dict(self.overrides_fixed)
        for i in range(self.n_layers):
            p = f"layers.{i}."
            q, k, v, gate, up = torch.split(self.w_in[i] @ r1, self.split_in[i], 0)
            o, down = torch.split(r1.t() @ self.w_out[i], self.split_out[i], 1)
            n_kv, n_h = v.shape[0] // hd, o.shape[1] // hd
            v = torch.matmul(r2[i].t(), v.reshape(n_kv, hd, -1)).reshape(n_kv * hd, -1)
            o = torch.matmul(o.reshape(-1, n_h, hd), r2[i]).reshape(o.shape[0], -1)
            ws = dict(zip(LINEARS, (q, k, v, o, gate, up, down), strict=True))
            for name, w in ws.items():
                if self.w_bits < 16 and _FAKE_QUANT[0]:
                    w = _fq_weight(w, self.w_bits, self.group_size)
                out[f"{p}{name}.weight"] = w
            if self.v_bias[i] is not None:
                out[f"{p}self_attn.v_proj.bias"] = (self.v_bias[i].reshape(n_kv, hd)
                                                    @ r2[i]).reshape(-1)
            for name, b in self.out_bias[i].items():
                out[f"{p}{name}.bias"] = b @ r1
        return out

    def loss(self, ids: torch.Tensor, r1: torch.Tensor, r2: list[torch.Tensor],
             kind: str = "ce") -> torch.Tensor:
        """Mean per-token loss of the rotated, fake-quantized model on ids: "ce", the
        next-token cross-entropy (SpinQuant's), or "kl", KL(original ‖ quantized) of the
        next-token distributions (the original model's logits are this model's with
        every fake quantizer off: rotation invariance)."""
        logits = self._logits(ids, r1, r2)
        if kind == "ce":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                   ids[:, 1:].to(self.device).reshape(-1))
        with torch.no_grad():
            _FAKE_QUANT[0] = False
            try:
                teacher = self._logits(ids, r1.detach(), [r.detach() for r in r2])
            finally:
                _FAKE_QUANT[0] = True
        v = logits.shape[-1]
        return F.kl_div(F.log_softmax(logits.reshape(-1, v).float(), -1),
                        F.log_softmax(teacher.reshape(-1, v).float(), -1),
                        log_target=True, reduction="batchmean")

    def _logits(self, ids: torch.Tensor, r1: torch.Tensor,
                r2: list[torch.Tensor]) -> torch.Tensor:
        """Next-token logits [B, T-1, V_PROJ] of the rotated (fake-quantized) model."""
        r1 = r1.float()
        r2 = [r.float() for r in r2]
        self.r1 = r1
        ids = ids.to(self.device)
        emb = self.base.embed_tokens(ids) @ r1
        h = torch.func.functional_call(
            self.base, self._weights(r1, r2), args=(),
            kwargs=dict(inputs_embeds=emb, use_cache=False), strict=False,
        ).last_hidden_state
        return self.model.lm_head(h[:, :-1])


# --------------------------------------------------------------------------- training


def learn_rotations(
    model_dir: str | Path,
    calib_ids: torch.Tensor,
    *,
    w_bits: int,
    a_bits: int | None,
    kv_bits: int | None,
    act_clip: float,
    kv_clip: float,
    group_size: int = -1,
    seed: int = 0,
    steps: int = 100,
    lr: float = 1.5,
    batch: int = 1,
    online_r4: bool = True,
    r3: bool = True,
    tp_blocks: int = 1,
    device: str = "cpu",
    progress: bool = True,
    eval_ids: torch.Tensor | None = None,
    eval_every: int = 0,
    momentum: float = MOMENTUM,
    loss: str = "ce",
) -> LearnedRotations:
    """Learn R1 and the per-layer R2 of the (original, unrotated) model in model_dir.

    Cayley SGD (``CayleySGD``, lr with a cosine decay to 0 over ``steps``, as SpinQuant's
    training) from R1 = r1_matrix(random_signs(hidden, seed)) and R2 = r2_matrix(head_dim);
    each step takes ``batch`` windows of calib_ids [n, T] (a seeded shuffle, reshuffled
    every pass) and minimises ``loss`` ("ce": next-token cross-entropy, SpinQuant's;
    "kl": KL divergence from the original model's next-token distribution, a signal on
    the whole vocabulary rather than on one label per token). Returns float64 orthogonal
    matrices and the loss before each step. With eval_ids [m, T], the cross-entropy on
    those windows is measured before the first and after the last step (and every
    eval_every steps when > 0).
    """
    t0 = time.time()
    model_dir = Path(model_dir)
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be a non-empty [n, T] tensor, got "
                         f"{tuple(calib_ids.shape)}")
    if loss not in ("ce", "kl"):
        raise ValueError(f"loss must be 'ce' or 'kl', got {loss!r}")
    if steps < 0 or batch < 1:
        raise ValueError(f"steps must be >= 0 and batch >= 1, got {steps}, {batch}")
    net = _RotatedModel(model_dir, w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits,
                        act_clip=act_clip, kv_clip=kv_clip, group_size=group_size,
                        online_r4=online_r4, r3=r3, device=device, tp_blocks=tp_blocks)
    dev = net.device
    r1 = r1_matrix(random_signs(net.hidden, seed)).to(dev).requires_grad_(True)
    r2 = [r2_matrix(net.head_dim).to(dev).requires_grad_(True) for _ in range(net.n_layers)]
    opt = CayleySGD([r1, *r2], lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    n = calib_ids.shape[0]
    order: list[int] = []
    losses: list[float] = []
    heldout: list[tuple[int, float]] = []
    r1_steps: list[tuple[float, float]] = []

    def evaluate(step: int, net: _RotatedModel, r1: torch.Tensor,
                 r2: list[torch.Tensor]) -> None:
        if eval_ids is None:
            return
        with torch.no_grad():
            vals = [net.loss(eval_ids[j : j + 1], r1, r2).item()
                    for j in range(eval_ids.shape[0])]
        heldout.append((step, sum(vals) / len(vals)))

    evaluate(0, net, r1, r2)
    bar = tqdm(range(steps), desc="spinquant", unit="step", disable=not progress)
    for step in bar:
        while len(order) < batch:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:batch], order[batch:]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        value = net.loss(calib_ids[idx], r1, r2, loss)
        value.backward()
        opt.step()
        losses.append(value.item())
        st = opt.state[r1]
        r1_steps.append((st["step_size"], st["step_norm"]))
        if eval_every > 0 and (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluate(step + 1, net, r1, r2)
        bar.set_postfix(loss=f"{losses[-1]:.4f}",
                        **({"heldout": f"{heldout[-1][1]:.4f}"} if heldout else {}))
    if steps > 0:
        evaluate(steps, net, r1, r2)
    r1_out = orthonormalize(r1)
    r2_out = [orthonormalize(r) for r in r2]
    # the model's hooks refer to it (a reference cycle): free it, and its device memory,
    # now rather than at some later gc pass, before the layer-by-layer quantization
    del net, opt, r1, r2
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for r in (r1_out, *r2_out):
        err = _ortho_error(r)
        if not err < ORTHO_TOL:
            raise RuntimeError(f"learned rotation lost orthogonality: |RᵀR - I| = {err:.2e}")
    return LearnedRotations(r1=r1_out, r2=r2_out, losses=losses, seconds=time.time() - t0,
                            heldout=heldout, r1_steps=r1_steps)
