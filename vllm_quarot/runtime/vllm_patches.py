"""Fixes for vLLM bugs outside the plugin that still take our users' servers down.

Each patch is guarded by the vLLM version it was written against and applied by
``vllm_quarot.register()``, which vLLM calls in every process (API server, engine
core, workers); only the process that owns the model runner ever uses them.

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
``QuaRotFormat.check_tensor_parallel`` once the config is complete.
"""

from __future__ import annotations

import numpy as np
from vllm.logger import init_logger

logger = init_logger("vllm.quarot")

_applied = False


def apply() -> None:
    """Apply the patches that fit this vLLM and platform (idempotent)."""
    global _applied
    if _applied:
        return
    _applied = True
    import vllm

    if not vllm.__version__.startswith("0.32"):
        return
    _patch_config_checks()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # Philox generators: vLLM's offset rollback works there
    _patch_cpu_seeded_chunked_prefill()
    _patch_cpu_pipeline_buffer()


def _discarded_generators(runner) -> dict[int, object]:
    """Generators of the requests whose sampled token this step throws away."""
    gens = runner.input_batch.generators
    if not gens:
        return {}
    num_reqs = runner.input_batch.num_reqs
    idx = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return {int(i): gens[int(i)] for i in idx if int(i) in gens}


def _patch_cpu_seeded_chunked_prefill() -> None:
    import vllm
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
    logger.info("vllm_quarot: patched vLLM %s CPU model runner: seeded requests survive "
                "chunked prefill (generator state restored instead of set_offset)",
                vllm.__version__)


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
        fmt = getattr(self.quant_config, "fmt", None)
        if fmt is not None and type(self.quant_config).__name__ == "QuaRotConfig":
            fmt.check_tensor_parallel(self.parallel_config.tensor_parallel_size)

    VllmConfig.__post_init__ = __post_init__
    VllmConfig._quarot_checks = True
