"""CPU kernel on PyTorch's own int4 GEMM (``torch._weight_int4pack_mm_for_cpu``) plus sparse outliers.

Why a second CPU kernel: vLLM 0.32's ``cpu_gemm_wna16`` is registered only by its AVX512 build, so on
AVX2-only CPUs (e.g. the AMD EPYC machines we run on) vLLM has no int4 GEMM at all. PyTorch ships
one for every x86 CPU, the "tinygemm" layout that torchao uses, which dequantizes
``(u - 8) * scale + zero`` per group. With ``zero = 0`` that is exactly our ``uint4b8`` code. Measured on
one 1536x576 layer at M = 1 in bf16 it is 1.5x faster than the dense bf16 matmul. In float32 it is exact
but about 10x slower than dense, so float32 engines use the reference kernel instead.
"""

from __future__ import annotations

import torch

from ..quant import QuantizedWeight, unpack_codes
from .base import Kernel, LayerSpec, add_outliers, cpu_int4_unsupported, with_outliers

_GROUP_SIZES = (32, 64, 128, 256)  # what the kernel's group loop is instantiated for
_INNER_K_TILES = 2  # packing parameter of _convert_weight_to_int4pack_for_cpu; 2 works for K % 32 == 0


def _kernel_group_size(spec: LayerSpec) -> int | None:
    """The kernel's group size: the checkpoint's, or for per-channel steps (-1) the largest supported
    size dividing K. Repeating a row's one step over every group of that size is the same matrix."""
    if spec.group_size in _GROUP_SIZES:
        return spec.group_size
    if spec.group_size == -1:
        return next((g for g in reversed(_GROUP_SIZES) if spec.k % g == 0), None)
    return None


class TorchInt4CpuKernel(Kernel):
    name = "torch-int4-cpu"

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        why = cpu_int4_unsupported(cls.name, spec)
        if why:
            return False, why
        if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return False, f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
        if _kernel_group_size(spec) is None:
            return False, (
                f"torch-int4-cpu needs group size in {list(_GROUP_SIZES)} (or -1 with K divisible by one of "
                f"them), got {spec.group_size} with K = {spec.k}"
            )
        if spec.n % 16 or spec.k % 32:
            return False, f"torch-int4-cpu needs N % 16 == 0 and K % 32 == 0, got N = {spec.n}, K = {spec.k}"
        return True, None

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        group = _kernel_group_size(spec)
        assert group is not None, "can_implement() said no"
        self.group = group

    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        # Layout it expects: unsigned codes [N, K] int32 -> its own packed uint8 blob; scales and
        # zeros interleaved as [K/G, N, 2] in the activation dtype (zeros all 0: symmetric codes).
        u = unpack_codes(qw.qweight, 4).to(torch.int32)
        w_q = torch._convert_weight_to_int4pack_for_cpu(u, _INNER_K_TILES)
        scales = qw.scales
        if scales.shape[1] * self.group != self.spec.k:  # per channel: the row's step on every group
            scales = scales.repeat_interleave(self.spec.k // self.group // scales.shape[1], dim=1)
        scales = scales.t().to(self.spec.act_dtype)  # [K/G, N]
        w_sz = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()
        return with_outliers({"w_q": w_q, "w_sz": w_sz}, qw)

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, self.spec.k)
        y = torch._weight_int4pack_mm_for_cpu(x2, tensors["w_q"], self.group, tensors["w_sz"])
        y = add_outliers(y, tensors.get("outliers"), x2)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.spec.n)
