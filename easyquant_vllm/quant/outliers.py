"""n-sigma outlier selection (EasyQuant Eq. 3) and the CSR matrix that stores the outliers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows per block when scanning a tensor for outliers: bounds the temporaries to a few MB.
_SCAN_ELEMS = 1 << 22


@dataclass(frozen=True)
class OutlierCSR:
    """The sparse outlier matrix ``S`` of one weight, in CSR over output rows.

    Attributes:
        indptr: ``[N + 1]`` int32, ``indptr[0] == 0``, non-decreasing, ``indptr[N] == nnz``.
        indices: ``[nnz]`` int32 column of each outlier, strictly ascending within a row.
        values: ``[nnz]`` float16 original weight value of each outlier.
        shape: ``(N, K)`` of the dense weight.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N, K]`` dense matrix with the outlier values and zeros elsewhere."""
        n, k = self.shape
        dense = torch.zeros(n, k, dtype=dtype, device=self.values.device)
        rows = rows_from_indptr(self.indptr)
        dense[rows, self.indices.long()] = self.values.to(dtype)
        return dense


def rows_from_indptr(indptr: torch.Tensor) -> torch.Tensor:
    """``[nnz]`` int64 row index of each CSR entry, from ``indptr [N + 1]``."""
    counts = (indptr[1:] - indptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=indptr.device), counts)


def csr_from_coordinates(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> OutlierCSR:
    """Build an :class:`OutlierCSR` from coordinates already sorted row-major.

    Args:
        rows, cols: ``[nnz]`` int64, sorted by ``(row, col)``, no duplicates.
        values: ``[nnz]`` any float dtype; stored as float16.
        shape: ``(N, K)``.
    """
    n, _ = shape
    counts = torch.bincount(rows, minlength=n)
    indptr = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    indptr[1:] = torch.cumsum(counts, 0)
    return OutlierCSR(indptr.to(torch.int32), cols.to(torch.int32), values.to(torch.float16), shape)


def tensor_mean_std(w: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation over all entries of ``w``.

    Computed block by block in float32 (torch's cascade summation) and combined in Python floats,
    so that no float64 or float32 copy of the whole tensor is ever made.
    """
    flat = w.reshape(-1)
    total = 0.0
    total_sq = 0.0
    for start in range(0, flat.numel(), _SCAN_ELEMS):
        block = flat[start : start + _SCAN_ELEMS].float()
        total += float(block.sum())
        total_sq += float((block * block).sum())
    n = flat.numel()
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0)
    return mean, var**0.5


def count_nonfinite(w: torch.Tensor) -> int:
    """Number of NaN/Inf entries of ``w``, scanned in blocks (no full-size boolean mask)."""
    flat = w.reshape(-1)
    return sum(int((~torch.isfinite(flat[i : i + _SCAN_ELEMS])).sum()) for i in range(0, flat.numel(), _SCAN_ELEMS))


def select_outliers(w: torch.Tensor, threshold: float, max_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the n-sigma outliers of a weight, capped to a fraction of its entries.

    An entry is an outlier if ``|w - mean(w)| >= threshold * std(w)`` (per-tensor statistics). If more
    than ``floor(max_fraction * w.numel())`` entries qualify, only the ones farthest from the mean are
    kept; ties are broken by position (row-major), so the selection is deterministic.

    Args:
        w: ``[N, K]`` float weight (any float dtype, any device).
        threshold: n in "n sigma"; ``<= 0`` or ``inf`` disables outliers.
        max_fraction: cap on ``nnz / (N*K)`` in ``[0, 1]``.

    Returns:
        ``(rows, cols)``: ``[nnz]`` int64 each, sorted row-major.
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_outlier_fraction must be in [0, 1], got {max_fraction}")
    n, k = w.shape
    empty = torch.zeros(0, dtype=torch.int64, device=w.device)
    cap = int(max_fraction * n * k)
    if threshold <= 0 or threshold == float("inf") or cap == 0:
        return empty, empty
    mean, std = tensor_mean_std(w)
    if std == 0.0:
        return empty, empty
    cut = threshold * std
    # Scan in row blocks: the candidate lists are small (a few % of entries at most).
    rows_per_block = max(1, _SCAN_ELEMS // k)
    flat_idx, dev = [], []
    for r0 in range(0, n, rows_per_block):
        block_dev = (w[r0 : r0 + rows_per_block].float() - mean).abs_()
        idx = torch.nonzero(block_dev.reshape(-1) >= cut).squeeze(1)
        flat_idx.append(idx + r0 * k)
        dev.append(block_dev.reshape(-1)[idx])
    flat = torch.cat(flat_idx)
    if flat.numel() > cap:
        dev_all = torch.cat(dev)
        # Stable sort: among equal deviations the earlier (row-major) position wins.
        order = torch.sort(dev_all, descending=True, stable=True).indices[:cap]
        flat = torch.sort(flat[order]).values
    return flat // k, flat % k
