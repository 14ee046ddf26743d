"""vLLM ``QuantizationConfig`` for EasyQuant checkpoints: parse ``quantization_config``, pick layer methods.

Imported (and thereby registered under the name "easyquant") by :func:`easyquant_vllm.register`, the
``vllm.general_plugins`` entry point, in every vLLM process.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from .format import QUANT_METHOD, CheckpointError, EasyQuantCheckpointConfig

NOT_AN_EASYQUANT_CHECKPOINT = (
    "--quantization easyquant: this model's config.json has no quantization_config, so it is not an "
    "EasyQuant checkpoint. Convert it first: easyquant-convert MODEL_DIR OUT_DIR, then serve OUT_DIR"
)


@register_quantization_config(QUANT_METHOD)
class EasyQuantConfig(QuantizationConfig):
    """EasyQuant: int4/int8 group codes (format version 2, the default: zero points and column scales; version
    1: symmetric) + float16 CSR outliers (docs/format.md)."""

    def __init__(self, checkpoint: EasyQuantCheckpointConfig | None = None) -> None:
        super().__init__()
        if checkpoint is None:
            # vLLM constructs the class without arguments when --quantization names it but the
            # model has no quantization_config: say what is wrong instead of failing later.
            raise ValueError(NOT_AN_EASYQUANT_CHECKPOINT)
        self.checkpoint = checkpoint
        self.modules_to_not_convert = set(checkpoint.modules_to_not_convert)

    def __repr__(self) -> str:
        c = self.checkpoint
        return f"EasyQuantConfig(bits={c.bits}, group_size={c.group_size}, format_version={c.format_version})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # the oldest architecture CUDA 13 compiles for; the CPU path ignores it

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EasyQuantConfig:
        try:
            return cls(EasyQuantCheckpointConfig.from_dict(config))
        except CheckpointError as e:
            raise ValueError(f"EasyQuant checkpoint: {e}") from None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Models whose vLLM module names differ from the checkpoint's rename our skip list too."""
        self.modules_to_not_convert = set(hf_to_vllm_mapper.apply_list(sorted(self.modules_to_not_convert)))

    def checkpoint_names(self, prefix: str) -> list[str]:
        """Checkpoint module names behind a vLLM layer: ``...qkv_proj`` -> ``...q_proj, ...k_proj, ...v_proj``."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf, [leaf])
        return [f"{parent}.{s}" if parent else s for s in shards]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings and lm_head stay unquantized
        names = self.checkpoint_names(prefix)
        skipped = [n in self.modules_to_not_convert for n in names]
        if all(skipped):
            return UnquantizedLinearMethod()
        if any(skipped):
            raise ValueError(
                f"EasyQuant checkpoint: {prefix} fuses {names}, but only some are quantized "
                f"(modules_to_not_convert has {[n for n, s in zip(names, skipped, strict=True) if s]})"
            )
        from .linear_method import EasyQuantLinearMethod

        return EasyQuantLinearMethod(self, prefix)
