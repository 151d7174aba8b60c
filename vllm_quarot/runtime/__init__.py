"""Runtime stage, inside vLLM: the ``quarot`` quantization config, the linear method
(schemes × kernels, online R4), the 4-bit KV cache with R3, and the ops they call."""
