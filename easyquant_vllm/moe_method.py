"""vLLM ``FusedMoEMethodBase`` for EasyQuant: every routed expert's tensors loaded, sliced for TP, one kernel op.

vLLM 0.32 builds experts with ``FusedMoEFactory``; their weights live in a ``RoutedExperts`` layer, whose
``load_weights`` maps checkpoint names ``<layer>.<e>.{gate,up,down}_proj.<suffix>`` (Mixtral: ``w1/w3/w2``) to
parameters ``w13_<suffix>`` / ``w2_<suffix>`` and calls each parameter's ``weight_loader`` with the shard id
(``w1``, ``w3``, ``w2``) and the expert id. As in the linear method, the loaders only collect: the CSR lengths
are data, and an expert's tensors are validated together. ``process_weights_after_loading`` then

1. checks that every expert of the layer has every tensor, each with the shape the model's config implies (the
   errors name the checkpoint tensor),
2. takes this rank's slice (``w13``: rows of gate and of up; ``w2``: input columns, its CSR re-indexed),
3. stacks gate and up into ``w13 = [gate; up]`` per expert (they share one column scale, docs/format.md),
4. chooses the layer's kernel (the linear layers' order, self-check and ``EASYQUANT_KERNEL``), which repacks
   all experts once.

``apply`` gets the router's ``topk_ids``/``topk_weights`` and returns this rank's partial sum (vLLM's runner
all-reduces it with TP > 1, and runs shared experts itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import Parameter
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from .format import (
    QWEIGHT,
    CheckpointError,
    quantized_weight_from_tensors,
    tensor_dtype,
    tensor_name,
    validate_weight,
)
from .kernels.moe import MoeSpec, TorchReferenceMoeKernel, choose_moe_kernel, uniform_column_scales
from .quant import QuantizedWeight, pack_factor
from .sharding import slice_columns, slice_rows, stack_rows

if TYPE_CHECKING:
    from .vllm_config import EasyQuantConfig

logger = init_logger("vllm.easyquant")

_SHARDS = ("w1", "w3", "w2")  # vLLM's shard ids: gate, up, down
_announced: set[str] = set()


@dataclass
class MoeState:
    """What the loaders collect for one MoE layer, and what its kernel runs on."""

    prefix: str  # e.g. model.layers.3.mlp.experts
    proj_names: dict[str, str]  # shard id -> checkpoint name: w1 -> gate_proj (Mixtral: w1), ...
    experts: int
    hidden: int
    intermediate: int  # the checkpoint's I
    intermediate_part: int  # this rank's I
    tp_rank: int
    act_dtype: torch.dtype
    pending: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    kernel: Any = None
    tensor_names: tuple[str, ...] = ()

    def module(self, shard: str, expert: int) -> str:
        """The checkpoint module name of one expert's projection."""
        return f"{self.prefix}.{expert}.{self.proj_names[shard]}"


def unsupported_options(layer: torch.nn.Module, moe: Any) -> list[str]:
    """The ``RoutedExperts`` options this method does not implement, each as a sentence (empty: supported)."""
    problems = []
    activation = getattr(moe.activation, "value", str(moe.activation))
    if activation != "silu" or not moe.is_act_and_mul:
        problems.append(f"activation {activation!r} (EasyQuant MoE layers implement SiLU-gated experts only)")
    if getattr(layer, "apply_router_weight_on_input", False):
        problems.append("apply_router_weight_on_input=True")
    if moe.has_bias:
        problems.append("expert biases")
    if moe.moe_parallel_config.use_ep or moe.num_local_experts != moe.num_experts:
        problems.append("expert parallelism (--enable-expert-parallel): use tensor parallelism instead")
    if moe.num_experts != moe.num_logical_experts:
        problems.append("redundant or fused shared experts (EPLB, shared-expert fusion)")
    for name in ("swiglu_limit", "swiglu_alpha", "swiglu_beta"):
        if getattr(moe, name, None) is not None:
            problems.append(f"{name}")
    if getattr(moe, "intermediate_pad", None):
        problems.append("a padded intermediate size")
    return problems


class EasyQuantMoEMethod(FusedMoEMethodBase):
    """The routed experts of an EasyQuant checkpoint (docs/format.md, "Mixture-of-experts layers")."""

    def __init__(self, config: EasyQuantConfig, prefix: str, layer: torch.nn.Module) -> None:
        super().__init__(layer.moe_config)
        self.config = config
        self.prefix = prefix
        self.bits = config.checkpoint.bits
        self.group_size = config.checkpoint.group_size
        own = [m for m in config.checkpoint.group_sizes if m.startswith(prefix + ".")]
        if own:  # the converter's --bits-per-weight leaves routed experts at the checkpoint's group size
            raise CheckpointError(
                f"EasyQuant MoE layer {prefix}: config.json's group_sizes gives its expert {own[0]} its own group "
                "size; the experts of one layer must all have the checkpoint's group_size"
            )
        self.suffixes = config.checkpoint.all_suffixes()  # declared (version 3: some are per layer)
        self.required = config.checkpoint.layer_suffixes()
        problems = unsupported_options(layer, layer.moe_config)
        if problems:
            raise ValueError(f"EasyQuant MoE layer {prefix}: not supported: " + "; ".join(problems))

    def maybe_roundup_sizes(self, hidden_size: int, intermediate_size_per_partition: int, act_dtype: torch.dtype,
                            moe_parallel_config: Any) -> tuple[int, int]:  # fmt: skip
        return hidden_size, intermediate_size_per_partition  # the checkpoint's shapes: never padded

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> None:
        return None  # our kernels do not go through vLLM's modular MoE kernels

    # Layout contract of the declared parameters: every one a [0] placeholder with our loader. The loader stashes
    # each expert's canonical tensors (docs/format.md: qweight [N, K/8] int32, scales [N, K/G] fp16, CSR, qzeros,
    # col_scale), keyed by (shard id, expert id); w13 = gate (w1) and up (w3) [I, H] each, w2 = down [H, I].
    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:  # fmt: skip
        moe = layer.moe_config
        tp_size, tp_rank = moe.moe_parallel_config.tp_size, moe.moe_parallel_config.tp_rank
        part = intermediate_size_per_partition
        g, pf = self.group_size, pack_factor(self.bits)
        for what, k in (("hidden size", hidden_size), ("intermediate size per rank", part)):
            if k % pf or (g != -1 and k % g):
                raise ValueError(
                    f"EasyQuant MoE layer {self.prefix}: its {what} {k} (tensor parallel size {tp_size}) must be a "
                    f"multiple of {pf} and of the checkpoint's group size {g}. Use a smaller tensor-parallel size, "
                    "or convert with a group size that divides it"
                )
        state = MoeState(
            prefix=self.prefix,
            proj_names={
                "w1": layer.ckpt_gate_proj_name,
                "w3": layer.ckpt_up_proj_name,
                "w2": layer.ckpt_down_proj_name,
            },
            experts=num_experts,
            hidden=hidden_size,
            intermediate=part * tp_size,
            intermediate_part=part,
            tp_rank=tp_rank,
            act_dtype=params_dtype,
        )
        layer.easyquant = state
        for stem in ("w13", "w2"):
            for suffix in self.suffixes:
                param = Parameter(torch.empty(0, dtype=tensor_dtype(suffix, self.config.checkpoint.format_version)),
                                  requires_grad=False)  # fmt: skip
                set_weight_attrs(param, {"weight_loader": _ExpertLoader(state, suffix)})
                layer.register_parameter(f"{stem}_{suffix}", param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        state: MoeState = layer.easyquant
        if state.kernel is not None:  # already processed (vLLM may call this more than once)
            return
        ckpt = self.config.checkpoint
        lo, part = state.tp_rank * state.intermediate_part, state.intermediate_part
        experts = []
        for e in range(state.experts):
            loaded = {}
            for shard in _SHARDS:
                name = state.module(shard, e)
                tensors = state.pending.pop((shard, e), {})
                missing = [tensor_name(name, s) for s in self.required if s not in tensors]
                if missing:
                    raise CheckpointError(
                        f"EasyQuant MoE layer {state.prefix}: checkpoint has no {missing} (config.json announces "
                        f"{state.experts} experts)"
                    )
                named = {tensor_name(name, s): t.to("cpu") for s, t in tensors.items()}
                qw = quantized_weight_from_tensors(name, named, self.bits, self.group_size, ckpt.zero_points,
                                                   ckpt.column_scale, ckpt.format_version,
                                                   ckpt.group_meta_bits)  # fmt: skip
                expected = (state.hidden, state.intermediate) if shard == "w2" else (state.intermediate, state.hidden)
                if qw.shape != expected:
                    raise CheckpointError(
                        f"{tensor_name(name, QWEIGHT)}: holds a {list(qw.shape)} weight, but the model expects "
                        f"{list(expected)} (config.json and weights disagree?)"
                    )
                if part != state.intermediate:  # tensor parallel: this rank's slice, re-validated
                    qw = slice_columns(qw, lo, part) if shard == "w2" else slice_rows(qw, lo, part)
                    validate_weight(f"{name} (this rank's slice)", qw)
                loaded[shard] = qw
            try:
                w13 = stack_rows([loaded["w1"], loaded["w3"]], [state.module("w1", e), state.module("w3", e)])
            except ValueError as err:
                raise CheckpointError(f"EasyQuant MoE layer {state.prefix}: {err}") from None
            experts.append((w13, loaded["w2"]))
        if state.pending:
            (shard, e), _ = next(iter(sorted(state.pending.items())))
            raise CheckpointError(
                f"{state.module(shard, e)}: the checkpoint holds expert {e}, but config.json announces "
                f"{state.experts} experts for {state.prefix}"
            )
        self._install(layer, state, experts, layer.w13_qweight.device)
        for stem in ("w13", "w2"):
            for suffix in self.suffixes:
                delattr(layer, f"{stem}_{suffix}")

    def _install(self, layer: torch.nn.Module, state: MoeState, experts: list[tuple[QuantizedWeight, QuantizedWeight]],
                 device: torch.device) -> None:  # fmt: skip
        """Choose the kernel, repack every expert once, register the result as the layer's buffers."""
        experts = uniform_column_scales(experts)
        w13 = experts[0][0]
        spec = MoeSpec(state.experts, state.hidden, state.intermediate_part, self.bits, self.group_size,
                       state.act_dtype, device.type, zero_points=w13.zeros is not None,
                       column_scale=w13.col_scale is not None,
                       compact_steps=w13.row_steps is not None)  # fmt: skip
        kernel_cls, reasons = choose_moe_kernel(spec, device, where=state.prefix)
        if kernel_cls.name not in _announced:
            _announced.add(kernel_cls.name)
            if kernel_cls is TorchReferenceMoeKernel and reasons:
                logger.warning(
                    "EasyQuant: no int4 MoE kernel for %s (%s); using %s: experts are dequantized once at load "
                    "(exact, but as much memory as an unquantized model)", spec, "; ".join(reasons), kernel_cls.name
                )  # fmt: skip
            else:
                logger.info("EasyQuant: MoE layers use kernel %s (e.g. %s)", kernel_cls.name, state.prefix)
        kernel = kernel_cls(spec, device)
        tensors = kernel.prepare(experts)
        for name, t in tensors.items():
            # The offsets stay on the CPU: the op reads them on the host to slice each expert's outliers.
            layer.register_buffer(f"eq_{name}", t if name.endswith("offsets") else t.to(device), persistent=False)
        state.kernel, state.tensor_names = kernel, tuple(tensors)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts: Any = None, shared_experts_input: Any = None) -> torch.Tensor:  # fmt: skip
        """``x [M, H]`` with the router's choices -> ``[M, H]``, this rank's partial sum; shared experts are the
        runner's."""
        state: MoeState = layer.easyquant
        tensors = {name: getattr(layer, f"eq_{name}") for name in state.tensor_names}
        return state.kernel.apply(tensors, x, topk_ids, topk_weights)


class _ExpertLoader:
    """``weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success)`` for one suffix."""

    def __init__(self, state: MoeState, suffix: str) -> None:
        self.state = state
        self.suffix = suffix

    def __call__(self, param: Parameter, loaded_weight: torch.Tensor, weight_name: str = "", shard_id: str = "",
                 expert_id: int = -1, return_success: bool = False) -> bool | None:  # fmt: skip
        state = self.state
        if shard_id not in _SHARDS:
            raise CheckpointError(f"{state.prefix}: {weight_name}: unknown expert shard id {shard_id!r}")
        if not 0 <= expert_id < state.experts:
            raise CheckpointError(
                f"{state.module(shard_id, expert_id)}.{self.suffix}: the checkpoint holds expert {expert_id}, but "
                f"config.json announces {state.experts} experts for {state.prefix}"
            )
        state.pending.setdefault((shard_id, int(expert_id)), {})[self.suffix] = loaded_weight
        return True if return_success else None
