"""Calibration token windows for GPTQ and static activation scales: random windows of
a text file (``--calib``), or samples the full-precision model generates itself
(``--calib-self``, data-free). Both are deterministic for a given ``--seed``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from vllm_quarot.offline.options import QuantizeError, QuantizeOptions, resolve_device

if TYPE_CHECKING:
    from vllm_quarot.offline.plan import Plan

log = logging.getLogger("vllm_quarot.quantize")


def calibration_ids(model_dir: Path, tok: Any, o: QuantizeOptions, plan: Plan) -> torch.Tensor:
    """[samples, seqlen] token windows (the plan's budget): random windows of --calib,
    or sequences sampled from the model (--calib-self, or the KV calibration's default
    when there is no text)."""
    if o.calib is not None:
        return file_windows(Path(o.calib), tok, plan.nsamples, plan.seqlen, o.seed)
    return self_generated(model_dir, tok, plan.nsamples, plan.seqlen, o.seed,
                          resolve_device(o.device))


def spinquant_ids(tok: Any, o: QuantizeOptions, plan: Plan,
                  calib_ids: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    """--rotate spinquant's training windows: with a --calib text, one fresh window per
    step (--spinquant-steps windows, at least --nsamples: SpinQuant trains one pass over
    its data, and reusing a few windows overfits R1 to them); with --calib-self, the
    generated samples (calib_ids: computed only then)."""
    if o.calib is None:
        return calib_ids()
    return file_windows(Path(o.calib), tok, max(plan.nsamples, o.spinquant_steps), plan.seqlen,
                        o.seed)


def file_windows(path: Path, tok: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens at seeded random offsets of the tokenized file."""
    g = torch.Generator().manual_seed(seed)
    ids = tok(path.read_text(encoding="utf-8"), return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() <= seqlen:
        raise QuantizeError(
            f"calibration file {path} has {ids.numel()} tokens, fewer than --seqlen {seqlen}"
        )
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def self_generated(model_dir: Path, tok: Any, n: int, seqlen: int, seed: int,
                   device: torch.device | str = "cpu", batch: int = 8) -> torch.Tensor:
    """n sequences of seqlen tokens sampled (temperature 1, no top-k/p) from BOS, batch
    at a time, on device (a GPU samples other sequences than a CPU for the same
    seed)."""
    log.info("generating %d calibration samples of %d tokens from the full-precision "
             "model on %s", n, seqlen, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.to(device)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    samples = []
    with tqdm(total=n, desc="self-calibration", unit="sample") as bar:
        for i in range(0, n, batch):
            k = min(batch, n - i)
            out = model.generate(
                torch.full((k, 1), bos, device=device), do_sample=True, top_k=0, top_p=1.0,
                temperature=1.0, max_length=seqlen, min_length=seqlen, pad_token_id=bos)
            samples.extend(out[:, :seqlen].cpu())
            bar.update(k)
    del model
    return torch.stack(samples)
