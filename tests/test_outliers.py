"""n-sigma outlier selection and the CSR outlier matrix."""

from __future__ import annotations

import torch

from easyquant_vllm.quant import QuantSpec, quantize_weight, select_outliers, tensor_mean_std
from tests.conftest import heavy_tailed


def test_select_outliers_matches_definition() -> None:
    w = heavy_tailed(64, 256, seed=3)
    rows, cols = select_outliers(w, threshold=3.0, max_fraction=1.0)
    mean, std = w.double().mean(), w.double().std(unbiased=False)
    expected = ((w.double() - mean).abs() >= 3.0 * std).nonzero()
    assert torch.equal(torch.stack([rows, cols], 1), expected)
    assert abs(tensor_mean_std(w)[1] - float(std)) < 1e-6


def test_select_outliers_respects_cap_keeping_largest() -> None:
    w = heavy_tailed(64, 256, seed=4)
    all_rows, _ = select_outliers(w, 2.0, 1.0)
    cap = 0.005
    rows, cols = select_outliers(w, 2.0, cap)
    assert all_rows.numel() > int(cap * w.numel())  # the cap binds in this case
    assert rows.numel() == int(cap * w.numel())
    dev = (w - w.mean()).abs()
    kept = dev[rows, cols]
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[rows, cols] = False
    assert kept.min() >= dev[mask].max()  # no dropped entry deviates more than a kept one
    flat = rows * w.shape[1] + cols
    assert torch.equal(flat, flat.sort().values)  # row-major order


def test_select_outliers_disabled() -> None:
    w = heavy_tailed(8, 64)
    assert select_outliers(w, 0.0, 0.01)[0].numel() == 0
    assert select_outliers(w, 3.0, 0.0)[0].numel() == 0
    assert select_outliers(torch.zeros(4, 32), 3.0, 0.01)[0].numel() == 0


def test_outlier_codes_dequantize_to_zero_and_sparse_restores_values() -> None:
    w = heavy_tailed(48, 256, seed=5, dtype=torch.float16)
    qw = quantize_weight(w, QuantSpec.for_version(1, group_size=64))
    o = qw.outliers
    assert o.nnz > 0
    rows, cols = select_outliers(w, 3.0, 0.01)
    dense_only = qw.dequantize() - o.to_dense()
    assert torch.all(dense_only[rows, cols] == 0)  # code 0 at every outlier position
    # dequant + sparse gives back the float16 outlier values bit for bit
    assert torch.equal(qw.dequantize(torch.float16)[rows, cols], w[rows, cols])
    assert int(o.indptr[-1]) == o.nnz and int(o.indptr[0]) == 0
