"""vllm-quarot: serve QuaRot-rotated low-bit checkpoints with vLLM."""

__version__ = "0.15.4"


def register() -> None:
    """vLLM general-plugin entry point: registers the ``quarot`` quantization method
    and, on CPU, the attention backend that serves the 4-bit KV cache.

    vLLM calls it once in every process (API server, engine core, workers).
    """
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        register_quantization_config,
    )

    from vllm_quarot.runtime import vllm_patches  # vLLM fixes, in every process

    vllm_patches.apply()
    if "quarot" in QUANTIZATION_METHODS:
        return
    from vllm_quarot.runtime.config import QuaRotConfig

    register_quantization_config("quarot")(QuaRotConfig)

    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # KV4 on CPU: override CPU_ATTN (the CPU platform ignores CUSTOM); 16-bit
        # caches still run vLLM's own kernels through it.
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CPU_ATTN,
                         "vllm_quarot.runtime.kv_attention.QuaRotCPUAttentionBackend")
