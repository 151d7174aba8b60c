"""Offline stage: rotate and quantize a Hugging Face checkpoint (``vllm-quarot quantize``).

Runs without vLLM: rotation (norm folding, R1, R2, R4), calibration, GPTQ / RTN, and
safetensors I/O. Writes the checkpoint format of ``vllm_quarot.format``.
"""
