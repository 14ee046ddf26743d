"""Kernels for the EasyQuant mixture-of-experts layer: one op call runs every expert a batch was routed to.

vLLM routes first (``topk_ids``, ``topk_weights``: ``[M, k]``), then calls the quantization method's ``apply``.
On CPU it traces that Python into its compiled graph (fullgraph, no guards), so which experts run and how many
tokens each gets must stay out of the tracer's sight: the whole layer is one op with a fake implementation, the
C++ ``easyquant::cpu_int4_moe`` for the native kernel, ``easyquant::moe`` (:mod:`.op`) for the others. The
semantics, for each token ``x`` and its choices ``(e_j, p_j)`` (docs/format.md, "Mixture-of-experts layers"):

    y = sum_j p_j * W2'_{e_j} (silu(Wg'_{e_j} x) * (Wu'_{e_j} x))

with ``w13 = [gate; up]`` (``[2I, H]``, one column scale) and ``w2`` (``[H, I]``) of each expert. Kernel choice,
the start-up self-check and ``EASYQUANT_KERNEL`` are the linear layers' (:mod:`.select`); kernels of one family
share the dense kernel's name.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..quant import QuantizedWeight, QuantSpec, quantize_group
from . import cuda_int4, cuda_moe
from .base import LayerSpec
from .cpu_native import ENV_PLAN, OPTIONAL_TENSORS, NativeCpuKernel
from .cuda_int4 import CudaInt4Kernel
from .mma_layout import mma_compatible
from .select import ENV_FORCE, check_tolerance, select_kernel

Experts = Sequence[tuple[QuantizedWeight, QuantizedWeight]]
"""Every local expert's ``(w13 [2I, H], w2 [H, I])`` of this rank, in expert order."""


@dataclass(frozen=True)
class MoeSpec:
    """One MoE layer partition as a kernel sees it: ``experts`` experts of ``w13 [2I, H]`` and ``w2 [H, I]``
    (``intermediate`` is this rank's ``I``), SiLU-gated."""

    experts: int
    hidden: int
    intermediate: int
    bits: int
    group_size: int
    act_dtype: torch.dtype
    device_type: str
    zero_points: bool = False
    column_scale: bool = False
    compact_steps: bool = False

    def w13(self) -> LayerSpec:
        return LayerSpec(2 * self.intermediate, self.hidden, self.bits, self.group_size, self.act_dtype,
                         self.device_type, self.zero_points, self.column_scale, self.compact_steps)  # fmt: skip

    def w2(self) -> LayerSpec:
        return LayerSpec(self.hidden, self.intermediate, self.bits, self.group_size, self.act_dtype,
                         self.device_type, self.zero_points, self.column_scale, self.compact_steps)  # fmt: skip


def moe_dense(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The layer on dense weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (x's dtype, or float64 for a reference):
    each expert's GEMMs and activation in that dtype, the weighted sum in float32 (float64 for float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(x.shape, dtype=acc, device=x.device)
    inter = w13.shape[1] // 2
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        h = x[tok] @ w13[e].t()
        out = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].t()
        y.index_add_(0, tok, out.to(acc) * topk_weights[tok, slot, None].to(acc))
    return y.to(x.dtype)


def uniform_column_scales(experts: Experts) -> list[tuple[QuantizedWeight, QuantizedWeight]]:
    """The experts with a column scale on every projection where any projection has one: format version 3 decides
    the scale per layer (an expert's gate/up together, its down on its own), and the stacked kernels run one layout
    for the whole layer. ``c = 1`` where a projection has none reconstructs exactly the same ``W'``."""
    pairs = [tuple(pair) for pair in experts]
    if not any(q.col_scale is not None for pair in pairs for q in pair):
        return pairs  # type: ignore[return-value]

    def scaled(q: QuantizedWeight) -> QuantizedWeight:
        if q.col_scale is not None:
            return q
        return replace(q, col_scale=torch.ones(q.shape[1], dtype=torch.float16, device=q.qweight.device))

    return [(scaled(a), scaled(b)) for a, b in pairs]


def concat_csr(weights: Sequence[QuantizedWeight], values_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The experts' outliers for a stacked kernel: ``indptr [E, N+1]`` (each from 0), ``indices``/``values`` of all
    experts concatenated, ``offsets [E+1]`` int64 (expert e's entries are ``offsets[e] .. offsets[e+1]-1``)."""
    counts = [w.outliers.nnz for w in weights]
    offsets = torch.zeros(len(weights) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return {
        "indptr": torch.stack([w.outliers.indptr for w in weights]).contiguous(),
        "indices": torch.cat([w.outliers.indices for w in weights]).contiguous(),
        "values": torch.cat([w.outliers.values for w in weights]).to(values_dtype).contiguous(),
        "offsets": offsets,
    }


class MoeKernel(ABC):
    """Repacks a MoE layer's experts once, then runs the whole layer per call (the linear ``Kernel``'s twin)."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: MoeSpec) -> tuple[bool, str | None]:
        """``(True, None)`` or ``(False, reason)``."""

    def __init__(self, spec: MoeSpec, device: torch.device | None = None) -> None:
        self.spec = spec

    @abstractmethod
    def prepare(self, experts: Experts) -> dict[str, torch.Tensor]:
        """Every expert's canonical tensors -> this kernel's (stacked) tensors, once at load."""

    @abstractmethod
    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``x [M, H]`` -> ``[M, H]`` in x's dtype: the traced side, one op call."""

    @classmethod
    def variant(cls, spec: MoeSpec, device: torch.device) -> tuple[object, ...]:
        return ("moe", spec.act_dtype, spec.bits, spec.group_size == -1, spec.zero_points, spec.column_scale,
                spec.compact_steps)  # fmt: skip

    @classmethod
    def check_shape(cls, spec: MoeSpec, device: torch.device) -> tuple[int, int]:
        """``(H, I)`` of the self-check's small layer: the same group size (and layout) as ``spec``."""
        g = spec.group_size
        return (128, 64) if g == -1 else (max(64, 2 * g), max(64, g))

    @classmethod
    def check_batches(cls, spec: MoeSpec, device: torch.device) -> tuple[int, ...]:
        """Batch sizes the self-check runs (top-2 of 4 experts): experts with none, a few and many tokens."""
        return (1, 6, 40)

    @classmethod
    def run_self_check(cls, spec: MoeSpec, device: torch.device) -> str | None:
        """A small MoE of ``spec``'s variant through this kernel against :func:`moe_dense` in float64, for the batches
        of :meth:`check_batches`. None, or the failure's cause (see :mod:`.select`)."""
        g = spec.group_size
        hidden, inter = cls.check_shape(spec, device)
        small = MoeSpec(4, hidden, inter, spec.bits, g, spec.act_dtype, spec.device_type, spec.zero_points,
                        spec.column_scale, spec.compact_steps)  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        q = QuantSpec(bits=spec.bits, group_size=g, zero_points=spec.zero_points,
                      normalize="sinkhorn" if spec.column_scale else "none", compact_steps=spec.compact_steps,
                      max_outlier_fraction=0.0025)  # fmt: skip

        def weight(n: int, k: int) -> torch.Tensor:  # explicit float32: vLLM loads with its dtype as the default
            w = torch.randn(n, k, generator=gen, dtype=torch.float32) * 0.05
            return w * torch.exp(0.5 * torch.randn(k, generator=gen, dtype=torch.float32))

        experts = []
        from ..sharding import stack_rows

        for _ in range(small.experts):
            gate, up = quantize_group([weight(inter, hidden), weight(inter, hidden)], q, with_stats=False)
            experts.append((stack_rows([gate, up]), quantize_group([weight(hidden, inter)], q, with_stats=False)[0]))
        w13 = torch.stack([a.dequantize(torch.float64) for a, _ in experts])
        w2 = torch.stack([b.dequantize(torch.float64) for _, b in experts])
        try:
            kernel = cls(small, device)
            tensors = {name: t.to(device) for name, t in kernel.prepare(experts).items()}
            for m in cls.check_batches(spec, device):
                x = torch.randn(m, hidden, generator=gen, dtype=torch.float32).to(spec.act_dtype)
                ids = torch.stack([torch.randperm(small.experts, generator=gen)[:2] for _ in range(m)])
                weights = torch.softmax(torch.randn(m, 2, generator=gen), -1)
                y = kernel.apply(tensors, x.to(device), ids.to(device), weights.to(device))
                if tuple(y.shape) != (m, hidden) or y.dtype != spec.act_dtype:
                    return f"M = {m}: returned {y.dtype} {list(y.shape)}, expected {spec.act_dtype} {[m, hidden]}"
                ref = moe_dense(x.double(), ids, weights.double(), w13, w2)
                err = float((y.double().cpu() - ref).abs().mean() / ref.abs().mean())
                if not err < check_tolerance(spec.act_dtype, kernel):  # also catches NaN
                    return f"M = {m}: wrong result, mean relative error {err:.2e} against the reference"
        except Exception as e:  # any failure (build, layout, launch) means: do not use this kernel here
            first_line = (str(e).strip().splitlines() or [""])[0]
            return f"{type(e).__name__}: {first_line}"
        return None


class CudaInt4MoeKernel(MoeKernel):
    """Every expert on the CUDA int4 kernels (cuda/eq_moe.cu through :mod:`.cuda_moe`): routing, products and the
    weighted sum on the device, one ``easyquant::moe`` call. Each projection takes the dense kernel's layout choice:
    the tensor-core layout (regrouped here, per expert) where ``N % 16``, ``K % 64`` and the GPU allow, else the
    checkpoint's layout and the CUDA-core GEMV. ``meta = [E, H, I, G, mma_w13, mma_w2, version]`` (the format
    version; 2 and 3 add ``zeros`` and ``col_scale`` per projection, 3 in the layout of
    :func:`.cuda_int4.v3_tensors`)."""

    name = CudaInt4Kernel.name

    @classmethod
    def can_implement(cls, spec: MoeSpec) -> tuple[bool, str | None]:
        if spec.device_type != "cuda":
            return False, f"{cls.name} runs on CUDA devices only"
        if spec.experts > cuda_moe.MAX_EXPERTS:
            return False, f"{cls.name} routes at most {cuda_moe.MAX_EXPERTS} experts per layer, got {spec.experts}"
        for proj, linear in (("w13", spec.w13()), ("w2", spec.w2())):
            ok, why = CudaInt4Kernel.can_implement(linear)
            if not ok:
                return False, f"{proj}: {why}"
        return True, None

    def __init__(self, spec: MoeSpec, device: torch.device | None = None) -> None:
        super().__init__(spec, device)
        device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.mma = self._layouts(spec, device)

    @staticmethod
    def _layouts(spec: MoeSpec, device: torch.device) -> dict[str, bool]:
        """Per projection: the tensor-core layout (True) or the checkpoint's (False), as :class:`CudaInt4Kernel`."""
        sm80 = cuda_int4._has_mma(device)
        return {"w13": sm80 and mma_compatible(2 * spec.intermediate, spec.hidden),
                "w2": sm80 and mma_compatible(spec.hidden, spec.intermediate)}  # fmt: skip

    @property
    def version(self) -> int:
        return cuda_int4.format_version(self.spec.zero_points, self.spec.column_scale, self.spec.compact_steps)

    @classmethod
    def variant(cls, spec: MoeSpec, device: torch.device) -> tuple[object, ...]:
        mma = cls._layouts(spec, device)
        return ("moe", spec.act_dtype, spec.group_size == -1, mma["w13"], mma["w2"], spec.zero_points or
                spec.column_scale, spec.compact_steps)  # fmt: skip

    @classmethod
    def check_shape(cls, spec: MoeSpec, device: torch.device) -> tuple[int, int]:
        """Like the default, but with each projection's layout: a K that is not a multiple of 64 (possible with
        group size 32 or per channel) becomes 96 in the small layer, so its GEMV path is the one checked."""
        g = spec.group_size
        if g >= 64:  # H and I are multiples of G: both tensor-core compatible
            return super().check_shape(spec, device)
        return (128 if spec.hidden % 64 == 0 else 96), (64 if spec.intermediate % 64 == 0 else 96)

    @classmethod
    def check_batches(cls, spec: MoeSpec, device: torch.device) -> tuple[int, ...]:
        # Top-2 of 4 experts: ~P/4 rows per expert reach each tile class (tensor cores: 8, 16, 32, 64 rows; GEMV: 1
        # to 16 rows and the repeated 16-row tile).
        return (1, 6, 24, 40, 100)

    def meta(self) -> list[int]:
        s = self.spec
        return [s.experts, s.hidden, s.intermediate, s.group_size, int(self.mma["w13"]), int(self.mma["w2"]),
                self.version]  # fmt: skip

    def prepare(self, experts: Experts) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        bf16 = self.spec.act_dtype == torch.bfloat16
        for i, proj in enumerate(("w13", "w2")):
            mma = self.mma[proj]
            stacked = cuda_moe.stack_projection([pair[i] for pair in experts], mma, self.version, split=mma and bf16)
            out.update({f"{proj}_{key}": t for key, t in stacked.items()})
        return out

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        from .op import moe

        extra = ("zeros", "col_scale") if self.version > 1 else ()
        keys = ("qweight", "scales", "indptr", "indices", "values", *extra)
        weights = [tensors[f"{proj}_{key}"] for proj in ("w13", "w2") for key in keys]
        return moe(x, topk_ids, topk_weights, weights, self.name, self.meta())

    @classmethod
    def forward(cls, w: Sequence[torch.Tensor], x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
        """Inside ``easyquant::moe``: :func:`.cuda_moe.moe_forward` (launches on torch's current stream)."""
        experts, _, inter, group_size, mma_up, mma_down, version = meta
        half = 7 if version > 1 else 5  # qweight, scales, indptr, indices, values (, zeros, col_scale) per projection
        if len(w) != 2 * half:
            raise ValueError(f"easyquant::moe ({cls.name}): expected {2 * half} weight tensors, got {len(w)}")
        up, down = cuda_moe.Projection(*w[:half]), cuda_moe.Projection(*w[half:])
        return cuda_moe.moe_forward(x, topk_ids, topk_weights, up, down, experts, inter, group_size, bool(mma_up),
                                    bool(mma_down))  # fmt: skip


class NativeCpuMoeKernel(MoeKernel):
    """Every expert on the native CPU kernel (``csrc/eq_cpu_moe.cpp``): each projection stacked over experts in
    :class:`NativeCpuKernel`'s layout (format version 3: the multipliers, sixteenth zeros and row units too); only
    the experts that received tokens are read."""

    name = NativeCpuKernel.name

    @classmethod
    def can_implement(cls, spec: MoeSpec) -> tuple[bool, str | None]:
        for proj, linear in (("w13", spec.w13()), ("w2", spec.w2())):
            ok, why = NativeCpuKernel.can_implement(linear)
            if not ok:
                return False, f"{proj}: {why}"
        return True, None

    @classmethod
    def variant(cls, spec: MoeSpec, device: torch.device) -> tuple[object, ...]:
        """As every MoE kernel's, plus the plan override (:meth:`NativeCpuKernel.variant`)."""
        return (*super().variant(spec, device), os.environ.get(ENV_PLAN, ""))

    def __init__(self, spec: MoeSpec, device: torch.device | None = None) -> None:
        super().__init__(spec, device)
        self.linears = {"w13": NativeCpuKernel(spec.w13()), "w2": NativeCpuKernel(spec.w2())}
        self.plan = self.linears["w13"].plan

    @property
    def check_tolerance_floor(self) -> float:
        """As the linear kernel's (nonzero with the i8 path)."""
        return self.linears["w13"].check_tolerance_floor

    def prepare(self, experts: Experts) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, proj in enumerate(("w13", "w2")):
            weights = [pair[i] for pair in experts]
            per_expert = [self.linears[proj].prepare(w) for w in weights]  # w_q, scales, zeros?, col_scale?, ...
            for key in ("w_q", "scales", *OPTIONAL_TENSORS):
                if key in per_expert[0]:
                    out[f"{proj}_{key}"] = torch.stack([t[key] for t in per_expert]).contiguous()
            for key, t in concat_csr(weights, torch.float32).items():
                out[f"{proj}_{key}"] = t
        return out

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        t = tensors
        args: list[Any] = []
        for proj in ("w13", "w2"):
            args += [t[f"{proj}_w_q"], t[f"{proj}_scales"], t.get(f"{proj}_zeros"), t.get(f"{proj}_col_scale"),
                     t[f"{proj}_indptr"], t[f"{proj}_indices"], t[f"{proj}_values"], t[f"{proj}_offsets"]]  # fmt: skip
        return torch.ops.easyquant.cpu_int4_moe(x, topk_ids, topk_weights, *args, self.spec.group_size, self.plan,
                                                t.get("w13_row_steps"), t.get("w2_row_steps"))  # fmt: skip


class TorchReferenceMoeKernel(MoeKernel):
    """Every expert dequantized once at load (``W'`` in the activation dtype, as the dense reference kernel), the
    layer by :func:`moe_dense` inside ``easyquant::moe``. Exact and available everywhere, but as much memory as an
    unquantized model: the fallback, and the kernel of float32 engines."""

    name = "torch-reference"

    @classmethod
    def can_implement(cls, spec: MoeSpec) -> tuple[bool, str | None]:
        return True, None

    def prepare(self, experts: Experts) -> dict[str, torch.Tensor]:
        dt = self.spec.act_dtype
        return {"w13_dense": torch.stack([a.dequantize(dt) for a, _ in experts]),
                "w2_dense": torch.stack([b.dequantize(dt) for _, b in experts])}  # fmt: skip

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        from .op import moe

        return moe(x, topk_ids, topk_weights, [tensors["w13_dense"], tensors["w2_dense"]], self.name, [x.shape[-1]])

    @classmethod
    def forward(cls, w: Sequence[torch.Tensor], x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
        """Inside ``easyquant::moe``: eager, so the loop over the routed experts is plain Python."""
        return moe_dense(x, topk_ids, topk_weights, w[0], w[1])


MOE_KERNELS: tuple[type[MoeKernel], ...] = (CudaInt4MoeKernel, NativeCpuMoeKernel, TorchReferenceMoeKernel)
"""Preference order, as :data:`easyquant_vllm.kernels.KERNELS`; the last is the reference (never self-checked)."""


def choose_moe_kernel(spec: MoeSpec, device: torch.device, where: str = "a MoE layer") -> tuple[type[MoeKernel],
                                                                                             list[str]]:  # fmt: skip
    """The kernel for a MoE layer and the reasons the ones before it gave; ``EASYQUANT_KERNEL`` forces one (a
    dense-only kernel name is an error naming the MoE kernels)."""
    return select_kernel(spec, device, MOE_KERNELS, where)  # type: ignore[arg-type]


__all__ = ["ENV_FORCE", "MOE_KERNELS", "CudaInt4MoeKernel", "MoeKernel", "MoeSpec", "NativeCpuMoeKernel",
           "TorchReferenceMoeKernel", "choose_moe_kernel", "concat_csr", "moe_dense",
           "uniform_column_scales"]  # fmt: skip
