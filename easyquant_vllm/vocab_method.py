"""vLLM method for a quantized vocabulary matrix (``lm_head: true``): the logits GEMM, and the input lookups when
the embeddings are tied.

The lm_head is read in full for every generated token: on Qwen2.5-1.5B (vocabulary 151,936, hidden 1536) it is
445 MiB in bf16, 40 % of what a batch-1 decode step of the int4 model reads (docs/serving.md). Quantized (8 bits
unless the checkpoint says ``lm_head_bits: 4``), it runs on the same kernels as the linear layers. With tied
embeddings the one matrix also serves the input lookups, through the ``easyquant::embedding`` op: on the native CPU
kernel they read its own tensors in place (16 rows side by side); on the dense fallback (an 8-bit matrix on CUDA)
they are rows of its W'; for any other kernel, a canonical copy is kept beside the kernel's (233 MB on
Qwen2.5-1.5B at 8 bits).

vLLM's layers (``vocab_parallel_embedding.py``): ``VocabParallelEmbedding`` (the input embedding) calls
``quant_method.embedding``, ``ParallelLMHead`` is read by the logits processor through ``quant_method.apply``, and
a tied model ties the head to the embedding through ``quant_method.tie_weights``. Both shard the vocabulary rows
over tensor-parallel ranks, each rank's block padded to a multiple of 64 rows; padding rows are exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .format import QWEIGHT, CheckpointError, quantized_weight_from_tensors, tensor_name, validate_weight
from .kernels import FALLBACK, LayerSpec
from .kernels.cpu_native import NativeCpuKernel, lookup_operands
from .kernels.op import embedding as embedding_op
from .kernels.op import embedding_operands
from .linear_method import EasyQuantLinearMethod, LayerState, ShardPlan, logger
from .sharding import pad_rows, slice_rows

if TYPE_CHECKING:
    from .vllm_config import EasyQuantConfig

_LOOKUP = "lookup_"  # buffer prefix of the canonical rows the input lookups read


@dataclass
class _TiedHead:
    """Stand-in state of a tied lm_head until loading: the embedding layer whose quantized matrix it shares (held
    outside ``nn.Module`` attributes, so that the embedding is not registered twice)."""

    embedding: torch.nn.Module


class EasyQuantVocabMethod(EasyQuantLinearMethod):
    """An input embedding or lm_head whose ``[vocab, hidden]`` matrix is quantized (docs/format.md)."""

    force_where_possible = True  # an 8-bit matrix keeps the usual kernel order where EASYQUANT_KERNEL names an int4 one

    def __init__(self, config: EasyQuantConfig, prefix: str, lookup: bool) -> None:
        super().__init__(config, prefix)
        self.bits = config.checkpoint.vocab_bits  # lm_head_bits (the converter writes 8), else the checkpoint's bits
        self.lookup = lookup  # an input embedding: keep the canonical rows for embedding()

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)  # fmt: skip
        idx = layer.shard_indices
        if idx.added_vocab_end_index > idx.added_vocab_start_index:
            raise ValueError(
                f"EasyQuant layer {self.prefix}: added vocabulary rows (LoRA extra vocab) are not supported with a "
                "quantized lm_head; convert with --no-lm-head"
            )
        # This rank's rows: the checkpoint's [org_start, org_end), then zero padding up to the partition size.
        org_rows = idx.org_vocab_end_index - idx.org_vocab_start_index
        state: LayerState = layer.easyquant
        state.shards = [ShardPlan(self.prefix, org_rows, layer.org_vocab_size, idx.org_vocab_start_index)]

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        state = layer.easyquant
        if isinstance(state, _TiedHead):
            self._share(layer, state.embedding)
            return
        if state.runs:
            return
        plan = state.shards[0]
        tensors = state.pending.pop(0, {})
        missing = [tensor_name(plan.name, s) for s in self.required if s not in tensors]
        if missing:
            raise CheckpointError(f"EasyQuant layer {state.prefix}: checkpoint has no {missing}")
        ckpt = self.config.checkpoint
        named = {tensor_name(plan.name, s): t.to("cpu") for s, t in tensors.items()}
        qw = quantized_weight_from_tensors(plan.name, named, self.bits, self.group_size, ckpt.zero_points,
                                           ckpt.column_scale, ckpt.format_version,
                                           ckpt.group_meta_bits)  # fmt: skip
        n, k = qw.shape
        if n != plan.full_rows or k != state.k_full:
            raise CheckpointError(
                f"{tensor_name(plan.name, QWEIGHT)}: holds a [{n}, {k}] vocabulary matrix, but the model expects "
                f"[{plan.full_rows}, {state.k_full}] (config.json's vocab_size / hidden_size and weights disagree?)"
            )
        part = pad_rows(slice_rows(qw, plan.row_start, plan.rows), layer.num_embeddings_per_partition)
        if part.shape[0] != n:
            validate_weight(f"{plan.name} (this rank's rows)", part)
        state.device_type = layer.qweight.device.type
        device = layer.qweight.device
        self.install(layer, [part], [plan.name])
        if self.lookup:
            self._register_lookup(layer, part, device)

    def _register_lookup(self, layer: torch.nn.Module, qw: Any, device: torch.device) -> None:
        """The tensors the input lookups read: the dense fallback's W' (rows gathered directly), the native CPU
        kernel's own (blocked rows, read in place), or a canonical copy for any other kernel."""
        runs = layer.easyquant.runs
        layer.lookup_dense = None
        if len(runs) == 1 and "weight_dequant" in runs[0].tensor_names:
            # The dense fallback (e.g. an 8-bit matrix on CUDA) holds W' in the model's dtype: its rows are the
            # lookups (the op would round the same float32 values to the same dtype), and no copy is kept.
            layer.lookup_dense = f"{runs[0].buffer_prefix}weight_dequant"
            layer.lookup_names = []
            return
        if len(runs) == 1 and isinstance(runs[0].kernel, NativeCpuKernel):
            run = runs[0]
            tensors = {name: getattr(layer, f"{run.buffer_prefix}{name}") for name in run.tensor_names}
            names, layer.lookup_meta = lookup_operands(tensors, qw)
            layer.lookup_names = [f"{run.buffer_prefix}{name}" for name in names]
            return
        tensors, layer.lookup_meta = embedding_operands(qw)
        layer.lookup_names = []
        for i, t in enumerate(tensors):
            layer.register_buffer(f"{_LOOKUP}{i}", t.contiguous().to(device), persistent=False)
            layer.lookup_names.append(f"{_LOOKUP}{i}")

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        """``W'`` rows of ``input_`` (``[T]`` ids into this rank's rows) in the model's dtype, ``[T, hidden]``."""
        if layer.lookup_dense is not None:
            return F.embedding(input_, getattr(layer, layer.lookup_dense))
        weights = [getattr(layer, name) for name in layer.lookup_names]
        return embedding_op(input_, weights, layer.lookup_meta, layer.easyquant.act_dtype)

    def _announce(self, kernel_cls: Any, reasons: list[str], spec: LayerSpec, prefix: str) -> None:
        """As the linear layers', except that an 8-bit matrix on CUDA (the converter's default lm_head; our CUDA
        kernels take 4-bit codes) is served dequantized without a warning: as fast as an unquantized head."""
        if kernel_cls is FALLBACK and spec.bits != 4 and spec.device_type == "cuda":
            logger.info("EasyQuant: the %d-bit vocabulary matrix %s is served dequantized to %s on CUDA (as an "
                        "unquantized one)", spec.bits, prefix, spec.act_dtype)  # fmt: skip
            return
        super()._announce(kernel_cls, reasons, spec, prefix)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        """A tied lm_head runs the embedding's quantized matrix: its own parameters are never loaded (the
        checkpoint has none) and are dropped; loading shares the embedding's kernel tensors with it."""
        if not isinstance(getattr(embed_tokens, "quant_method", None), EasyQuantVocabMethod):
            raise ValueError(
                f"EasyQuant checkpoint: lm_head is quantized and tied to the input embedding, but this model's vLLM "
                f"implementation does not quantize its embedding ({type(embed_tokens).__name__} with "
                f"{type(getattr(embed_tokens, 'quant_method', None)).__name__}); convert with --no-lm-head"
            )
        for suffix in self.suffixes:
            delattr(layer, suffix)
        layer.easyquant = _TiedHead(embed_tokens)
        return layer

    @staticmethod
    def _share(layer: torch.nn.Module, embed: torch.nn.Module) -> None:
        embed.quant_method.process_weights_after_loading(embed)  # idempotent; loading order is vLLM's
        state: LayerState = embed.easyquant
        for run in state.runs:
            for name in run.tensor_names:
                layer.register_buffer(f"{run.buffer_prefix}{name}", getattr(embed, f"{run.buffer_prefix}{name}"),
                                      persistent=False)  # fmt: skip
        layer.easyquant = state
