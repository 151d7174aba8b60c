"""The vLLM linear method of QuaRot layers: a scheme (what the checkpoint stores) ×
a kernel (how this platform computes it, chosen at load), with the online R4 Hadamard
as a transform around the kernel for down_proj.

Tensor parallelism: a checkpoint quantized for N blocks (``tp_blocks``) quantizes the
inputs of the row-parallel layers (o_proj, down_proj) per (token, block of K/N) and
rotates down_proj's input block by block (R4 = I_N ⊗ H_{n/N}). At tensor-parallel size
T (T divides N) each rank holds N/T blocks: the layer runs as N/T parts, each a kernel
over its block of input columns, summed — the numbers of TP = N on every T."""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)

from vllm_quarot.format import CheckpointFormatError
from vllm_quarot.quant import unpack_weight
from vllm_quarot.runtime.kernels import QuaRotLinearKernel, choose_kernel
from vllm_quarot.runtime.schemes import QuaRotScheme
from vllm_quarot.runtime.transform import HadamardTransform, MatrixTransform

_LOADED = ("weight_packed", "weight_scale")


def _counting(loader: Callable, shards: int) -> Callable:
    """The weight loader, counting on each parameter how many of its ``shards`` (the
    parts of a merged q/k/v or gate/up) checkpoint tensors wrote: one per call with a
    shard id, all of them for a tensor fused on disk (Phi-3's qkv_proj: no shard id)."""

    def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs):
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        param.quarot_loads = getattr(param, "quarot_loads", 0) + (
            shards if shard is None else 1)
        return loader(param, loaded_weight, *args, **kwargs)

    return load


@register_weight_loader_v2_supported_method
class QuaRotLinearMethod(LinearMethodBase):
    """One instance per linear layer; ``transform`` is set for down_proj when the
    checkpoint has the online R4, and for the linears of an imported checkpoint's
    stored transforms."""

    def __init__(self, scheme: QuaRotScheme,
                 transform: HadamardTransform | MatrixTransform | None, prefix: str):
        self.scheme = scheme
        self.transform = transform
        self.prefix = prefix
        self.fused = False  # set at load: the kernel applies R4 in its quantizer
        # (module holding the part's tensors, its kernel): one part, the layer itself,
        # unless a tensor-parallel checkpoint's row-parallel layer runs by blocks
        self.parts: list[tuple[torch.nn.Module, QuaRotLinearKernel]] = []

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        k = input_size_per_partition
        fmt = self.scheme.fmt
        tp = get_tensor_model_parallel_world_size()
        fmt.check_tensor_parallel(tp)
        row_parallel = isinstance(layer, RowParallelLinear)
        # parts per rank: whole blocks of a tensor-parallel checkpoint's row-parallel inputs
        layer.quarot_parts = fmt.tp_blocks // tp if row_parallel and tp < fmt.tp_blocks else 1
        if k % layer.quarot_parts:
            raise CheckpointFormatError(
                f"{self.prefix}: input size {k} does not split into "
                f"{layer.quarot_parts} blocks")
        if isinstance(self.transform, MatrixTransform) and k % self.transform.matrix.shape[0]:
            raise CheckpointFormatError(
                f"{self.prefix}: the online transform {self.transform.name!r} of order "
                f"{self.transform.matrix.shape[0]} does not divide this rank's input ({k})")
        self.scheme.create_weights(layer, self.prefix, k, output_partition_sizes,
                                   _counting(extra_weight_attrs["weight_loader"],
                                             len(output_partition_sizes)))
        layer.quarot_in_features = k
        layer.quarot_out_features = sum(output_partition_sizes)
        layer.quarot_shards = len(output_partition_sizes)
        layer.quarot_params_dtype = params_dtype

    def _check_loaded(self, layer: torch.nn.Module) -> None:
        """Every quantized parameter was written by the checkpoint (vLLM checks for
        missing tensors only on unquantized layers)."""
        for name in _LOADED:
            loads = getattr(getattr(layer, name), "quarot_loads", 0)
            if loads < layer.quarot_shards:
                raise CheckpointFormatError(
                    f"{self.prefix}.{name}: missing from the checkpoint ({loads} of "
                    f"{layer.quarot_shards} shards loaded)")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._check_loaded(layer)
        self.scheme.process_weights_after_loading(layer, self.prefix)
        parts, n = layer.quarot_parts, layer.quarot_out_features
        k = layer.quarot_in_features // parts
        codes = unpack_weight(layer.weight_packed.data, self.scheme.w_bits,
                              layer.quarot_in_features)
        scale = layer.weight_scale.data.float().contiguous()
        device = codes.device
        config = self.scheme.linear_config(
            k, n, layer.quarot_params_dtype,
            self.transform.fusable_size if self.transform else 0, device.type)
        kernel_cls = choose_kernel(config)
        del layer.weight_packed, layer.weight_scale
        if parts == 1:
            modules = [layer]
        else:
            layer.quarot_blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(parts))
            modules = list(layer.quarot_blocks)
        if scale.shape[1] > 1 and scale.shape[1] % parts:
            raise CheckpointFormatError(
                f"{self.prefix}: {scale.shape[1]} weight groups do not split into "
                f"{parts} blocks")
        g = scale.shape[1] // parts  # scale groups per part (0: per channel, shared)
        self.parts = []
        # the kernel applies R4 itself (in its quantizer) only where it fuses one
        self.fused = bool(config.online_hadamard)
        for i, module in enumerate(modules):
            kernel = kernel_cls(config)
            if self.transform is not None:
                self.transform.process_weights_after_loading(module, device)
            if self.scheme.static and module is not layer:
                module.input_scale = layer.input_scale
            kernel.process_weights_after_loading(
                module, codes[:, i * k:(i + 1) * k].contiguous(),
                scale[:, i * g:(i + 1) * g].contiguous() if g else scale)
            self.parts.append((module, kernel))

    def _apply_part(self, i: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        module, kernel = self.parts[i]
        if self.transform is not None and not (self.fused and kernel.fuses_hadamard):
            x = self.transform.apply(module, x)
        return kernel.apply_weights(module, x, bias)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if len(self.parts) == 1:
            out = self._apply_part(0, x2, bias)
        else:  # as N/T ranks would: the bias once (rank 0), partial outputs summed
            xs = x2.split(x2.shape[1] // len(self.parts), dim=1)
            out = self._apply_part(0, xs[0].contiguous(), bias)
            for i in range(1, len(self.parts)):
                out = out + self._apply_part(i, xs[i].contiguous(), None)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @property
    def kernel(self) -> QuaRotLinearKernel:
        """The kernel of the (first) part: tests and logs."""
        return self.parts[0][1]
