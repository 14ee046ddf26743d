"""vLLM ``LinearMethod`` for EasyQuant: declare a layer's tensors, load shards, slice for TP, run a kernel.

Loading in three steps:

1. ``create_weights`` declares ``qweight``, ``scales``, the three CSR tensors and (format version 2, the
   default) ``qzeros`` and ``col_scale`` of the layer partition, so
   that every checkpoint tensor name has a parameter to land in. Each carries our own ``weight_loader``.
2. The loader receives whole checkpoint tensors, one per (shard, tensor): ``q``/``k``/``v`` of a QKV layer,
   ``0``/``1`` of gate/up, or the whole layer. The shard id arrives as a third argument or as
   ``loaded_weight.shard_id``. The loader only collects them: the CSR arrays' lengths are data, and the
   tensors of a shard must be validated together.
3. ``process_weights_after_loading`` validates each shard against the schema (the errors name the
   checkpoint tensor), takes this rank's slice, stacks the shards, and hands the result to the chosen
   kernel, which repacks it once. The canonical parameters are then dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import Parameter
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase, QKVParallelLinear
from vllm.model_executor.utils import set_weight_attrs

from .format import (
    COL_SCALE,
    OUTLIER_INDICES,
    OUTLIER_INDPTR,
    OUTLIER_VALUES,
    QWEIGHT,
    QZEROS,
    ROW_STEPS,
    SCALES,
    CheckpointError,
    quantized_weight_from_tensors,
    tensor_dtype,
    tensor_name,
    validate_weight,
)
from .kernels import FALLBACK, LayerSpec, TorchReferenceKernel, choose_kernel
from .quant import effective_group_size, pack_factor
from .sharding import slice_columns, slice_rows, stack_rows

if TYPE_CHECKING:
    from .vllm_config import EasyQuantConfig

logger = init_logger("vllm.easyquant")  # under "vllm" so that vLLM's log handlers show it

_QKV_SHARDS = ("q", "k", "v")
_WHOLE = -1  # shard index of a tensor that covers the whole (fused-on-disk) layer
_kernels_announced: set[str] = set()


@dataclass(frozen=True)
class ShardPlan:
    """Where one logical shard of the checkpoint goes in this rank's partition."""

    name: str  # checkpoint module name, e.g. model.layers.0.self_attn.k_proj
    rows: int  # rows of this shard in this rank's partition
    full_rows: int  # rows of this shard in the checkpoint
    row_start: int  # first checkpoint row this rank takes


@dataclass
class LayerState:
    prefix: str
    shards: list[ShardPlan]
    k_full: int
    k_part: int
    col_start: int  # first input column this rank takes (row-parallel layers)
    act_dtype: torch.dtype
    device_type: str = "cpu"
    pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    runs: list[KernelRun] = field(default_factory=list)

    @property
    def kernel(self) -> Any:
        """The layer's kernel (the first run's; None before loading)."""
        return self.runs[0].kernel if self.runs else None


@dataclass
class KernelRun:
    """One kernel call of a layer: its rows ``[row_start, row_start + rows)`` of the layer's output. A fused
    layer whose shards carry different column scales runs one call per run of shards that share one."""

    kernel: Any
    tensor_names: tuple[str, ...]
    row_start: int
    rows: int
    buffer_prefix: str


def plan_shards(
    layer: torch.nn.Module, prefix: str, names: list[str], output_partition_sizes: list[int], output_size: int
) -> list[ShardPlan]:
    """Rows of each logical shard for this rank, mirroring vLLM's own column-parallel loaders.

    A column-parallel layer of TP size t keeps ``1/t`` of every shard's rows. For QKV with more ranks
    than KV heads, each KV head is replicated on ``num_kv_head_replicas`` ranks, so rank r takes
    KV block ``r // replicas``.
    """
    col_tp = output_size // sum(output_partition_sizes)  # 1 unless column-parallel with TP > 1
    tp_rank = getattr(layer, "tp_rank", 0) if col_tp > 1 else 0
    replicas = getattr(layer, "num_kv_head_replicas", 1)
    is_qkv = isinstance(layer, QKVParallelLinear)
    if len(names) != len(output_partition_sizes):
        names = [f"{prefix}[shard {i}]" for i in range(len(output_partition_sizes))]
    plans = []
    for i, (rows, name) in enumerate(zip(output_partition_sizes, names, strict=True)):
        if is_qkv and i > 0:
            plans.append(ShardPlan(name, rows, rows * col_tp // replicas, (tp_rank // replicas) * rows))
        else:
            plans.append(ShardPlan(name, rows, rows * col_tp, tp_rank * rows))
    return plans


class EasyQuantLinearMethod(LinearMethodBase):
    """Linear layers of an EasyQuant checkpoint (docs/format.md), on the best kernel for each shape."""

    force_where_possible = False
    """``EASYQUANT_KERNEL`` applies to this layer only where the forced kernel can run it (see ``select_kernel``)."""

    def __init__(self, config: EasyQuantConfig, prefix: str) -> None:
        self.config = config
        self.prefix = prefix
        self.bits = config.checkpoint.bits
        # Per checkpoint module (config.json's group_sizes): the fused layer itself where the checkpoint stores it
        # whole, else each shard's. Shards at different sizes run as separate GEMMs (_runs).
        names = [prefix, *config.checkpoint_names(prefix)]
        self.group_size = max(map(config.checkpoint.group_size_of, names))  # the one tensor parallelism divides by
        self.suffixes = config.checkpoint.all_suffixes()  # declared (version 3: some are per layer)
        self.required = config.checkpoint.layer_suffixes()

    # Layout contract of the declared parameters (canonical, per rank partition [N_part, K_part]):
    #   qweight          int32   [N_part, K_part / pack_factor]   packed along K
    #   scales           float16 [N_part, K_part / G] ([N_part, 1] per channel)
    #   outlier_indptr   int32   [0] placeholder; the CSR arrays are assembled at load
    #   outlier_indices  int32   [0] placeholder
    #   outlier_values   float16 [0] placeholder
    #   qzeros           uint8   [0] placeholder (format version 2 with zero_points; version 3)
    #   col_scale        float16 [0] placeholder (format versions 2 and 3 with column_scale)
    #   row_steps        float16 [0] placeholder (format version 3; its scales are then uint8 step multipliers)
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
        k_part = input_size_per_partition
        n_part = sum(output_partition_sizes)
        pf = pack_factor(self.bits)
        row_tp = input_size // k_part
        g = effective_group_size(k_part, self.group_size)
        if k_part % pf or (self.group_size != -1 and k_part % self.group_size):
            raise ValueError(
                f"EasyQuant layer {self.prefix}: its input dim {input_size} split over {row_tp} tensor-parallel "
                f"ranks gives {k_part} columns per rank, which must be a multiple of {pf} and of the "
                f"layer's group size {self.group_size}. Use a smaller tensor-parallel size, or convert "
                "with a group size that divides it (easyquant-convert --bits-per-weight off: groups of 32 everywhere)"
            )
        names = self.config.checkpoint_names(self.prefix)
        state = LayerState(
            prefix=self.prefix,
            shards=plan_shards(layer, self.prefix, names, output_partition_sizes, output_size),
            k_full=input_size,
            k_part=k_part,
            col_start=(getattr(layer, "tp_rank", 0) * k_part) if row_tp > 1 else 0,
            act_dtype=params_dtype,
        )
        layer.easyquant = state
        shapes = {
            QWEIGHT: (n_part, k_part // pf),
            SCALES: (n_part, k_part // g),
            OUTLIER_INDPTR: (0,),
            OUTLIER_INDICES: (0,),
            OUTLIER_VALUES: (0,),
            QZEROS: (0,),
            COL_SCALE: (0,),
            ROW_STEPS: (0,),
        }
        version = self.config.checkpoint.format_version
        for suffix in self.suffixes:
            shape = shapes[suffix]
            param = Parameter(torch.empty(shape, dtype=tensor_dtype(suffix, version)), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": _Loader(state, suffix)})
            layer.register_parameter(suffix, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        state: LayerState = layer.easyquant
        if state.runs:  # already processed (vLLM may call this more than once)
            return
        device = layer.qweight.device
        state.device_type = device.type
        parts = []
        if _WHOLE in state.pending:
            if len(state.shards) > 1 and state.shards[0].full_rows != state.shards[0].rows:
                raise CheckpointError(
                    f"{state.prefix}: the checkpoint stores this fused layer as one tensor; tensor parallelism "
                    "over fused-on-disk layers is not supported, use --tensor-parallel-size 1"
                )
            whole = ShardPlan(state.prefix, sum(s.rows for s in state.shards), sum(s.rows for s in state.shards), 0)
            plans = [(whole, state.pending.pop(_WHOLE))]
        else:
            plans = [(plan, state.pending.pop(i, {})) for i, plan in enumerate(state.shards)]
        ckpt = self.config.checkpoint
        for plan, tensors in plans:
            missing = [s for s in self.required if s not in tensors]
            if missing:
                raise CheckpointError(
                    f"EasyQuant layer {state.prefix}: checkpoint has no {[tensor_name(plan.name, s) for s in missing]}"
                )
            named = {tensor_name(plan.name, s): t.to("cpu") for s, t in tensors.items()}
            qw = quantized_weight_from_tensors(plan.name, named, self.bits, ckpt.group_size_of(plan.name),
                                               ckpt.zero_points, ckpt.column_scale, ckpt.format_version,
                                               ckpt.group_meta_bits)  # fmt: skip
            n, k = qw.shape
            if n != plan.full_rows or k != state.k_full:
                raise CheckpointError(
                    f"{tensor_name(plan.name, QWEIGHT)}: holds a [{n}, {k}] weight, but the model expects "
                    f"[{plan.full_rows}, {state.k_full}] for this layer (config.json and weights disagree?)"
                )
            if plan.rows != n:
                qw = slice_rows(qw, plan.row_start, plan.rows)
            if state.k_part != k:
                qw = slice_columns(qw, state.col_start, state.k_part)
            if (plan.rows, state.k_part) != (n, k):  # defence in depth: the kernels trust the CSR they are handed
                validate_weight(f"{plan.name} (this rank's slice)", qw)
            parts.append(qw)
        self.install(layer, parts, [p.name for p, _ in plans])

    def install(self, layer: torch.nn.Module, parts: list[Any], names: list[str]) -> None:
        """Choose the kernel for this rank's shards ``parts`` (validated, sliced; ``names`` for messages), let it
        repack them and register its tensors as the layer's buffers; drop the canonical parameters."""
        state: LayerState = layer.easyquant
        device = layer.qweight.device
        runs = _runs(parts)
        total = sum(p.shape[0] for p in parts)
        spec = self._spec(total, state, parts[0])
        kernel_cls, reasons = choose_kernel(spec, device, state.prefix, self.force_where_possible)
        self._announce(kernel_cls, reasons, spec, state.prefix)
        if kernel_cls is FALLBACK and len(runs) > 1:
            # The dense fallback holds W' itself, column scales included: one GEMM whatever the shards carry.
            kernel = kernel_cls(spec, device)
            weight = torch.cat([p.dequantize(state.act_dtype) for p in parts])
            state.runs = [self._install(layer, kernel, {"weight_dequant": weight}, device, 0, total, "eq_", True)]
        else:
            row_start = 0
            for i, run in enumerate(runs):
                try:  # on the CPU: repacking never costs GPU memory
                    run_names = names[sum(len(r) for r in runs[:i]) :][: len(run)]
                    qw = stack_rows(run, run_names) if len(run) > 1 else run[0]
                    if len(run) > 1:  # defence in depth: the kernels trust the CSR they are handed
                        validate_weight(f"{state.prefix} (stacked {', '.join(run_names)})", qw)
                except ValueError as e:
                    raise CheckpointError(f"EasyQuant layer {state.prefix}: {e}") from None
                if len(runs) > 1:  # each run is its own GEMM (shapes differ: the kernel may too)
                    spec = self._spec(qw.shape[0], state, qw)
                    kernel_cls, reasons = choose_kernel(spec, device, state.prefix, self.force_where_possible)
                    self._announce(kernel_cls, reasons, spec, state.prefix)
                kernel = kernel_cls(spec, device)
                prefix = "eq_" if len(runs) == 1 else f"eq{i}_"
                state.runs.append(self._install(layer, kernel, kernel.prepare(qw), device, row_start, qw.shape[0],
                                                prefix, len(runs) == 1))  # fmt: skip
                row_start += qw.shape[0]
        for suffix in self.suffixes:  # the canonical parameters are not needed any more
            delattr(layer, suffix)

    def _spec(self, rows: int, state: LayerState, qw: Any) -> LayerSpec:
        return LayerSpec.of(qw, state.act_dtype, state.device_type, n=rows)

    @staticmethod
    def _announce(kernel_cls: Any, reasons: list[str], spec: LayerSpec, prefix: str) -> None:
        if kernel_cls.name in _kernels_announced:
            return
        _kernels_announced.add(kernel_cls.name)
        if kernel_cls is FALLBACK and reasons:
            logger.warning(
                "EasyQuant: no int4 kernel for %s (%s); using %s: weights are dequantized once at load "
                "(exact, but as much memory as an unquantized model)", spec, "; ".join(reasons), kernel_cls.name
            )  # fmt: skip
        else:
            logger.info("EasyQuant: using kernel %s (e.g. for %s)", kernel_cls.name, prefix)

    @staticmethod
    def _install(layer: torch.nn.Module, kernel: Any, tensors: dict[str, torch.Tensor], device: torch.device,
                 row_start: int, rows: int, prefix: str, whole: bool) -> KernelRun:  # fmt: skip
        """Move a kernel's tensors to the layer's device and register them as its buffers (``whole``: the run
        is the whole layer, so the dense fallback may use vLLM's own GEMM with the layer's bias)."""
        tensors = {name: t.to(device) for name, t in tensors.items()}
        if isinstance(kernel, TorchReferenceKernel) and device.type == "cpu" and whole:
            kernel.linear = _vllm_cpu_dense_linear(tensors.pop("weight_dequant"), layer)
        for name, t in tensors.items():
            layer.register_buffer(f"{prefix}{name}", t, persistent=False)
        return KernelRun(kernel, tuple(tensors), row_start, rows, prefix)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        state: LayerState = layer.easyquant
        outs = []
        for run in state.runs:
            tensors = {name: getattr(layer, f"{run.buffer_prefix}{name}") for name in run.tensor_names}
            b = bias if bias is None or len(state.runs) == 1 else bias[run.row_start : run.row_start + run.rows]
            outs.append(run.kernel.apply(tensors, x, b))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _runs(parts: list[Any]) -> list[list[Any]]:
    """Consecutive shards grouped by their column scale and group size: one GEMM (one scaled input, one layout) per
    group."""
    runs: list[list[Any]] = []
    for p in parts:
        prev = runs[-1][-1] if runs else None
        same = (
            prev is not None
            and p.group_size == prev.group_size
            and (
                (p.col_scale is None and prev.col_scale is None)
                or (p.col_scale is not None and prev.col_scale is not None and torch.equal(p.col_scale, prev.col_scale))
            )
        )
        if same:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _vllm_cpu_dense_linear(weight: torch.Tensor, layer: torch.nn.Module) -> Any:
    """``(x, bias) -> y`` on the GEMM vLLM dispatches for an unquantized CPU layer with this weight.

    vLLM prepacks the weight (oneDNN, SGL or zentorch, by CPU and shape) into a handle of its own;
    the holder module gives its dispatcher the ``weight``/``bias`` attributes it expects. It shares
    the layer's bias so that any dtype change vLLM makes to it applies to the real one.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = torch.nn.Module()
    holder.weight = Parameter(weight, requires_grad=False)
    holder.bias = getattr(layer, "bias", None)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
    # The prepacked GEMMs ignore the weight argument (and leave an empty one); vLLM's last fallback, where oneDNN
    # cannot take this dtype on this CPU (bf16 without AVX512-BF16), is F.linear on it: pass what remains.
    cpu_linear, weight_arg = holder.cpu_linear, holder.weight
    return lambda x, bias: cpu_linear(x, weight_arg, bias)


class _Loader:
    """``weight_loader(param, loaded_weight, shard_id=None)`` for one of a layer's tensors."""

    def __init__(self, state: LayerState, suffix: str) -> None:
        self.state = state
        self.suffix = suffix

    def __call__(self, param: Parameter, loaded_weight: torch.Tensor, loaded_shard_id: Any = None) -> None:
        shard = loaded_shard_id if loaded_shard_id is not None else getattr(loaded_weight, "shard_id", None)
        if shard is None:
            index = 0 if len(self.state.shards) == 1 else _WHOLE
        elif isinstance(shard, str):
            if shard not in _QKV_SHARDS:
                raise CheckpointError(f"{self.state.prefix}.{self.suffix}: unknown shard id {shard!r}")
            index = _QKV_SHARDS.index(shard)
        else:
            index = int(shard)
        if index != _WHOLE and not 0 <= index < len(self.state.shards):
            raise CheckpointError(f"{self.state.prefix}.{self.suffix}: shard {shard!r} does not exist in this layer")
        self.state.pending.setdefault(index, {})[self.suffix] = loaded_weight
