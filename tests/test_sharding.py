"""Tensor-parallel slices of a quantized weight recombine to the full layer's output."""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.quant import QuantSpec, dequantize_rows, max_row_nnz, quantize_weight
from easyquant_vllm.sharding import pad_rows, slice_columns, slice_rows, stack_rows
from tests.conftest import heavy_tailed


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_slices_stack_to_full(group_size: int, tp: int) -> None:
    qw = quantize_weight(heavy_tailed(128, 256, seed=1), QuantSpec.for_version(1, group_size=group_size))
    rows = 128 // tp
    parts = [slice_rows(qw, r * rows, rows) for r in range(tp)]
    assert sum(p.outliers.nnz for p in parts) == qw.outliers.nnz
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), qw.dequantize())
    assert torch.equal(stack_rows(parts).dequantize(), qw.dequantize())


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_partial_outputs_sum_to_full(group_size: int, tp: int) -> None:
    qw = quantize_weight(heavy_tailed(96, 256, seed=2), QuantSpec.for_version(1, group_size=group_size))
    x = torch.randn(3, 256, dtype=torch.float64)
    cols = 256 // tp
    partial = sum(x[:, r * cols : (r + 1) * cols] @ slice_columns(qw, r * cols, cols).dequantize(torch.float64).T
                  for r in range(tp))  # fmt: skip
    torch.testing.assert_close(partial, x @ qw.dequantize(torch.float64).T)


def test_merged_shards_like_qkv() -> None:
    # q (64 rows), k and v (16 rows each) stacked: the merged layer equals the three side by side.
    q, k, v = (quantize_weight(heavy_tailed(n, 128, seed=n + i), QuantSpec.for_version(1, group_size=32))
               for i, n in enumerate((64, 16, 16)))  # fmt: skip
    merged = stack_rows([q, k, v])
    assert merged.shape == (96, 128)
    expected = torch.cat([q.dequantize(), k.dequantize(), v.dequantize()])
    assert torch.equal(merged.dequantize(), expected)


def test_column_slice_must_align() -> None:
    qw = quantize_weight(heavy_tailed(8, 128, seed=3), QuantSpec.for_version(1, group_size=64))
    with pytest.raises(ValueError, match="align"):
        slice_columns(qw, 32, 64)


@pytest.mark.parametrize("version", [1, 2])
def test_dequantize_rows_is_an_embedding_lookup_of_w_prime(version: int) -> None:
    w = heavy_tailed(96, 128, seed=4)
    w[7, 3], w[7, 100], w[50, 0] = 0.9, -0.8, 1.2  # rows with outliers, taken twice and out of order
    qw = quantize_weight(w, QuantSpec.for_version(version, group_size=64))
    width = max_row_nnz(qw.outliers.indptr)
    assert qw.outliers.nnz > 0 and width >= 2
    ids = torch.tensor([[50, 7, 0], [7, 95, 50]])
    assert torch.equal(dequantize_rows(qw, ids, width), qw.dequantize()[ids])
    assert torch.equal(dequantize_rows(qw, ids, width, torch.bfloat16), qw.dequantize(torch.bfloat16)[ids])
    assert dequantize_rows(qw, ids[:, :0], width).shape == (2, 0, 128)


def test_pad_rows_appends_exact_zero_rows() -> None:
    qw = quantize_weight(heavy_tailed(40, 64, seed=5), QuantSpec(group_size=32))
    padded = pad_rows(qw, 48)
    d = padded.dequantize()
    assert d.shape == (48, 64) and torch.equal(d[:40], qw.dequantize()) and not d[40:].any()
    assert int(padded.outliers.indptr[-1]) == qw.outliers.nnz and padded.outliers.indptr.numel() == 49
    assert pad_rows(qw, 40) is qw
    with pytest.raises(ValueError, match="cannot pad 40 rows to 32"):
        pad_rows(qw, 32)
