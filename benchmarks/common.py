"""Helpers the benchmarks share: a one-process vLLM world (vLLM's parameters ask for
their tensor-parallel rank) and a QuaRot linear layer served by a given kernel."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        cleanup_dist_env_and_memory,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            cleanup_dist_env_and_memory()


def kernel_layer(kernel: type | None, config, codes: torch.Tensor, scale: torch.Tensor,
                 input_scale: torch.Tensor | None = None) -> tuple[Callable, str]:
    """(x -> y, kernel class name) for one layer: the online R4 (config.online_hadamard)
    applied as the plugin does (fused into the kernel, or the transform first).
    kernel None: the one the plugin's chooser picks for config."""
    from vllm_quarot.format import OnlineHadamard
    from vllm_quarot.runtime.kernels import choose_kernel
    from vllm_quarot.runtime.transform import HadamardTransform

    cls = kernel or choose_kernel(config)
    ok, why = cls.can_implement(config)
    if not ok:
        raise ValueError(f"{cls.__name__}: {why}")
    layer = torch.nn.Module()
    if input_scale is not None:
        layer.input_scale = torch.nn.Parameter(input_scale, requires_grad=False)
    transform = None
    if config.online_hadamard:
        transform = HadamardTransform(OnlineHadamard.of_size(config.online_hadamard))
        transform.process_weights_after_loading(layer, codes.device)
    k = cls(config)
    k.process_weights_after_loading(layer, codes, scale)

    def run(x: torch.Tensor) -> torch.Tensor:
        if transform is not None and not k.fuses_hadamard:
            x = transform.apply(layer, x)
        return k.apply_weights(layer, x, None)

    return run, cls.__name__
