"""The ``quarot`` quantization config that vLLM looks up by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_quarot.format import QUANT_METHOD, CheckpointFormatError, OnlineHadamard, QuaRotFormat
from vllm_quarot.models import DOWN_PROJ, ROW_PARALLEL


class QuaRotConfig(QuantizationConfig):
    """Holds the validated checkpoint format; picklable (plain dataclasses)."""

    def __init__(self, fmt: QuaRotFormat | None = None):
        super().__init__()
        if fmt is None:
            # vLLM builds the config with no arguments when config.json has no
            # quantization_config: the user asked for quarot on a plain model.
            raise CheckpointFormatError(
                "--quantization quarot was given, but this checkpoint is not a QuaRot "
                "checkpoint (config.json has no quantization_config with quant_method "
                "'quarot'). Make one first: vllm-quarot quantize MODEL_DIR OUT_DIR "
                "--scheme w4a4"
            )
        self.fmt = fmt
        # kv_cache.shift: layer -> (k, v) shift [kv_heads, head_dim], read from the
        # checkpoint in maybe_update_config (main process) and pickled to the workers
        self.kv_shift: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        # rotation.input_transforms: name -> (normalised matrix, its Hadamard factors),
        # read likewise
        self.input_transforms: dict[str, tuple[torch.Tensor, Any]] = {}
        # those of them that are exactly this version's Hadamard (quantize --r1 online)
        self.plain_hadamards: set[str] = set()

    def __repr__(self) -> str:
        return f"QuaRotConfig(scheme={self.fmt.scheme!r})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuaRotConfig:
        return cls(QuaRotFormat.from_dict(config))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        if hf_quant_cfg.get("quant_method") == QUANT_METHOD:
            return QUANT_METHOD
        from vllm_quarot.validate import check_quant_method

        check_quant_method(hf_quant_cfg)  # ours, but quant_method lost: say so
        return None

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision=None):
        if hf_config is not None:
            self.fmt.check_model(hf_config)
            self.fmt.check_packing(hf_config)
            # runs in the process that builds VllmConfig (LLM / vllm serve), before the
            # engine starts: a damaged checkpoint is refused with one line
            from vllm_quarot.validate import validate_model

            validate_model(model_name, hf_config, self.fmt)
            _check_smoothing_platform(self.fmt)
            _check_pivots_platform(self.fmt)
            kv = self.fmt.kv_cache
            if kv is not None and kv.shift:
                from vllm_quarot.kv_shift import read_kv_shift

                self.kv_shift = read_kv_shift(_local_dir(model_name, revision), hf_config)
            if self.fmt.rotation.input_transforms:
                from vllm_quarot.stored_transforms import (
                    factor_hadamard,
                    is_plain_hadamard,
                    read_transforms,
                )

                mats = read_transforms(_local_dir(model_name, revision), self.fmt)
                self.input_transforms = {k: (m, factor_hadamard(m)) for k, m in mats.items()}
                self.plain_hadamards = {t.name for t in self.fmt.rotation.input_transforms
                                        if is_plain_hadamard(t.sha256, t.size)}

    def check_cache_dtype(self, cache_dtype: str) -> None:
        """A checkpoint with a kv_cache section runs with the 4-bit cache it was
        calibrated for: 'auto' or int4_per_token_head; another dtype is an error."""
        from vllm_quarot.runtime.kv_attention import KV4_DTYPE

        if self.fmt.kv_cache is None:
            return
        if self.fmt.kv_cache.bits != 4:
            raise CheckpointFormatError(
                f"the runtime serves 4-bit KV caches; the checkpoint asks for "
                f"{self.fmt.kv_cache.bits} bits")
        if cache_dtype not in ("auto", KV4_DTYPE):
            raise CheckpointFormatError(
                f"this checkpoint was quantized for a 4-bit KV cache (scheme "
                f"{self.fmt.scheme!r}); --kv-cache-dtype {cache_dtype} contradicts "
                f"it: use {KV4_DTYPE} or auto")

    def check_engine_config(self, vllm_config: Any) -> None:
        """What needs the whole engine configuration (run in the calling process by the
        quarot-config-check patch, so that LLM(...) / vllm serve refuse with one line):
        the tensor-parallel size and the KV cache dtype."""
        tp = vllm_config.parallel_config.tensor_parallel_size
        self.fmt.check_tensor_parallel(tp)
        self.fmt.check_packing(vllm_config.model_config.hf_config, tp)
        self.fmt.check_transforms_tp(tp, vllm_config.model_config.hf_config)
        if vllm_config.cache_config is not None:
            self.check_cache_dtype(vllm_config.cache_config.cache_dtype)

    def _select_kv_cache_dtype(self) -> None:
        """'auto' becomes int4_per_token_head for a checkpoint with a kv_cache section
        (before any Attention layer reads it)."""
        from vllm.config import get_current_vllm_config

        from vllm_quarot.runtime.kv_attention import KV4_DTYPE

        cache = get_current_vllm_config().cache_config
        if self.fmt.kv_cache is None or cache is None:
            return
        self.check_cache_dtype(cache.cache_dtype)
        if cache.cache_dtype == "auto":
            cache.cache_dtype = KV4_DTYPE

    def get_quant_method(
        self, layer: torch.nn.Module, prefix: str
    ) -> QuantizeMethodBase | None:
        self._select_kv_cache_dtype()
        from vllm_quarot.runtime.linear_method import QuaRotLinearMethod

        if isinstance(layer, ParallelLMHead) and self.fmt.lm_head is not None:
            from vllm_quarot.runtime.schemes import lm_head_scheme

            return QuaRotLinearMethod(lm_head_scheme(self.fmt), None, prefix)
        if not isinstance(layer, LinearBase):
            return None
        if self.fmt.weight.bits >= 16 or is_layer_skipped(
                prefix, list(self.fmt.ignore), self.packed_modules_mapping, match_mode="suffix"):
            return UnquantizedLinearMethod()  # kv4 scheme: 16-bit (rotated) weights
        from vllm_quarot.runtime.schemes import scheme_for
        from vllm_quarot.runtime.transform import HadamardTransform

        r4 = self.fmt.rotation.r4
        down = prefix.endswith(DOWN_PROJ)
        transform = (HadamardTransform(r4) if down and r4
                     else self._stored_transform(layer, prefix))
        return QuaRotLinearMethod(scheme_for(self.fmt, prefix), transform, prefix)

    def _stored_transform(self, layer: torch.nn.Module, prefix: str):
        """The stored transform of a (vLLM-merged) linear: its parts share one (the
        format refuses anything else). One that is this version's Hadamard over the
        whole input, or over each tensor-parallel block of a row-parallel input
        (``quantize --r1 online``), runs as R4 runs, fusable into the kernel's
        quantizer."""
        if not self.fmt.rotation.input_transforms:
            return None
        from vllm_quarot.models import canonical_parts
        from vllm_quarot.runtime.transform import MatrixTransform

        linear = canonical_parts(prefix)[0]
        spec = self.fmt.rotation.input_transform(linear)
        if spec is None:
            return None
        if spec.name not in self.input_transforms:
            raise CheckpointFormatError(f"transform {spec.name!r} was not read from the "
                                        "checkpoint (maybe_update_config did not run)")
        blocks = self.fmt.tp_blocks if linear.endswith(ROW_PARALLEL) else 1
        if (spec.name in self.plain_hadamards
                and getattr(layer, "input_size", None) == spec.size * blocks):
            from vllm_quarot.runtime.transform import HadamardTransform

            return HadamardTransform(OnlineHadamard.of_size(spec.size * blocks, blocks))
        return MatrixTransform(spec.name, *self.input_transforms[spec.name])


def _check_smoothing_platform(fmt: QuaRotFormat) -> None:
    """Runtime smoothing (activation.smooth) runs on the native CPU kernels (or the
    reference ops) on CPU, and on the Triton kernels on GPUs, which need triton and a
    smoothing group of a power of two from 16 to 256: refuse anything else here, in the
    process that starts the engine, with one line."""
    smooth = fmt.activation.smooth if fmt.activation is not None else None
    if smooth is None:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return
    from vllm_quarot.runtime.ops import triton as triton_ops

    if (current_platform.is_cuda() and triton_ops.AVAILABLE
            and smooth.group_size in triton_ops.SMOOTH_GROUP_SIZES):
        return
    raise CheckpointFormatError(
        f"this checkpoint smooths activations at run time (activation.smooth, group "
        f"{smooth.group_size}); off CPU vllm-quarot serves that only on CUDA GPUs with "
        f"triton and groups of {', '.join(map(str, triton_ops.SMOOTH_GROUP_SIZES))}: serve "
        "it with vLLM's CPU build, or quantize with --smooth-group 64")


def _check_pivots_platform(fmt: QuaRotFormat) -> None:
    """IntactKV pivots (kv_cache.pivots) live in the CPU KV4 backend's page layout; no
    GPU cache keeps them, so a GPU engine would silently quantize the sink tokens:
    refuse it with one line."""
    if fmt.kv_cache is None or not fmt.kv_cache.pivots:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return
    raise CheckpointFormatError(
        f"this checkpoint keeps its first {fmt.kv_cache.pivots} token(s) at 16 bits in the "
        "4-bit KV cache (kv_cache.pivots, IntactKV), which only vLLM's CPU build serves "
        "with vllm-quarot; quantize with --kv-pivots 0 for another platform")


def _local_dir(model: str, revision: str | None) -> str:
    """vLLM's model argument as a directory: itself, or the Hub snapshot holding the
    checkpoint's KV shift file (fetched like vLLM fetches the weights)."""
    import os

    if os.path.isdir(model):
        return model
    from huggingface_hub import hf_hub_download

    from vllm_quarot.format import KV_SHIFT_FILE

    try:
        path = hf_hub_download(model, KV_SHIFT_FILE, revision=revision)
    except Exception as e:
        raise CheckpointFormatError(f"{model}: cannot fetch {KV_SHIFT_FILE} ({e})") from e
    return str(Path(path).parents[1])
