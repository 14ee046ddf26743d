"""Tensor-parallel slices of a quantized weight recombine to the full layer's output."""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.quant import QuantSpec, quantize_weight
from easyquant_vllm.sharding import slice_columns, slice_rows, stack_rows
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
