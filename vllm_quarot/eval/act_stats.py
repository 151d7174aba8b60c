"""Activation statistics before and after rotation (the paper's Figure 1).

Hooks the original transformers model at the inputs of q_proj and down_proj and
computes, per chosen layer, what those inputs look like unrotated and rotated exactly
as a QuaRot checkpoint sees them: q_proj reads RMSNorm(x)·R1 once the norm gain is
folded into the weights, down_proj reads its input times the online R4 Hadamard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_quarot.hadamard import hadamard_transform, random_signs
from vllm_quarot.models import DOWN_PROJ, INPUT_NORM, Q_PROJ


@dataclass
class SiteStats:
    site: str  # e.g. "layer 3 q_proj"
    rotated: bool
    channel_max: torch.Tensor  # per-channel max |x| over tokens
    kurtosis: float  # of all entries
    absmax: float
    outlier_ratio: float  # max / median of the per-channel maxima

    def row(self) -> str:
        tag = "rotated" if self.rotated else "original"
        return (f"{self.site:22} {tag:9} max|x| {self.absmax:9.3f}  channel-max ratio "
                f"{self.outlier_ratio:7.2f}  kurtosis {self.kurtosis:8.2f}")


def _stats(site: str, rotated: bool, x: torch.Tensor) -> SiteStats:
    x = x.double().reshape(-1, x.shape[-1])
    cmax = x.abs().amax(0)
    c = x - x.mean()
    kurt = (c.pow(4).mean() / c.pow(2).mean().pow(2)).item()
    return SiteStats(site, rotated, cmax.float(), kurt, cmax.max().item(),
                     (cmax.max() / cmax.median()).item())


@torch.no_grad()
def activation_stats(model: torch.nn.Module, ids: torch.Tensor, layers: list[int],
                     seed: int = 0) -> list[SiteStats]:
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    inner = model.model
    for i in layers:
        layer = inner.layers[i]
        for name, mod in (("q_proj", layer.get_submodule(Q_PROJ)), ("down_proj",
                                                               layer.get_submodule(DOWN_PROJ))):
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, a, key=(i, name): captured.__setitem__(key, a[0].detach())))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    signs = random_signs(model.config.hidden_size, seed)
    out = []
    for i in layers:
        q_in = captured[(i, "q_proj")].double()
        gain = inner.layers[i].get_submodule(INPUT_NORM).weight.double()
        d_in = captured[(i, "down_proj")].double()
        out += [
            _stats(f"layer {i} q_proj", False, q_in),
            _stats(f"layer {i} q_proj", True, hadamard_transform(q_in / gain * signs)),
            _stats(f"layer {i} down_proj", False, d_in),
            _stats(f"layer {i} down_proj", True, hadamard_transform(d_in)),
        ]
    return out


def plot(stats: list[SiteStats], png: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(dict.fromkeys(s.site for s in stats))
    fig, axes = plt.subplots(2, len(sites), figsize=(3.2 * len(sites), 5.5), squeeze=False)
    for j, site in enumerate(sites):
        for r, rotated in enumerate((False, True)):
            s = next(x for x in stats if x.site == site and x.rotated == rotated)
            ax = axes[r][j]
            ax.plot(s.channel_max.numpy(), lw=0.6)
            ax.set_title(f"{site}\n{'rotated' if rotated else 'original'} "
                         f"(kurtosis {s.kurtosis:.1f})", fontsize=8)
            ax.set_xlabel("channel", fontsize=7)
            ax.set_ylabel("max |x| over tokens", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
