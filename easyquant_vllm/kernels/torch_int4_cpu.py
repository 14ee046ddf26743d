"""CPU kernel on PyTorch's own int4 GEMM (``torch._weight_int4pack_mm_for_cpu``) plus the outlier product.

Why a second CPU kernel: vLLM 0.32's ``cpu_gemm_wna16`` is registered only by its AVX512 build, so on
AVX2-only CPUs (e.g. the AMD EPYC machines we run on) vLLM has no int4 GEMM at all. PyTorch ships
one for every x86 CPU, the "tinygemm" layout that torchao uses, which dequantizes
``(u - 8) * scale + zero`` per group. With ``zero = 0`` that is exactly our ``uint4b8`` code. Measured on
one 1536x576 layer at M = 1 in bf16 it is 1.5x faster than the dense bf16 matmul. In float32 it is exact
but about 10x slower than dense, so float32 engines use the reference kernel instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..quant import QuantizedWeight, unpack_codes, zero_unit
from .base import Kernel, LayerSpec, add_outliers, count, cpu_int4_unsupported, outlier_tensors

_GROUP_SIZES = (32, 64, 128, 256)  # what the kernel's group loop is instantiated for
_INNER_K_TILES = 2  # packing parameter of _convert_weight_to_int4pack_for_cpu; 2 works for K % 32 == 0


def _kernel_group_size(k: int, group_size: int) -> int | None:
    """The kernel's group size: the checkpoint's, or for per-channel steps (-1) the largest supported
    size dividing K. Repeating a row's one step over every group of that size is the same matrix."""
    if group_size in _GROUP_SIZES:
        return group_size
    if group_size == -1:
        return next((g for g in reversed(_GROUP_SIZES) if k % g == 0), None)
    return None


class TorchInt4CpuKernel(Kernel):
    name = "torch-int4-cpu"
    TENSORS = ("w_q", "w_sz", "indptr", "indices", "values")

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        why = cpu_int4_unsupported(cls.name, spec)
        if why:
            return False, why
        if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return False, f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
        if _kernel_group_size(spec.k, spec.group_size) is None:
            return False, (
                f"torch-int4-cpu needs group size in {list(_GROUP_SIZES)} (or -1 with K divisible by one of "
                f"them), got {spec.group_size} with K = {spec.k}"
            )
        if spec.n % 16 or spec.k % 32:
            return False, f"torch-int4-cpu needs N % 16 == 0 and K % 32 == 0, got N = {spec.n}, K = {spec.k}"
        return True, None

    def meta(self) -> list[int]:
        # [N, kernel group, has column scale]
        return [self.spec.n, _kernel_group_size(self.spec.k, self.spec.group_size) or 0, int(self.spec.column_scale)]

    def apply_tensors(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[t] for t in (*self.TENSORS, "col_scale") if t in tensors]

    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        # Layout it expects: unsigned codes [N, K] int32 -> its own packed uint8 blob; scales and
        # zeros interleaved as [K/G, N, 2] in the activation dtype. The kernel computes (u - 8) * s + zero:
        # zero = s * (8 - z) gives s * (u - z) (0 for symmetric codes, z = 8; format version 3: s = unit * a and a
        # fractional z, both rounded to the activation dtype here, as this kernel's steps always are).
        group = self.meta()[1]
        u = unpack_codes(qw.qweight, 4).to(torch.int32)
        w_q = torch._convert_weight_to_int4pack_for_cpu(u, _INNER_K_TILES)
        if qw.row_steps is not None:
            scales = qw.row_steps.float().unsqueeze(1) * qw.scales.float()
            zeros = scales * (8.0 - qw.zeros.float() * zero_unit(4))  # type: ignore[union-attr]
        else:
            scales = qw.scales.float()
            zeros = (scales * (8.0 - qw.zero_points().float())) if qw.zeros is not None else torch.zeros_like(scales)
        if scales.shape[1] * group != self.spec.k:  # per channel: the row's step on every group
            repeat = self.spec.k // group // scales.shape[1]
            scales, zeros = scales.repeat_interleave(repeat, dim=1), zeros.repeat_interleave(repeat, dim=1)
        dt = self.spec.act_dtype
        w_sz = torch.stack([scales.t().to(dt), zeros.t().to(dt)], dim=-1).contiguous()  # [K/G, N, 2]
        tensors = {"w_q": w_q, "w_sz": w_sz, **outlier_tensors(qw)}
        if qw.col_scale is not None:
            tensors["col_scale"] = qw.col_scale.to(dt)
        return tensors

    @classmethod
    def forward(cls, w: Sequence[torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
                meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
        w_q, w_sz, indptr, indices, values, *col_scale = w
        count(cls.name, "int4")
        xs = x * col_scale[0] if meta[2] else x  # the column scale on the activations; the outliers take x
        y = torch._weight_int4pack_mm_for_cpu(xs, w_q, meta[1], w_sz)
        y = add_outliers(y, indptr, indices, values, x)
        return y if bias is None else y.add_(bias)
