"""The rotation experiment of bench/quality.py (issue 19, incoherence processing): the transform is orthogonal,
and its rows count the bits a checkpoint would store."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.quality import eq_spec, hadamard, rotate, rotated_dequant, stored_bits
from easyquant_vllm.quant import quantize_group, select_outliers
from tests.conftest import heavy_tailed


@pytest.mark.parametrize("block", [32, 64, 128])
def test_rotation_is_orthogonal_and_keeps_the_product(block: int) -> None:
    w, x = heavy_tailed(48, 256, seed=block), torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    h = hadamard(block)
    torch.testing.assert_close(h @ h.T, torch.eye(block), atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(rotate(w, block), block, inverse=True), w, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, block) @ rotate(w, block).T, x @ w.T, atol=1e-4, rtol=1e-5)


def test_hadamard_wants_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)


@pytest.mark.parametrize("outliers_first", [False, True])
def test_rotated_rows_count_stored_bits(outliers_first: bool) -> None:
    w = heavy_tailed(64, 256, seed=7)
    w[3, 5] = 40 * w.abs().max()  # one outlier that no 16-level grid of its group can hold
    spec = eq_spec(3, 64)
    (wq,), bits, nnz = rotated_dequant([w], spec, outliers_first)
    assert nnz >= 1
    assert wq[3, 5].item() == pytest.approx(w[3, 5].item(), rel=1e-3)  # kept, in either domain
    assert ((wq - w).norm() / w.norm()).item() < 0.15
    if outliers_first:  # dense part without outliers, then 48 bits per outlier and the CSR row pointers
        rows, cols = select_outliers(w, spec.outlier_threshold, spec.max_outlier_fraction)
        d = w.clone()
        d[rows, cols] = 0.0
        dense = quantize_group([rotate(d, 64)], replace(spec, max_outlier_fraction=0.0), with_stats=False)[0]
        assert dense.outliers.nnz == 0 and nnz == rows.numel()
        assert bits == stored_bits(dense) + 48 * nnz + 32 * (w.shape[0] + 1)
    assert 4.5 < bits / w.numel() < 5.0
