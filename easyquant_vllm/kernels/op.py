"""``easyquant::linear``: every EasyQuant linear layer is one call of this custom op.

vLLM's default mode traces the model with torch.compile (and on GPU captures CUDA graphs). Dynamo cannot
trace torch sparse tensors, and with shape guards off a Python ``if`` on the batch size is decided once,
at trace time. So the traced graph holds a single opaque op per layer; its real implementation runs
eagerly and does everything shape-dependent there: kernel path by M, the int4 GEMM, the outlier product.
This is how vLLM's own quantization methods survive compilation (one ``torch.ops._C`` GEMM per layer).

Schema::

    easyquant::linear(Tensor x, Tensor[] weights, Tensor? bias, str kernel, int[] meta) -> Tensor

``x [..., K]`` fp16/bf16/fp32; ``weights`` the kernel's tensors in the order of its ``TENSORS``;
``kernel`` the kernel's name; ``meta`` its static ints, ``meta[0] = N``. Returns ``[..., N]`` in x's
dtype. The op is stateless: no layer registry, nothing that a cached compiled graph could point at
after the engine that traced it is gone.

A mixture-of-experts layer is one call of its twin (kernels/moe.py; the native CPU kernel has a C++ op of its
own, ``easyquant::cpu_int4_moe``)::

    easyquant::moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] weights, str kernel, int[] meta)
        -> Tensor

``x [M, H]``, the router's ``topk_ids``/``topk_weights [M, k]``; returns ``[M, H]`` in x's dtype.

A quantized input embedding (a tied, quantized lm_head: docs/format.md) looks its rows up with a third op::

    easyquant::embedding(Tensor ids, Tensor[] weights, int[] meta, ScalarType dtype) -> Tensor

``ids`` any shape of row indices; ``weights`` the canonical ``qweight, scales, indptr, indices, values`` and, where
the checkpoint has them, ``zeros`` (unpacked, ``[N, K/G]`` uint8), ``col_scale`` and (format version 3)
``row_steps``; ``meta = [bits, group_size, K, has_zeros, has_col_scale, width, has_row_steps, blocked]`` (``width``:
the most outliers of any row; ``blocked``: the weights are the native CPU kernel's own tensors, 16 rows side by
side, which the lookup reads in place rather than holding a canonical copy: ``cpu_native.lookup_operands``).
Returns ``[*ids.shape, K]`` ``W'`` rows in ``dtype`` (``quant.dequantize_rows``: fixed shapes, no host sync, so
CUDA graphs can hold it too).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..quant import QuantizedWeight

_SCHEMA = "linear(Tensor x, Tensor[] weights, Tensor? bias, str kernel, int[] meta) -> Tensor"
_MOE_SCHEMA = "moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] weights, str kernel, int[] meta) -> Tensor"
_lib = torch.library.Library("easyquant", "FRAGMENT")  # module-level: the op lives as long as the library


@functools.cache
def _kernels() -> dict[str, type]:
    from . import KERNELS

    return {k.name: k for k in KERNELS}


def _linear_impl(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, kernel: str,
                 meta: list[int]) -> torch.Tensor:  # fmt: skip
    cls = _kernels().get(kernel)
    if cls is None:
        raise ValueError(f"easyquant::linear: unknown kernel {kernel!r}; known: {sorted(_kernels())}")
    x2 = x.reshape(-1, x.shape[-1])
    y = cls.forward(weights, x2, bias, meta)
    return y.reshape(*x.shape[:-1], meta[0])


def _linear_fake(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, kernel: str,
                 meta: list[int]) -> torch.Tensor:  # fmt: skip
    return x.new_empty((*x.shape[:-1], meta[0]))


@functools.cache
def _moe_kernels() -> dict[str, type]:
    from .moe import MOE_KERNELS

    return {k.name: k for k in MOE_KERNELS}


def _moe_impl(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: list[torch.Tensor],
              kernel: str, meta: list[int]) -> torch.Tensor:  # fmt: skip
    cls = _moe_kernels().get(kernel)
    if cls is None or not hasattr(cls, "forward"):
        raise ValueError(f"easyquant::moe: unknown kernel {kernel!r}; known: {sorted(_moe_kernels())}")
    return cls.forward(weights, x, topk_ids, topk_weights, meta)


def _moe_fake(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: list[torch.Tensor],
              kernel: str, meta: list[int]) -> torch.Tensor:  # fmt: skip
    return x.new_empty(x.shape)


_EMBEDDING_SCHEMA = "embedding(Tensor ids, Tensor[] weights, int[] meta, ScalarType dtype) -> Tensor"


def _embedding_impl(ids: torch.Tensor, weights: list[torch.Tensor], meta: list[int],
                    dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    from ..quant import OutlierCSR, QuantizedWeight, add_row_outliers, dequantize_dense, dequantize_rows

    bits, group_size, k, has_zeros, has_col, width, has_row_steps, blocked = meta
    qweight, scales, indptr, indices, values = weights[:5]
    rest = iter(weights[5:])
    zeros = next(rest) if has_zeros else None
    col_scale = next(rest) if has_col else None
    row_steps = next(rest) if has_row_steps else None  # format version 3: uint8 scales are multiples of it
    n = indptr.shape[0] - 1
    csr = OutlierCSR(indptr, indices, values, (n, k))
    if blocked:  # the native CPU kernel's tensors (16 rows side by side): gather the rows, then as below
        from .cpu_native import block_rows

        rows = ids.reshape(-1).long()
        w = dequantize_dense(block_rows(qweight, rows), block_rows(scales, rows), bits, group_size,
                             None if zeros is None else block_rows(zeros, rows), col_scale,
                             None if row_steps is None else row_steps[rows])  # fmt: skip
        return add_row_outliers(w, csr, rows, width).to(dtype).reshape(*ids.shape, k)
    qw = QuantizedWeight(qweight, scales, csr, bits, group_size, zeros=zeros, col_scale=col_scale,
                         row_steps=row_steps)  # fmt: skip
    return dequantize_rows(qw, ids, width, dtype)


def _embedding_fake(ids: torch.Tensor, weights: list[torch.Tensor], meta: list[int],
                    dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    return weights[0].new_empty((*ids.shape, meta[2]), dtype=dtype)


# Registered with torch.library's low-level API (define + impl), not @custom_op: the latter adds tens
# of microseconds of Python per call, which at batch 1 is a visible share of a small layer
# (vLLM's direct_register_custom_op does the same for its own ops).
_lib.define(_SCHEMA)
for _key in ("CPU", "CUDA"):
    _lib.impl("linear", _linear_impl, _key)
torch.library.register_fake("easyquant::linear", _linear_fake, lib=_lib)
_lib.define(_MOE_SCHEMA)
for _key in ("CPU", "CUDA"):
    _lib.impl("moe", _moe_impl, _key)
torch.library.register_fake("easyquant::moe", _moe_fake, lib=_lib)
_lib.define(_EMBEDDING_SCHEMA)
for _key in ("CPU", "CUDA"):
    _lib.impl("embedding", _embedding_impl, _key)
torch.library.register_fake("easyquant::embedding", _embedding_fake, lib=_lib)


def linear(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: torch.Tensor | None, kernel: str,
           meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """Call ``easyquant::linear`` (see the module docstring)."""
    return torch.ops.easyquant.linear(x, list(weights), bias, kernel, list(meta))


def moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: Sequence[torch.Tensor],
        kernel: str, meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """Call ``easyquant::moe`` (see the module docstring)."""
    return torch.ops.easyquant.moe(x, topk_ids, topk_weights, list(weights), kernel, list(meta))


def embedding(
    ids: torch.Tensor, weights: Sequence[torch.Tensor], meta: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Call ``easyquant::embedding`` (see the module docstring)."""
    return torch.ops.easyquant.embedding(ids, list(weights), list(meta), dtype)


def embedding_operands(qw: QuantizedWeight) -> tuple[list[torch.Tensor], list[int]]:
    """``(weights, meta)`` of ``easyquant::embedding`` for ``qw``: the inverse of the op's unpacking, kept beside it
    so that a tensor a format version adds (version 3's ``row_steps``) reaches the lookup wherever it is built."""
    o = qw.outliers
    optional = (qw.zeros, qw.col_scale, qw.row_steps)
    weights = [qw.qweight, qw.scales, o.indptr, o.indices, o.values, *(t for t in optional if t is not None)]
    return weights, embedding_meta(qw, blocked=False)


def embedding_meta(qw: QuantizedWeight, blocked: bool) -> list[int]:
    """``easyquant::embedding``'s meta for ``qw``'s tensors (the one definition of its layout): ``blocked`` when
    the weights are the native CPU kernel's own (``cpu_native.lookup_operands``)."""
    from ..quant import max_row_nnz

    has_zeros, has_col, has_row_steps = (int(t is not None) for t in (qw.zeros, qw.col_scale, qw.row_steps))
    return [qw.bits, qw.group_size, qw.shape[1], has_zeros, has_col, max_row_nnz(qw.outliers.indptr), has_row_steps,
            int(blocked)]  # fmt: skip
