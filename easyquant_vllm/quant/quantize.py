"""Q(W) and its inverse: the one definition of EasyQuant quantize / dequantize for a linear weight.

``W [N, K]`` (out x in) becomes a dense part -- signed codes ``q`` with one float16 step size per
group of ``G`` consecutive input columns -- plus a sparse part ``S`` holding the outliers in float16:

    W' = dequant(q, s) + S,   dequant(q, s)[n, k] = s[n, k // G] * q[n, k]

The code at an outlier position is 0, so the sum equals the paper's overwrite (Eq. 4) exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .outliers import OutlierCSR, csr_from_coordinates, rows_from_indptr, select_outliers
from .packing import check_bits, code_offset, code_range, pack_codes, pack_factor, unpack_codes
from .solvers import (
    AdamParams,
    SearchParams,
    group_loss,
    quantize_codes,
    rtn_scales,
    solve_adam,
    solve_search,
)

METHODS = ("search", "adam", "rtn")
"""Range optimisers: ``search`` (ours, default), ``adam`` (the paper's), ``rtn`` (none: max-abs)."""

DEFAULT_METHOD = "search"
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
AUTO_GROUP_SIZES = (128, 64, 32)
"""Candidates for ``group_size="auto"``, best first: the largest that divides every input dim wins."""

# Elements per block of rows quantized together: keeps temporaries (~10 float32 copies of a block)
# at a few tens of MB whatever the tensor size, and the block cache-friendly.
_BLOCK_ELEMS = 1 << 20


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight. ``group_size`` is resolved here: 32, 64, 128 or -1 (per channel)."""

    bits: int = 4
    group_size: int = 128
    outlier_threshold: float = 3.0
    max_outlier_fraction: float = 0.01
    method: str = DEFAULT_METHOD
    adam: AdamParams = field(default_factory=AdamParams)
    search: SearchParams = field(default_factory=SearchParams)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"unsupported group_size = {self.group_size}; supported: {list(SUPPORTED_GROUP_SIZES)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if not 0.0 <= self.max_outlier_fraction <= 1.0:
            raise ValueError(f"max_outlier_fraction must be in [0, 1], got {self.max_outlier_fraction}")


@dataclass(frozen=True)
class QuantStats:
    """Per-weight numbers for the converter's report. Errors are relative Frobenius norms."""

    outlier_fraction: float
    rel_err: float  # ||W - W'|| / ||W|| of EasyQuant (this spec)
    rel_err_rtn: float  # same for plain RTN: max-abs range per group, no outlier isolation


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized linear weight in the canonical checkpoint layout.

    Attributes:
        qweight: ``[N, K // pack_factor]`` int32 packed codes ``u = q + 2**(bits-1)``.
        scales: ``[N, K // G]`` float16 step sizes (``[N, 1]`` per channel).
        outliers: the sparse part, CSR over rows.
        bits, group_size: as in :class:`QuantSpec` (``group_size`` -1 = per channel).
        stats: reconstruction numbers, or None when not asked for.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    outliers: OutlierCSR
    bits: int
    group_size: int
    stats: QuantStats | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.outliers.shape

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on ``device``."""
        o = self.outliers
        csr = OutlierCSR(o.indptr.to(device), o.indices.to(device), o.values.to(device), o.shape)
        return QuantizedWeight(self.qweight.to(device), self.scales.to(device), csr, self.bits, self.group_size,
                               self.stats)  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N, K]`` reconstruction ``W'`` in ``dtype``."""
        o = self.outliers
        return dequantize(self.qweight, self.scales, o.indptr, o.indices, o.values, self.bits, self.group_size, dtype)


def effective_group_size(k: int, group_size: int) -> int:
    """Columns per group: ``group_size``, or ``K`` when it is -1 (one range per output channel)."""
    return k if group_size == -1 else group_size


def resolve_group_size(in_dims: list[int] | set[int], group_size: int | str) -> int:
    """Resolve ``"auto"`` to the largest of 128/64/32 dividing every input dim; check an explicit size.

    Raises ValueError naming the offending input dims and the sizes that would work.
    """
    dims = sorted(set(in_dims))
    if group_size == "auto":
        for g in AUTO_GROUP_SIZES:
            if all(d % g == 0 for d in dims):
                return g
        raise ValueError(
            f"group_size auto: none of {list(AUTO_GROUP_SIZES)} divides every input dimension {dims}; "
            "use --group-size -1 (per output channel)"
        )
    g = int(group_size)
    if g not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"unsupported group_size = {g}; supported: {list(SUPPORTED_GROUP_SIZES)} or 'auto'")
    bad = [d for d in dims if g != -1 and d % g]
    if bad:
        ok = [c for c in SUPPORTED_GROUP_SIZES if c == -1 or all(d % c == 0 for d in dims)]
        raise ValueError(f"group_size {g} does not divide input dimension(s) {bad}; sizes that would: {ok}")
    return g


def quantize_weight(
    w: torch.Tensor, spec: QuantSpec, device: torch.device | str | None = None, with_stats: bool = True
) -> QuantizedWeight:
    """Quantize one linear weight: outliers out, range optimised per group, codes packed.

    Args:
        w: ``[N, K]`` float16/bfloat16/float32, finite; ``K`` a multiple of the pack factor and of G.
        spec: bits, group size (resolved), outlier criterion, range optimiser.
        device: where to compute (default: ``w``'s device); results are returned on ``w``'s device.
        with_stats: also compute :class:`QuantStats` (two extra passes).

    Returns:
        The canonical layout (see :class:`QuantizedWeight`); deterministic for a given input and device.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got shape {tuple(w.shape)} dtype {w.dtype}")
    n, k = w.shape
    pf = pack_factor(spec.bits)
    g = effective_group_size(k, spec.group_size)
    if k % pf or k % g:
        raise ValueError(f"input dim {k} must be a multiple of {pf} (packing) and of group size {g}")
    out_device = w.device
    device = torch.device(device) if device is not None else w.device

    rows, cols = select_outliers(w, spec.outlier_threshold, spec.max_outlier_fraction)
    csr = csr_from_coordinates(rows, cols, w[rows, cols], (n, k))
    outlier_rows = rows.to(device)
    outlier_cols = cols.to(device)

    qweight = torch.empty(n, k // pf, dtype=torch.int32, device=out_device)
    scales = torch.empty(n, k // g, dtype=torch.float16, device=out_device)
    sq_err = sq_err_rtn = sq_norm = 0.0
    rows_per_block = max(1, _BLOCK_ELEMS // k)
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        block = w[r0:r1].to(device=device, dtype=torch.float32)
        normal = block.clone()
        sel = (outlier_rows >= r0) & (outlier_rows < r1)
        normal[outlier_rows[sel] - r0, outlier_cols[sel]] = 0.0
        x = normal.view(-1, g)  # one line per group: (rows * K/G, G)

        s = _solve(x, spec)
        # The checkpoint stores float16 steps; choose the codes for the stored step, and keep the
        # max-abs step wherever rounding to float16 made ours worse (never worse than RTN).
        s16 = s.to(torch.float16).float()
        s_rtn16 = rtn_scales(x, spec.bits).to(torch.float16).float()
        loss = group_loss(x, s16, spec.bits)
        loss_rtn = group_loss(x, s_rtn16, spec.bits)
        use_rtn = loss_rtn < loss
        s16 = torch.where(use_rtn, s_rtn16, s16)
        loss = torch.where(use_rtn, loss_rtn, loss)

        q = quantize_codes(x, s16, spec.bits)
        u = (q + code_offset(spec.bits)).to(torch.uint8).view(r1 - r0, k)
        qweight[r0:r1] = pack_codes(u, spec.bits).to(out_device)
        scales[r0:r1] = s16.view(r1 - r0, k // g).to(torch.float16).to(out_device)

        if with_stats:
            xb = block.view(-1, g)
            sq_err += float(loss.sum())
            sq_err_rtn += float(group_loss(xb, rtn_scales(xb, spec.bits).half().float(), spec.bits).sum())
            sq_norm += float(block.square().sum())

    stats = None
    if with_stats:
        if csr.nnz:  # outliers are exact up to float16 rounding of their values
            orig = w[rows, cols].float()
            sq_err += float((csr.values.float().to(orig.device) - orig).square().sum())
        norm = math.sqrt(sq_norm) or 1.0
        stats = QuantStats(csr.nnz / (n * k), math.sqrt(sq_err) / norm, math.sqrt(sq_err_rtn) / norm)
    return QuantizedWeight(qweight, scales, csr, spec.bits, spec.group_size, stats)


def _solve(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.method == "search":
        return solve_search(x, spec.bits, spec.search)
    if spec.method == "adam":
        return solve_adam(x, spec.bits, spec.adam)
    return rtn_scales(x, spec.bits)


def dequantize_dense(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Dense part only: ``[N, K]`` float32 ``s[n, k // G] * (u[n, k] - 2**(bits-1))``.

    Args:
        qweight: ``[N, K // pack_factor]`` int32.
        scales: ``[N, K // G]`` float16 (any float dtype accepted).
    """
    u = unpack_codes(qweight, bits)
    n, k = u.shape
    g = effective_group_size(k, group_size)
    q = u.to(torch.float32) - code_offset(bits)
    return (q.view(n, k // g, g) * scales.float().unsqueeze(-1)).view(n, k)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    outlier_indptr: torch.Tensor,
    outlier_indices: torch.Tensor,
    outlier_values: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference reconstruction ``W' = dequant(q, s) + S``, ``[N, K]`` in ``dtype``.

    Arithmetic is float32 (float16 step x integer code, plus the float16 outlier value); the result
    is rounded to ``dtype`` once at the end. Kernels are tested against this function.
    """
    w = dequantize_dense(qweight, scales, bits, group_size)
    if outlier_indices.numel():
        rows = rows_from_indptr(outlier_indptr)
        w.index_put_((rows, outlier_indices.long()), outlier_values.float(), accumulate=True)
    return w.to(dtype)


__all__ = [
    "AUTO_GROUP_SIZES",
    "DEFAULT_METHOD",
    "METHODS",
    "SUPPORTED_GROUP_SIZES",
    "AdamParams",
    "QuantSpec",
    "QuantStats",
    "QuantizedWeight",
    "SearchParams",
    "code_range",
    "dequantize",
    "dequantize_dense",
    "effective_group_size",
    "quantize_weight",
    "resolve_group_size",
]
