"""vllm-quarot: serve QuaRot-rotated low-bit checkpoints with vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: registers the ``quarot`` quantization method.

    vLLM calls it once in every process (API server, engine core, workers).
    """
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        register_quantization_config,
    )

    if "quarot" in QUANTIZATION_METHODS:
        return
    from vllm_quarot.quant_config import QuaRotConfig

    register_quantization_config("quarot")(QuaRotConfig)
