"""The ``quarot`` quantization config that vLLM looks up by name."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

from vllm_quarot.format import QUANT_METHOD, CheckpointFormatError, QuaRotFormat


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
        return None

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision=None):
        if hf_config is not None:
            self.fmt.check_model(hf_config)
        if self.fmt.kv_cache is not None:
            raise CheckpointFormatError(
                "this checkpoint quantizes the KV cache (quantization_config.kv_cache), "
                "which this version of the vllm-quarot runtime cannot serve yet"
            )

    def get_quant_method(
        self, layer: torch.nn.Module, prefix: str
    ) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        name = prefix.rsplit(".", 1)[-1]
        if name in self.fmt.ignore or prefix in self.fmt.ignore:
            return UnquantizedLinearMethod()
        from vllm_quarot.linear_method import QuaRotLinearMethod

        online = name == "down_proj" and self.fmt.rotation.r4_size > 0
        return QuaRotLinearMethod(self.fmt, online_hadamard=online, prefix=prefix)
