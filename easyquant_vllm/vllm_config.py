"""vLLM ``QuantizationConfig`` for EasyQuant checkpoints: parse ``quantization_config``, pick layer methods.

Imported (and thereby registered under the name "easyquant") by :func:`easyquant_vllm.register`, the
``vllm.general_plugins`` entry point, in every vLLM process.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.platforms import current_platform

from .format import QUANT_METHOD, CheckpointError, EasyQuantCheckpointConfig

ROUTERS = (".gate", ".shared_expert_gate")
"""Module-name endings of MoE routers and shared-expert gates: kept in full precision (docs/format.md)."""

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
        if self.checkpoint.group_sizes:  # looked up by the vLLM module name too
            renamed = {}
            for name, g in self.checkpoint.group_sizes.items():
                mapped = hf_to_vllm_mapper.apply_list([name])
                if mapped:
                    renamed[mapped[0]] = g
            self.checkpoint = replace(self.checkpoint, group_sizes=renamed)

    def checkpoint_names(self, prefix: str) -> list[str]:
        """Checkpoint module names behind a vLLM layer: ``...qkv_proj`` -> ``...q_proj, ...k_proj, ...v_proj``."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf, [leaf])
        return [f"{parent}.{s}" if parent else s for s in shards]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if current_platform.is_cpu():  # the engine's process, before the model's tensors are allocated
            from .kernels.cpu_native import tune_malloc

            tune_malloc()
        if isinstance(layer, RoutedExperts):
            return self._moe_method(layer, prefix)
        if isinstance(layer, VocabParallelEmbedding):
            return self._vocab_method(layer, prefix)
        if not isinstance(layer, LinearBase):
            return None
        if prefix.endswith(ROUTERS):  # never quantized (docs/format.md), whatever the skip list says
            return UnquantizedLinearMethod()
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

    def _vocab_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """The lm_head's method, and the input embedding's where the embeddings are tied (the one matrix is then
        quantized); None (unquantized) unless the checkpoint says ``lm_head: true``."""
        if not self.checkpoint.lm_head:
            return None
        from .vocab_method import EasyQuantVocabMethod

        tied = _tied_embeddings()
        # Only the matrix the checkpoint quantized: not a model's extra heads or embeddings (MTP heads, Gemma-3n's
        # per-layer embeddings) built with the same quant config. Unknown names (no local directory): trust the model.
        names = _model_checkpoint_names()
        if not prefix:  # vLLM's Llama builds its input embedding without a prefix: name it from the checkpoint
            found = [n.removesuffix(".qweight") for n in names if n.endswith("embed_tokens.qweight")]
            prefix = found[0] if len(found) == 1 else prefix
        quantized = not names or not prefix or f"{prefix}.qweight" in names
        if isinstance(layer, ParallelLMHead):
            return EasyQuantVocabMethod(self, prefix, lookup=False) if tied or quantized else None
        return EasyQuantVocabMethod(self, prefix, lookup=True) if tied and quantized else None

    def _moe_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """The routed experts' method: ours, or None (vLLM's unquantized one) where the checkpoint left every expert
        of this layer unquantized; a layer with only some experts quantized is an error."""
        skipped = sorted(m for m in self.modules_to_not_convert if m.startswith(prefix + "."))
        if skipped:
            expected = 3 * layer.global_num_experts
            if len(skipped) < expected:
                raise ValueError(
                    f"EasyQuant checkpoint: MoE layer {prefix} has {len(skipped)} of its {expected} expert projections "
                    f"unquantized (e.g. {skipped[0]}); a MoE layer runs one method for all experts"
                )
            return None
        _check_expert_count(prefix, layer.global_num_experts)
        from .moe_method import EasyQuantMoEMethod

        return EasyQuantMoEMethod(self, prefix, layer)


def _tied_embeddings() -> bool:
    """Whether the model being built ties its lm_head to the input embedding (Hugging Face's default: True)."""
    from vllm.config import get_current_vllm_config_or_none

    model_config = getattr(get_current_vllm_config_or_none(), "model_config", None)
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    return bool(getattr(hf, "tie_word_embeddings", True))


def _model_checkpoint_names() -> tuple[str, ...]:
    """Tensor names of the model being loaded (a local directory), from its safetensors headers; () if unknown."""
    from vllm.config import get_current_vllm_config_or_none

    model = getattr(getattr(get_current_vllm_config_or_none(), "model_config", None), "model", None)
    return _checkpoint_names(str(model)) if model and Path(model).is_dir() else ()


def _check_expert_count(prefix: str, experts: int) -> None:
    """The checkpoint must not hold experts beyond the config's count: vLLM's loader maps only experts
    ``0 .. E-1`` and silently drops the rest, so a wrong count would serve a different model without a word.
    Read from the safetensors headers of the model being loaded (a local directory; nothing else is checked)."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    model = getattr(getattr(vllm_config, "model_config", None), "model", None)
    if not model or not Path(model).is_dir():
        return
    found = _expert_tensors(str(model), prefix)
    beyond = sorted((e, name) for e, name in found if e >= experts)
    if beyond:
        raise ValueError(
            f"EasyQuant checkpoint: {beyond[0][1]}: the checkpoint holds expert {beyond[0][0]}, but config.json "
            f"announces {experts} experts for {prefix}"
        )
    missing = sorted(set(range(experts)) - {e for e, _ in found}) if found else []
    if missing:
        raise ValueError(
            f"EasyQuant checkpoint: no tensor {prefix}.{missing[0]}.*: config.json announces {experts} experts for "
            f"{prefix}, the checkpoint holds {experts - len(missing)}"
        )


@functools.cache
def _checkpoint_names(model_dir: str) -> tuple[str, ...]:
    from .safetensors_io import resolve_weight_files

    try:
        return tuple(resolve_weight_files(model_dir))
    except CheckpointError:
        return ()  # the loader reports a broken checkpoint itself


def _expert_tensors(model_dir: str, prefix: str) -> list[tuple[int, str]]:
    """``(expert id, tensor name)`` of every tensor named ``<prefix>.<e>.*`` in the checkpoint."""
    head = prefix + "."
    out = []
    for name in _checkpoint_names(model_dir):
        if name.startswith(head):
            e, _, rest = name[len(head) :].partition(".")
            if e.isdigit() and rest:
                out.append((int(e), name))
    return out
