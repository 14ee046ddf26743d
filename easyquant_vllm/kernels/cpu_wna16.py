"""CPU kernel: vLLM's int4 GEMM (``cpu_gemm_wna16``) for the dense part plus the outlier product.

vLLM's CPU kernel computes ``x @ dequant(u)^T`` for ``uint4b8`` codes (``u = q + 8``: exactly ours),
symmetric, with per-group scales. It wants the codes packed along the *output* dim and blocked 16
output channels at a time. We build that once from the canonical layout (packed along K) by unpacking
with our own ``unpack_codes``, transposing, and re-packing with our own ``pack_codes``, so that the bit
order is the one documented in docs/format.md on both sides. The outliers, about 0.5 % of entries, are
added afterwards: ``y += x @ S^T``. That keeps the dense kernel unmodified, and it reads each outlier once
per call, with no masking (the code at an outlier position is 0).

Format version 2: with zero points the codes are vLLM's ``uint4`` and the kernel subtracts a per-group zero,
packed along N like GPTQ's ``qzeros``; a column scale multiplies the activations before the GEMM (the
outlier product takes the unscaled ones).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ..quant import QuantizedWeight, code_offset, pack_codes, unpack_codes
from .base import Kernel, LayerSpec, add_outliers, count, cpu_int4_unsupported, outlier_tensors

_BLOCK_N = 16  # output channels per contiguous block in vLLM's CPU weight layout


@functools.cache
def _ops() -> Any:
    """vLLM's op wrappers with the CPU extension loaded, or None where they are not available."""
    try:
        from vllm import _custom_ops as ops
        from vllm.platforms import current_platform
    except ImportError:
        return None
    if not current_platform.is_cpu():
        return None
    current_platform.import_kernels()  # registers torch.ops._C.* (vLLM does this at engine start)
    try:
        torch.ops._C.cpu_gemm_wna16  # noqa: B018
    except (AttributeError, RuntimeError):
        return None
    return ops


@functools.cache
def _isa_hint(act_dtype: torch.dtype) -> str:
    """vLLM's choice: AMX tiles for bf16 where the CPU has them, else the generic vector path."""
    if act_dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported():
        # Without this, the first AMX instruction dies with SIGILL: Linux grants AMX state to a
        # process only on request (arch_prctl), which this call makes.
        torch.cpu._init_amx()
        return "amx"
    return "vec"


def repack_for_cpu_wna16(
    qweight: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``qweight [N, K/8] int32`` + ``scales [N, K/G] fp16`` -> vLLM CPU layout.

    Returns ``w_q [N/16, 2K] int32`` (codes packed along N, 8 per word, then blocks of 16 output
    channels made contiguous) and ``w_s [K/G, N]`` in ``act_dtype``.
    """
    u = unpack_codes(qweight, 4)  # [N, K] uint8
    n, k = u.shape
    along_n = pack_codes(u.t().contiguous(), 4)  # [K, N/8]: word j of row k holds u[8j..8j+7, k]
    per_block = _BLOCK_N // 8  # words per block of 16 output channels
    w_q = along_n.view(k, n // _BLOCK_N, per_block).permute(1, 0, 2).reshape(n // _BLOCK_N, k * per_block)
    return w_q.contiguous(), scales.t().to(act_dtype).contiguous()


class CpuWna16Kernel(Kernel):
    name = "cpu-wna16"
    TENSORS = ("w_q", "w_s", "indptr", "indices", "values")

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        why = cpu_int4_unsupported(cls.name, spec)
        if why:
            return False, why
        if spec.compact_steps:
            return False, "cpu-wna16 takes integer zero points: format version 3's fractional zeros do not map to it"
        if _ops() is None:
            return False, "vLLM's CPU ops (vllm._custom_ops.cpu_gemm_wna16) are not available"
        if spec.group_size != -1 and spec.group_size % 2:
            return False, f"cpu-wna16 needs an even group size, got {spec.group_size}"
        if spec.k % 32 or spec.n % 32:
            return False, f"cpu-wna16 needs K and N multiples of 32, got K = {spec.k}, N = {spec.n}"
        return True, None

    def meta(self) -> list[int]:
        return [self.spec.n, self.spec.group_size, int(self.spec.zero_points), int(self.spec.column_scale)]

    def apply_tensors(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[t] for t in (*self.TENSORS, "w_zp", "col_scale") if t in tensors]

    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        assert code_offset(4) == 8  # uint4b8: without zeros the kernel subtracts 8 from every code, as we store them
        w_q, w_s = repack_for_cpu_wna16(qw.qweight, qw.scales, self.spec.act_dtype)
        tensors = {"w_q": w_q, "w_s": w_s, **outlier_tensors(qw)}
        if qw.zeros is not None:  # [K/G, N/8] int32: the zeros of 8 output channels per word, packed along N
            tensors["w_zp"] = pack_codes(qw.zeros.t().contiguous(), 4)
        if qw.col_scale is not None:
            tensors["col_scale"] = qw.col_scale.to(self.spec.act_dtype)
        return tensors

    @classmethod
    def forward(cls, w: Sequence[torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
                meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
        w_q, w_s, indptr, indices, values, *rest = w
        zeros = rest.pop(0) if meta[2] else None
        xs = x * rest.pop(0) if meta[3] else x  # the column scale on the activations; the outliers take x
        count(cls.name, "int4")
        y = _ops().cpu_gemm_wna16(input=xs, q_weight=w_q, scales=w_s, zeros=zeros, bias=bias, pack_factor=8,
                                  isa_hint=_isa_hint(x.dtype))  # fmt: skip
        return add_outliers(y, indptr, indices, values, x)
