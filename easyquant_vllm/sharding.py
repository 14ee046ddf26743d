"""Tensor-parallel slicing and merging of quantized weights, in the canonical layout (no vLLM import).

Column-parallel layers (QKV, gate/up, ...) keep every input column and take a block of output rows
of each logical shard; row-parallel layers keep every output row and take a block of input
columns. Merged layers stack their shards' row blocks in order. All of it works on
:class:`~easyquant_vllm.quant.QuantizedWeight`, so the CSR outliers are re-based with the rows and
filtered/re-indexed with the columns.
"""

from __future__ import annotations

import torch

from .quant import OutlierCSR, QuantizedWeight, effective_group_size, pack_factor
from .quant.outliers import rows_from_indptr

INT32_MAX = 2**31 - 1


def slice_rows(qw: QuantizedWeight, start: int, size: int) -> QuantizedWeight:
    """Output rows ``[start, start + size)`` of ``qw`` (a column-parallel slice)."""
    o = qw.outliers
    n, k = qw.shape
    if start < 0 or start + size > n:
        raise ValueError(f"row slice [{start}, {start + size}) outside [0, {n})")
    lo, hi = int(o.indptr[start]), int(o.indptr[start + size])
    csr = OutlierCSR(o.indptr[start : start + size + 1] - lo, o.indices[lo:hi], o.values[lo:hi], (size, k))
    zeros = None if qw.zeros is None else qw.zeros[start : start + size]
    row_steps = None if qw.row_steps is None else qw.row_steps[start : start + size]
    return QuantizedWeight(qw.qweight[start : start + size], qw.scales[start : start + size], csr, qw.bits,
                           qw.group_size, zeros=zeros, col_scale=qw.col_scale, row_steps=row_steps)  # fmt: skip


def slice_columns(qw: QuantizedWeight, start: int, size: int) -> QuantizedWeight:
    """Input columns ``[start, start + size)`` of ``qw`` (a row-parallel slice).

    ``start`` and ``size`` must be multiples of the pack factor and, with groups, of the group size;
    per-channel step sizes and zero points (group_size -1) are kept whole: every rank uses the row's one
    step. The column scale is sliced with the columns; version 3's row units are kept whole (each row keeps its
    unit, and its groups in the slice their multipliers).
    """
    n, k = qw.shape
    pf = pack_factor(qw.bits)
    g = effective_group_size(k, qw.group_size)
    if start % pf or size % pf or (qw.group_size != -1 and (start % g or size % g)):
        raise ValueError(
            f"input slice [{start}, {start + size}) of K = {k} must align to the pack factor {pf}"
            + (f" and group size {g}" if qw.group_size != -1 else "")
        )
    groups = slice(None) if qw.group_size == -1 else slice(start // g, (start + size) // g)
    scales = qw.scales[:, groups]
    zeros = None if qw.zeros is None else qw.zeros[:, groups]
    col_scale = None if qw.col_scale is None else qw.col_scale[start : start + size]
    o = qw.outliers
    rows = rows_from_indptr(o.indptr)
    keep = (o.indices >= start) & (o.indices < start + size)
    counts = torch.bincount(rows[keep], minlength=n)
    indptr = torch.zeros(n + 1, dtype=torch.int32, device=o.indptr.device)
    indptr[1:] = torch.cumsum(counts, 0)
    csr = OutlierCSR(indptr, (o.indices[keep] - start).to(torch.int32), o.values[keep], (n, size))
    return QuantizedWeight(qw.qweight[:, start // pf : (start + size) // pf], scales, csr, qw.bits, qw.group_size,
                           zeros=zeros, col_scale=col_scale, row_steps=qw.row_steps)  # fmt: skip


def stack_rows(parts: list[QuantizedWeight], names: list[str] | None = None) -> QuantizedWeight:
    """Concatenate weights along the output dimension (the shards of a merged layer, in order).

    The shards read one input, so they must share one column scale (and all have zero points, or none);
    ValueError names the shards (``names``, for the message) otherwise.
    """
    first = parts[0]
    k = first.shape[1]
    names = names or [f"shard {i}" for i in range(len(parts))]
    for p, name in zip(parts, names, strict=True):
        if p.shape[1] != k or p.bits != first.bits or p.group_size != first.group_size:
            raise ValueError(f"cannot stack {name}, a [{p.shape[0]}, {p.shape[1]}] shard, onto K = {k}")
        if (p.zeros is None) != (first.zeros is None):
            raise ValueError(f"{name} and {names[0]} disagree on zero points: a fused layer needs both or neither")
        if p.format_version != first.format_version:
            raise ValueError(f"{name} (format {p.format_version}) and {names[0]} (format {first.format_version}) "
                             "differ: a fused layer's shards share one format")  # fmt: skip
        if (p.col_scale is None) != (first.col_scale is None) or (
            p.col_scale is not None and not torch.equal(p.col_scale, first.col_scale)
        ):
            raise ValueError(
                f"{name}.col_scale differs from {names[0]}.col_scale: the layers vLLM fuses read one input and must "
                "share one column scale (docs/format.md)"
            )
    # int64 offsets: the shards' nnz add up, and a fused layer's total may not fit the int32 of the format.
    pieces, offset = [first.outliers.indptr[:1].long()], 0
    for p in parts:  # a handful of shards (q/k/v, gate/up), not rows
        pieces.append(p.outliers.indptr[1:].long() + offset)
        offset += p.outliers.nnz
    if offset > INT32_MAX:
        raise ValueError(
            f"{' + '.join(names)} hold {offset:,} outliers together, more than the 2**31 - 1 that int32 CSR row "
            "pointers can address; leave some of these layers unquantized (--skip) or lower --max-outlier-fraction"
        )
    indptr = torch.cat(pieces)
    csr = OutlierCSR(
        indptr.to(torch.int32),
        torch.cat([p.outliers.indices for p in parts]),
        torch.cat([p.outliers.values for p in parts]),
        (sum(p.shape[0] for p in parts), k),
    )
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])  # type: ignore[misc]
    row_steps = None if first.row_steps is None else torch.cat([p.row_steps for p in parts])  # type: ignore[misc]
    return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), csr,
                           first.bits, first.group_size, zeros=zeros, col_scale=first.col_scale,
                           row_steps=row_steps)  # fmt: skip


def pad_rows(qw: QuantizedWeight, rows: int) -> QuantizedWeight:
    """``qw`` followed by zero rows up to ``rows`` (vLLM pads a vocabulary shard to a multiple of 64 rows).

    A padding row has step 0 (version 3: unit 0 and multipliers 0) and no outliers, so its ``W'`` row is exactly zero
    whatever its codes and zero point.
    """
    n, k = qw.shape
    extra = rows - n
    if extra < 0:
        raise ValueError(f"cannot pad {n} rows to {rows}")
    if extra == 0:
        return qw
    o = qw.outliers

    def grow(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])

    indptr = torch.cat([o.indptr, o.indptr[-1:].expand(extra)])
    csr = OutlierCSR(indptr, o.indices, o.values, (rows, k))
    zeros = None if qw.zeros is None else grow(qw.zeros)
    row_steps = None if qw.row_steps is None else grow(qw.row_steps)
    return QuantizedWeight(grow(qw.qweight), grow(qw.scales), csr, qw.bits, qw.group_size, zeros=zeros,
                           col_scale=qw.col_scale, row_steps=row_steps)  # fmt: skip
