"""Fixes for vLLM bugs outside the plugin that still take our users' servers down.

Each patch is an entry of ``PATCHES``: what it fixes, the vLLM version it was written
against and the platform it applies to. ``vllm_quarot.register()``, which vLLM calls in
every process (API server, engine core, workers), applies the ones that fit; on another
vLLM version none is applied and one warning names each that is not (their bugs may be
fixed there, or the patched code may have moved). ``VLLM_QUAROT_PATCHES=0`` turns them
all off. The first two fix vLLM bugs that hit every CPU user (a bf16 model too); the
third only acts on QuaRot checkpoints.

CPU: seeded requests under chunked prefill (vLLM 0.32)
------------------------------------------------------
When a prompt is prefilled in several chunks, the model runner still samples a token
for the partial chunk and throws it away. For a request with its own ``seed`` that
sample consumed random numbers from the request's ``torch.Generator``, so
``GPUModelRunner._bookkeeping_sync`` (vllm/v1/worker/gpu_model_runner.py:3496-3502
in 0.32.0) rolls the generator back with ``gen.set_offset(gen.get_offset() - 4)``.
Offsets exist only for Philox (CUDA) generators; the CPU generator (mt19937) raises
``RuntimeError: CPU Generator does not use offset``, which kills the engine core, and
every request in flight (and the API server) with it.

The fix, on CPU only: ``CPUModelRunner._sample`` snapshots ``get_state()`` of the
generators of the requests whose sample will be discarded and restores them right
after sampling, and ``CPUModelRunner._bookkeeping_sync`` hides those generators from
the rollback loop (it finds none and so rolls nothing back). Why this approach:

* exact: restoring the full mt19937 state undoes whatever the sampler drew, however
  many numbers that was (vLLM's CPU sampler draws one ``randint`` per step, not the
  4 Philox offsets the rollback assumes; spec decoding's rejection sampler draws
  more), so a seeded request gives the same tokens whether its prompt was prefilled
  in one chunk or several, alone or batched with others;
* local: only the two CPU runner methods are overridden, around vLLM's own code,
  which still does the sampling and the bookkeeping; CUDA (Philox, where the
  rollback works) and other platforms are not touched;
* cheap: one 5 KB state copy per discarded seeded sample (partial prefills only).

CPU: pipeline parallelism in eager mode (vLLM 0.32)
---------------------------------------------------
A pipeline stage after the first receives the previous stage's hidden states into a
buffer, ``self.intermediate_tensors``, that ``GPUModelRunner`` creates only in its
``_dummy_run`` (gpu_model_runner.py:5799-5808); ``sync_and_gather_intermediate_tensors``
(:3168-3185) asserts it exists. The GPU worker always runs that dummy pass (profiling);
``CPUWorker`` replaces profiling and warm-up (cpu_worker.py:190-206, 264-268) with
``CPUModelRunner.warming_up_model``, which returns at once in eager mode
(cpu_model_runner.py:84-86, compilation mode NONE: ``enforce_eager`` or LoRA). So with
``--pipeline-parallel-size 2 --enforce-eager`` on CPU the second stage's first step
fails with a bare ``AssertionError``, for any model (compiled mode happens to work: its
warm-up runs the dummy pass). The fix creates the buffer on first use exactly as
``_dummy_run`` would (``make_empty_intermediate_tensors`` for ``max_num_tokens``).

All platforms: checks that need the whole engine configuration
----------------------------------------------------------------
vLLM builds the quantization config with the model config alone
(``VllmConfig._get_quantization_config``): no hook of ``QuantizationConfig`` sees the
parallel configuration. So that ``LLM(..., tensor_parallel_size=T)`` and ``vllm serve
--tensor-parallel-size T`` refuse a checkpoint that cannot serve at T with one line in
the calling process (not "Engine core initialization failed" after the workers
started), ``VllmConfig.__post_init__`` is wrapped to run
``QuaRotConfig.check_engine_config`` (tensor-parallel size, KV cache dtype) once the
config is complete. Without the patch the same checks still refuse, later, in the
workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from vllm.logger import init_logger

from vllm_quarot import envs

logger = init_logger("vllm.quarot")

VLLM_VERSION = "0.32"  # the vLLM the patches were written against (version prefix)


@dataclass(frozen=True)
class Patch:
    name: str
    fixes: str  # one line: the bug, as a user sees it
    platform: str | None  # "cpu", or None for every platform
    apply: Callable[[], None]


_applied: list[str] | None = None


def applied() -> list[str]:
    """The names of the patches applied in this process."""
    return list(_applied or [])


def apply() -> None:
    """Apply the patches that fit this vLLM and platform (idempotent)."""
    global _applied
    if _applied is not None:
        return
    _applied = []
    if not envs.VLLM_QUAROT_PATCHES:
        logger.info("vllm_quarot: VLLM_QUAROT_PATCHES=0: vLLM is not patched (%s)",
                    ", ".join(p.name for p in PATCHES))
        return
    import vllm
    from vllm.platforms import current_platform

    platform = "cpu" if current_platform.is_cpu() else (
        "cuda" if current_platform.is_cuda() else current_platform.device_type)
    wanted = [p for p in PATCHES if p.platform in (None, platform)]
    if not vllm.__version__.startswith(VLLM_VERSION):
        logger.warning(
            "vllm_quarot: vLLM %s is not %s, the version its patches were written for; "
            "NOT applied: %s", vllm.__version__, VLLM_VERSION,
            "; ".join(f"{p.name} ({p.fixes})" for p in wanted))
        return
    for p in wanted:
        p.apply()
        _applied.append(p.name)
    logger.debug("vllm_quarot: patched vLLM %s: %s", vllm.__version__, ", ".join(_applied))
    if "cpu-seeded-chunked-prefill" in _applied:
        logger.info("vllm_quarot: patched vLLM %s CPU model runner (cpu-seeded-chunked-"
                    "prefill): seeded requests survive chunked prefill", vllm.__version__)



def _discarded_generators(runner) -> dict[int, object]:
    """Generators of the requests whose sampled token this step throws away."""
    gens = runner.input_batch.generators
    if not gens:
        return {}
    num_reqs = runner.input_batch.num_reqs
    idx = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return {int(i): gens[int(i)] for i in idx if int(i) in gens}


def _patch_cpu_seeded_chunked_prefill() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, "_quarot_seeded_chunk_fix", False):
        return
    orig_sample = CPUModelRunner._sample
    orig_bookkeeping = CPUModelRunner._bookkeeping_sync

    def _sample(self, *args, **kwargs):
        # the CPU generator has no offset: keep the whole state of every generator
        # whose sample is discarded, and put it back once the sampler has drawn
        saved = {i: g.get_state() for i, g in _discarded_generators(self).items()}
        try:
            return orig_sample(self, *args, **kwargs)
        finally:
            gens = self.input_batch.generators
            for i, state in saved.items():
                gens[i].set_state(state)

    def _bookkeeping_sync(self, *args, **kwargs):
        # the states were restored in _sample: hide these generators from vLLM's
        # set_offset rollback (which would raise), then put them back in order
        hidden = _discarded_generators(self)
        if not hidden:
            return orig_bookkeeping(self, *args, **kwargs)
        gens = self.input_batch.generators
        items = list(gens.items())
        for i in hidden:
            del gens[i]
        try:
            return orig_bookkeeping(self, *args, **kwargs)
        finally:
            gens.clear()
            gens.update(items)

    CPUModelRunner._sample = _sample
    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    CPUModelRunner._quarot_seeded_chunk_fix = True


def _patch_cpu_pipeline_buffer() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, "_quarot_pp_buffer_fix", False):
        return
    orig = CPUModelRunner.sync_and_gather_intermediate_tensors

    def sync_and_gather_intermediate_tensors(self, *args, **kwargs):
        if self.intermediate_tensors is None:  # as GPUModelRunner._dummy_run does
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype,
                device=self.device)
        return orig(self, *args, **kwargs)

    CPUModelRunner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors
    CPUModelRunner._quarot_pp_buffer_fix = True


def _patch_config_checks() -> None:
    from vllm.config import VllmConfig

    if getattr(VllmConfig, "_quarot_checks", False):
        return
    post_init = VllmConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        if type(self.quant_config).__name__ == "QuaRotConfig":
            self.quant_config.check_engine_config(self)

    VllmConfig.__post_init__ = __post_init__
    VllmConfig._quarot_checks = True


PATCHES = (
    Patch("cpu-seeded-chunked-prefill",
          "a seeded request prefilled in chunks kills the engine: 'CPU Generator does not "
          "use offset'", "cpu", _patch_cpu_seeded_chunked_prefill),
    Patch("cpu-eager-pipeline-buffer",
          "--pipeline-parallel-size > 1 with --enforce-eager fails at the second stage's "
          "first step (bare AssertionError)", "cpu", _patch_cpu_pipeline_buffer),
    Patch("quarot-config-check",
          "a QuaRot checkpoint that cannot serve at the requested tensor-parallel size or "
          "KV cache dtype is refused in the calling process, not after the workers "
          "start", None, _patch_config_checks),
)
