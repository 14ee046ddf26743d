"""Our C++ CPU kernel (easyquant_vllm/kernels/csrc/eq_cpu.cpp): every path this CPU has, against the reference.

Each path runs where the CPU has its instructions (AVX2 for ``fma``, ``i16`` and ``dequant``, AVX512-BF16 for
``bf16dp``, AMX for ``amx``); the others skip and say which instructions are missing. Every format version runs
(:data:`FORMAT_VERSIONS`), and version 3's extreme metadata (zero units and multipliers, zero points 0 and 255)
on its own. No assertion depends on the path or the rounding a machine gets: approximate paths are held to a
relative error, and the exact ones (``fma``; ``bf16dp``/``amx`` without a column scale; ``dequant``) to the
reference's bits. The plan that picks a path by M is exercised under torch.compile with the dispatch counter.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from easyquant_vllm.kernels import LayerSpec, NativeCpuKernel, choose_kernel, dispatch_counts, reset_dispatch_counts
from easyquant_vllm.kernels import cpu_native as native
from easyquant_vllm.quant import QuantizedWeight, QuantSpec, quantize_weight
from easyquant_vllm.quant.outliers import OutlierCSR
from tests.conftest import FORMAT_VERSIONS, heavy_tailed, layer_spec, quantized

NEEDS = {"fma": "AVX2 + FMA", "i16": "AVX2 + FMA", "i8": "AVX2 + FMA", "dequant": "AVX2 + FMA",
         "bf16dp": "AVX512-BF16 and bf16 activations", "amx": "AMX-BF16, AVX512-VBMI and bf16 activations",
         "vnni": "AVX512-VNNI"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    problem = native.build_problem()
    if problem:
        pytest.skip(f"the native CPU kernel could not be built here: {problem}")


def _kernel(qw: QuantizedWeight, dtype: torch.dtype, path: str) -> NativeCpuKernel:
    if path not in native.available_paths(dtype):
        pytest.skip(f"path {path} needs {NEEDS[path]}; this CPU has {native.available_paths(dtype)} for {dtype}")
    return NativeCpuKernel(layer_spec(qw, dtype), plan=native.parse_plan(path, native.PATHS))


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def _bound(path: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Relative error allowed: x and the output rounded to 16 bits (~2.5e-3 in bf16, ~3e-4 in fp16); the i8 path
    rounds x * c to 8 bits per 32 columns (~5e-3 on Gaussian x: rms max/(127 sqrt 12), max ~2.2 sigma)."""
    if path == "i8":
        return 1.5e-2
    return 6e-3 if dtype == torch.bfloat16 else 1e-3


def _no_outliers(n: int, k: int) -> OutlierCSR:
    """An empty CSR for an ``n x k`` weight."""
    return OutlierCSR(torch.zeros(n + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                      torch.zeros(0, dtype=torch.float16), (n, k))  # fmt: skip


def _heavy_row_weight(n: int = 32, k: int = 256) -> QuantizedWeight:
    """A weight whose row 5 holds 200 outliers (a quarter of the columns) and whose other rows hold none."""
    qw = quantize_weight(heavy_tailed(n, k, seed=9), QuantSpec.for_version(1, group_size=64, outlier_threshold=0.0))
    cols = torch.arange(0, k, 1 + (k - 1) // 200)[:200].to(torch.int32)
    indptr = torch.zeros(n + 1, dtype=torch.int32)
    indptr[6:] = cols.numel()
    values = torch.linspace(-0.5, 0.5, cols.numel()).half()
    u = qw.qweight.clone()  # code 0 (u = 8) under each outlier, as the writer stores it
    words, nibbles = cols.long() // 8, cols.long() % 8
    u[5, words] = (u[5, words] & ~(0xF << (4 * nibbles)).to(torch.int32)) | (8 << (4 * nibbles)).to(torch.int32)
    return QuantizedWeight(u, qw.scales, OutlierCSR(indptr, cols, values, (n, k)), 4, 64)


# (N, K, group size). (32, 8960, -1): per channel over a K whose int32 sums would overflow in one piece (the i16
# path's sub-blocks of x).
SHAPES = [(1536, 576, 64), (64, 128, 32), (576, 1536, 128), (96, 256, -1), (48, 4096, 128), (32, 8960, -1)]


@pytest.mark.parametrize("path", native.PATHS)
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
def test_native_path_matches_reference(path: str, version: int, dtype: torch.dtype, n: int, k: int,
                                       group_size: int) -> None:  # fmt: skip
    qw = quantized(heavy_tailed(n, k, seed=n + k), version, group_size)
    assert qw.outliers.nnz > 0
    kernel = _kernel(qw, dtype, path)
    tensors = kernel.prepare(qw)
    ref_w = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(k)
    for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64, 65, 70, 100):  # every row tile, full and partial
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
        y = kernel.apply(tensors, x, bias)
        assert y.dtype == dtype and y.shape == (m, n)
        ref = x.double() @ ref_w.T + (bias.double() if bias is not None else 0)
        # Only x, the output and (dequant path) W' are rounded (_bound).
        assert _rel(y, ref) < _bound(path, dtype), (path, m)


@pytest.mark.parametrize("path", native.PATHS_8BIT)
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
def test_8bit_codes_match_reference(path: str, version: int, dtype: torch.dtype, n: int, k: int,
                                    group_size: int) -> None:  # fmt: skip
    # 8-bit codes (a quantized lm_head): four to a word, so the i16 path's code pairs and x layout differ from the
    # 4-bit ones; a byte in the wrong column would be O(1) here.
    qw = quantized(heavy_tailed(n, k, seed=n + k), version, group_size, bits=8)
    assert qw.bits == 8 and qw.outliers.nnz > 0
    kernel = _kernel(qw, dtype, path)
    tensors = kernel.prepare(qw)
    assert tensors["w_q"].numel() == n * k // 4
    ref_w = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(k)
    reset_dispatch_counts()
    ms = (1, 2, 3, 4, 5, 9, 13, 16, 17, 70)  # amx: every slice size (4, 8, 12, 16 rows), whole and partial
    for m in ms:
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
        y = kernel.apply(tensors, x, bias)
        ref = x.double() @ ref_w.T + (bias.double() if bias is not None else 0)
        assert _rel(y, ref) < _bound(path, dtype), (path, m)
    assert dict(dispatch_counts()) == {f"native-int4-cpu:{path}": len(ms)}
    if path == "dequant":  # W' in x's dtype, bit for bit, as for 4-bit codes
        x = torch.randn(40, k, generator=g).to(dtype)
        assert torch.equal(kernel.apply(tensors, x, None), F.linear(x, qw.dequantize(dtype)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vnni_gives_i16_outputs_bit_for_bit(bits: int, version: int, dtype: torch.dtype) -> None:
    # vnni is i16's arithmetic on 16 lanes (same x in fixed point, exact int32 sums, same epilogue formulas): every
    # row tile (1-8 rows and their remainders), one sub-block per group and several (per channel at K = 384: three
    # of 128), outliers and bias included.
    for n, k, group_size in ((48, 512, 128), (32, 384, -1), (64, 256, 32)):
        qw = quantized(heavy_tailed(n, k, seed=k + bits), version, group_size, bits=bits)
        vnni, i16 = _kernel(qw, dtype, "vnni"), _kernel(qw, dtype, "i16")
        tv, ti = vnni.prepare(qw), i16.prepare(qw)
        g = torch.Generator().manual_seed(n)
        for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 16, 19):  # every row tile of vnni (1-8) and of i16 (1-4)
            x = torch.randn(m, k, generator=g).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
            assert torch.equal(vnni.apply(tv, x, bias), i16.apply(ti, x, bias)), (n, k, group_size, m)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vnni_runs_of_blocks_give_i16_outputs_bit_for_bit(bits: int, version: int, dtype: torch.dtype) -> None:
    # Up to 8 batch rows vnni reads four runs of a thread's blocks side by side, each sub-block width its own
    # unrolled loop (32, 64, 96, 128 columns: groups of 32, 64, per channel at K = 576, 128). 23 blocks give runs of 5
    # and 3 left over on one thread, runs of 2 or 3 and the rest on two; 9 blocks runs of 1 on two threads (and 4 or
    # 5 blocks per thread). A block in the wrong run, a word in the wrong sub-block or a block's outliers in another
    # would differ from i16's one-block loops; 9 rows take no runs. Version 2: float16 steps, integer zeros.
    threads = torch.get_num_threads()
    try:
        for blocks, k, group_size in ((23, 384, 32), (23, 384, 64), (23, 576, -1), (23, 512, 128), (9, 256, 32)):
            n = 16 * blocks
            qw = quantized(heavy_tailed(n, k, seed=k + group_size + blocks), version, group_size, bits=bits)
            assert qw.outliers.nnz > 0
            vnni, i16 = _kernel(qw, dtype, "vnni"), _kernel(qw, dtype, "i16")
            tv, ti = vnni.prepare(qw), i16.prepare(qw)
            g = torch.Generator().manual_seed(k)
            bias = torch.randn(n, generator=g).to(dtype)
            for m in range(1, 10):
                x = torch.randn(m, k, generator=g).to(dtype)
                for t in (1, 2):
                    torch.set_num_threads(t)
                    assert torch.equal(vnni.apply(tv, x, bias), i16.apply(ti, x, bias)), (blocks, k, group_size, m, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", native.PATHS_8BIT)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_8bit_v3_extremes_and_largest_sums(path: str, group_size: int) -> None:
    # Version 3's 8-bit zero byte is whole codes (z = 255 lies above most codes, z = 0 below all), a = 0 / 255.
    qw = quantized(heavy_tailed(64, 256, seed=13), 3, group_size, bits=8)
    assert qw.row_steps is not None and qw.zeros is not None
    mult, zeros = qw.scales.clone(), qw.zeros.clone()
    mult[5, 0], mult[6] = 0, 255
    zeros[7], zeros[9] = 0, 255
    qw = replace(qw, scales=mult, zeros=zeros)
    kernel = _kernel(qw, torch.bfloat16, path)
    tensors = kernel.prepare(qw)
    x = torch.randn(9, 256).bfloat16()
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert _rel(kernel.apply(tensors, x, None), ref) < _bound(path)
    for r in (0, 4):  # one row at a time (the i16 path's row block)
        assert _rel(kernel.apply(tensors, x[r : r + 1], None), ref[r : r + 1]) < _bound(path), r
    # Every code 255 with zero point 0 and |x| = 1: the i16 path's largest int32 sums (64 pairs of 2 * 255 * 32767
    # per 128-column sub-block, 1.07e9 < 2^31); over K = 8960 in one piece they would wrap.
    n, k = 32, 8960
    empty = _no_outliers(n, k)
    full = QuantizedWeight(torch.full((n, k // 4), -1, dtype=torch.int32), torch.full((n, 1), 2.0**-14,
                           dtype=torch.float16), empty, 8, -1, zeros=torch.zeros(n, 1, dtype=torch.uint8))  # fmt: skip
    kernel = _kernel(full, torch.bfloat16, path)
    tensors = kernel.prepare(full)
    for sign in (1.0, -1.0):
        for m in (1, 3):
            y = kernel.apply(tensors, torch.full((m, k), sign).bfloat16(), None)
            assert _rel(y, torch.full((m, n), sign * 255 * 2.0**-14 * k, dtype=torch.float64)) < 6e-3, (sign, m)


@pytest.mark.parametrize("version", FORMAT_VERSIONS)
def test_8bit_layer_takes_the_native_kernel_after_its_self_check(version: int) -> None:
    # What a served 8-bit lm_head gets: the native kernel, its start-up self-check passed with 8-bit codes, not the
    # dense fallback (which would hold the matrix in bf16).
    qw = quantized(heavy_tailed(512, 256, seed=14), version, 32, bits=8)
    kernel_cls, reasons = choose_kernel(layer_spec(qw, torch.bfloat16), torch.device("cpu"))
    assert kernel_cls is NativeCpuKernel, reasons


def test_8bit_codes_refused_on_4bit_only_paths() -> None:
    qw = quantized(heavy_tailed(32, 64, seed=3), 2, 32, bits=8)
    kernel = NativeCpuKernel(layer_spec(qw, torch.float16), plan=native.parse_plan("fma", native.PATHS))
    refusal = "8-bit codes take the i16, vnni, amx and dequant paths only; the plan chose path 0"
    with pytest.raises(RuntimeError, match=refusal):
        kernel.apply(kernel.prepare(qw), torch.randn(1, 64).half(), None)


@pytest.mark.parametrize("path", native.PATHS)
def test_native_path_heavy_outlier_row_and_no_outliers(path: str) -> None:
    qw = _heavy_row_weight()
    kernel = _kernel(qw, torch.bfloat16, path)
    for m in (1, 4, 20):
        x = torch.randn(m, 256).bfloat16()
        y = kernel.apply(kernel.prepare(qw), x, None)
        assert _rel(y, x.double() @ qw.dequantize(torch.float64).T) < _bound(path)
    empty = _no_outliers(32, 256)
    bare = QuantizedWeight(qw.qweight, qw.scales, empty, 4, 64)
    x = torch.randn(7, 256).bfloat16()
    y = kernel.apply(kernel.prepare(bare), x, None)
    assert _rel(y, x.double() @ bare.dequantize(torch.float64).T) < _bound(path)


@pytest.mark.parametrize("path", native.PATHS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_native_path_largest_sums_do_not_overflow(path: str, sign: float) -> None:
    # Every code 15 with zero point 0 and |x| = 1 everywhere: each product is as large as the codes allow and
    # all have one sign. The i16 path's x is then 32767 in every column, and one int32 sum over K = 8960
    # columns would reach 15 * 32767 * 8960 = 4.4e9 > 2^31: its sums must stop at sub-blocks.
    n, k = 32, 8960
    steps = torch.full((n, 1), 2.0**-10, dtype=torch.float16)
    empty = _no_outliers(n, k)
    qw = QuantizedWeight(torch.full((n, k // 8), -1, dtype=torch.int32), steps, empty, 4, -1,
                         zeros=torch.zeros(n, 1, dtype=torch.uint8))  # fmt: skip
    kernel = _kernel(qw, torch.bfloat16, path)
    tensors = kernel.prepare(qw)
    for m in (1, 3):  # one row (the i16 path's row block) and a row tile
        y = kernel.apply(tensors, torch.full((m, k), sign).bfloat16(), None)
        ref = torch.full((m, n), sign * 15 * 2.0**-10 * k, dtype=torch.float64)  # 131.25; a wrapped sum is far off
        assert _rel(y, ref) < 6e-3, m


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_i8_path_is_exact_where_x_lies_on_its_grid(version: int, dtype: torch.dtype, group_size: int) -> None:
    # The i8 path's only approximation is x * c rounded to 8 bits per 32 columns. On an x whose every block of 32
    # is j * u, j in [-127, 127] with one |j| = 127 (u a power of two: exact in bf16 and fp16), and without a
    # column scale, that rounding is exact: what remains is the output's rounding, as for i16. A byte in the
    # wrong column, a dropped odd/even half or a wrong block step would be O(1) here.
    qw = quantized(heavy_tailed(64, 512, seed=5), version, group_size)
    qw = replace(qw, col_scale=None)
    kernel = _kernel(qw, dtype, "i8")
    g = torch.Generator().manual_seed(6)
    reset_dispatch_counts()
    for m in (1, 3, 4, 7, 16):
        j = torch.randint(-127, 128, (m, 512 // 32, 32), generator=g)
        j[:, :, 5] = 127 * torch.where(torch.rand(m, 512 // 32, generator=g) < 0.5, -1, 1)
        u = 2.0 ** torch.randint(-12, -4, (m, 512 // 32, 1), generator=g)
        x = (j * u).reshape(m, 512).to(dtype)
        y = kernel.apply(kernel.prepare(qw), x, None)
        ref = x.double() @ qw.dequantize(torch.float64).T
        assert _rel(y, ref) < (6e-3 if dtype == torch.bfloat16 else 1e-3), m
    assert dict(dispatch_counts()) == {"native-int4-cpu:i8": 5}  # the i8 path ran, every call


@pytest.mark.parametrize("m", [1, 3, 11, 16])
@pytest.mark.parametrize("path", native.PATHS)
def test_outliers_land_in_their_rows(path: str, m: int) -> None:
    # At M = 1 a block's outliers are added in one loop over its CSR range, each product masked into its row's
    # lane by the rows' bounds; from M = 3 on AVX2 one loop finds each outlier's row from the row ends and adds it
    # to 8 batch rows at once (M = 11: a partial second chunk of 8). Rows 0, 7, 8 and 15 of a block (the ends of
    # both 8-row halves), odd and even counts, empty rows between them, a block with none and the last block: one
    # wrong bound moves an outlier to a neighbouring row, an O(1) error there; every batch row is checked.
    n, k = 64, 256
    qw = quantize_weight(heavy_tailed(n, k, seed=11), QuantSpec.for_version(1, group_size=64, outlier_threshold=0.0))
    per_row = {0: 3, 7: 1, 8: 2, 15: 5, 20: 1, 50: 4, 63: 3}  # block 2 (rows 32-47) holds none; 48-63: rows 50, 63
    counts = torch.zeros(n, dtype=torch.int64)
    for row, c in per_row.items():
        counts[row] = c
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    g = torch.Generator().manual_seed(12)
    cols = torch.cat([torch.randperm(k, generator=g)[:c].sort().values for c in counts.tolist()]).to(torch.int32)
    values = (torch.rand(cols.numel(), generator=g) * 4 - 2).half()
    qw = replace(qw, outliers=OutlierCSR(indptr, cols, values, (n, k)))
    kernel = _kernel(qw, torch.bfloat16, path)
    tensors = kernel.prepare(qw)
    x = torch.randn(m, k, generator=g).bfloat16()
    y = kernel.apply(tensors, x, None).double()
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert _rel(y, ref) < _bound(path)
    dense_part = replace(qw, outliers=_no_outliers(n, k)).dequantize(torch.float64)
    outlier_part = x.double() @ (qw.dequantize(torch.float64) - dense_part).T
    # per row: the error is small against that row's own outlier contribution, not only against the whole output
    for r in range(m):
        for row in per_row:
            assert abs(float(y[r, row] - ref[r, row])) < 0.05 * abs(float(outlier_part[r, row])) + 0.02 * float(
                ref[r].abs().max()
            ), (r, row)


@pytest.mark.parametrize("bits", [4, 8])
def test_one_batch_row_of_huge_finite_x_stays_finite(bits: int) -> None:
    # Format version 3 with a tiny row unit d (2^-14): the one-row code must apply s = d a per group. Totals kept
    # as sums of a (sigma A) and multiplied by d at the end of the row are 1/d times the output: for x = 1e32 and
    # every code at its largest (zero point 0, a = 255) the output is ~1e35-1e36, those totals overflow fp32.
    n, k = 32, 8960
    empty = _no_outliers(n, k)
    qw = QuantizedWeight(torch.full((n, k * bits // 32), -1, dtype=torch.int32),
                         torch.full((n, k // 32), 255, dtype=torch.uint8), empty, bits, 32,
                         zeros=torch.zeros(n, k // 32, dtype=torch.uint8),
                         row_steps=torch.full((n,), 2.0**-14))  # fmt: skip
    kernel = _kernel(qw, torch.bfloat16, "i16")
    x = torch.full((1, k), 1e32).bfloat16()
    ref = x.double() @ qw.dequantize(torch.float64).T
    assert 1e34 < float(ref.abs().max()) < 1e37
    y = kernel.apply(kernel.prepare(qw), x, None)
    assert y.isfinite().all() and _rel(y, ref) < _bound("i16")


@pytest.mark.parametrize("path", native.PATHS)
def test_native_path_tiny_x(path: str) -> None:
    # A row of x at 1e-36 (a normal bf16): the integer paths scale x by its sub-block's largest value, and 32767
    # or 127 over so small a maximum overflows fp32 (every code would be -2^31 / -128). Row 1 is ordinary.
    # The weights are scaled to std ~15 so that every product x * w stays a normal fp32: the `dequant` path hands
    # the product to ATen's GEMM, and oneDNN's AMX kernel flushes denormal products to zero (16 % off at std 0.015).
    qw = quantized(heavy_tailed(64, 256, seed=10) * 1000, 2, 64)
    kernel = _kernel(qw, torch.bfloat16, path)
    x = torch.randn(2, 256).bfloat16()
    x[0] = torch.where(torch.arange(256) % 3 == 0, -1.0, 1.0).double().mul(1e-36).bfloat16()
    tensors = kernel.prepare(qw)
    y = kernel.apply(tensors, x, None)
    ref = x.double() @ qw.dequantize(torch.float64).T
    for r in range(2):
        assert _rel(y[r], ref[r]) < _bound(path), r
        assert _rel(kernel.apply(tensors, x[r : r + 1], None)[0], ref[r]) < _bound(path), r  # M = 1


@pytest.mark.parametrize("path", native.PATHS)
def test_native_path_non_finite_x_gives_non_finite_rows(path: str) -> None:
    # A NaN or inf in x must not come out as a finite number (the i16 path scales x per sub-block: its step
    # would be NaN/inf-derived), and must stay in its own batch row.
    qw = quantized(heavy_tailed(64, 256, seed=8), 2, 64)
    kernel = _kernel(qw, torch.bfloat16, path)
    # NaN / inf in columns that hold outliers, so that they go through the outliers' paths too (AVX2: 8 batch rows
    # at a time from M = 3; row 9 is in the second chunk of 8)
    cols = qw.outliers.indices.tolist()
    x = torch.randn(11, 256).bfloat16()
    x[1, cols[0]], x[2, cols[len(cols) // 2]], x[9, cols[-1]] = float("nan"), float("inf"), float("nan")
    bad = {1, 2, 9}
    tensors = kernel.prepare(qw)
    y = kernel.apply(tensors, x, None)
    for r in range(11):
        assert y[r].isfinite().any() == (r not in bad) and y[r].isfinite().all() == (r not in bad), r
    for r in range(4):  # one row at a time: the M = 1 code (i16 keeps one row's totals in registers)
        assert kernel.apply(tensors, x[r : r + 1], None).isfinite().all() == (r in (0, 3)), r


@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_path_is_the_reference_weight_and_gemm(version: int, dtype: torch.dtype) -> None:
    # W' in x's dtype, outliers included, bit-identical to the reference dequantize: the output then equals
    # ATen's own GEMM on that weight exactly.
    qw = quantized(heavy_tailed(96, 512, seed=4), version, 128)
    kernel = _kernel(qw, dtype, "dequant")
    x, bias = torch.randn(40, 512).to(dtype), torch.randn(96).to(dtype)
    y = kernel.apply(kernel.prepare(qw), x, bias)
    assert torch.equal(y, F.linear(x, qw.dequantize(dtype), bias))


def _v3_extremes(n: int, k: int, group_size: int) -> QuantizedWeight:
    """A format-version-3 weight with the extremes its metadata allows: row 3 with unit d = 0 and row 5's first
    group with multiplier a = 0 (both exact zeros), row 6 with a = 255 everywhere, zero points zq = 0 (row 7) and
    zq = 255 (row 9: z = 15.9375, below every code), and the quantizer's outliers (residuals in version 3)."""
    qw = quantized(heavy_tailed(n, k, seed=11), 3, group_size)
    assert qw.row_steps is not None and qw.zeros is not None and qw.outliers.nnz > 0
    row_steps, mult, zeros = qw.row_steps.clone(), qw.scales.clone(), qw.zeros.clone()
    row_steps[3] = 0
    mult[5, 0], mult[6] = 0, 255
    zeros[7], zeros[9] = 0, 255
    return replace(qw, scales=mult, zeros=zeros, row_steps=row_steps)


@pytest.mark.parametrize("path", native.PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_native_path_v3_extremes_match_reference(path: str, dtype: torch.dtype, group_size: int) -> None:
    qw = _v3_extremes(64, 256, group_size)
    kernel = _kernel(qw, dtype, path)
    tensors = kernel.prepare(qw)
    ref_w = qw.dequantize(torch.float64)
    indptr = qw.outliers.indptr
    assert int(ref_w[3].count_nonzero()) <= int(indptr[4] - indptr[3])  # d = 0: only the row's outliers remain
    g = torch.Generator().manual_seed(group_size)
    for m in (1, 2, 3, 4, 5, 9, 16, 17, 70):
        x = torch.randn(m, 256, generator=g).to(dtype)
        bias = torch.randn(64, generator=g).to(dtype) if m % 2 else None
        y = kernel.apply(tensors, x, bias)
        ref = x.double() @ ref_w.T + (bias.double() if bias is not None else 0)
        assert _rel(y, ref) < _bound(path, dtype), (path, m)
    if path == "dequant":  # W' in x's dtype, bit for bit
        x = torch.randn(40, 256, generator=g).to(dtype)
        assert torch.equal(kernel.apply(tensors, x, None), F.linear(x, qw.dequantize(dtype)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
def test_amx_zero_point_product_keeps_fp32_accuracy_under_cancellation(bits: int, version: int) -> None:
    # amx adds -(base + z) * sum(x) to each group's C tile by a tdpbf16ps of bf16 parts (h + m + l of the sum,
    # hi + lo of base + z). With x far from zero (mean 40) that term is ~100x the output, so parts that were off by
    # one bf16 step would show as O(1e-1) relative error; an exact product leaves the output's bf16 rounding. Compared
    # with i16 (exact int32 sums) on the same x: the two differ by a few bf16 steps at most.
    n, k = 48, 512
    qw = quantized(heavy_tailed(n, k, seed=bits + version), version, 32, bits=bits)
    amx, i16 = _kernel(qw, torch.bfloat16, "amx"), _kernel(qw, torch.bfloat16, "i16")
    ref_w = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(40 + bits)
    for m in (7, 16, 29):
        x = (40 + torch.randn(m, k, generator=g)).to(torch.bfloat16)
        ref = x.double() @ ref_w.T
        y = amx.apply(amx.prepare(qw), x, None)
        assert _rel(y, ref) < _bound("amx"), m
        assert _rel(y, ref) < 2 * _rel(i16.apply(i16.prepare(qw), x, None), ref) + 1e-3, m


@pytest.mark.parametrize("path", ["fma", "bf16dp", "amx"])
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_exact_paths_reproduce_w_prime_bit_for_bit(path: str, version: int, group_size: int) -> None:
    # x = the identity (M = K rows): row m of y is column m of W', rounded to bf16 once, so an exact path gives the
    # reference's bits. fma: W' / c built in fp32 (version 3: (u - z) * s, one rounding, as the reference), times
    # x * c (fp32: the reference's rounding of c), plus the outlier. bf16dp and amx multiply bf16 codes 128 + u
    # exactly and correct by 128 + z exactly; they round x * c to bf16, so they are exact without a column scale.
    n, k = 48, 256
    no_column_scale = {} if path == "fma" else {"normalize": "none"}
    qw = quantized(heavy_tailed(n, k, seed=k + n), version, group_size, **no_column_scale)
    assert qw.outliers.nnz > 0 and (path == "fma" or qw.col_scale is None)
    kernel = _kernel(qw, torch.bfloat16, path)
    y = kernel.apply(kernel.prepare(qw), torch.eye(k, dtype=torch.bfloat16), None)
    assert torch.equal(y, qw.dequantize(torch.bfloat16).T)


@pytest.mark.parametrize("version", FORMAT_VERSIONS)
def test_linear_op_forward_is_the_direct_call(version: int) -> None:
    # easyquant::linear runs forward() with apply_tensors() and meta(): the same op call as apply(), bit for bit.
    qw = quantized(heavy_tailed(64, 256, seed=12), version, 32)
    kernel = NativeCpuKernel(layer_spec(qw, torch.bfloat16))
    tensors = kernel.prepare(qw)
    x, bias = torch.randn(5, 256).bfloat16(), torch.randn(64).bfloat16()
    y = torch.ops.easyquant.linear(x, kernel.apply_tensors(tensors), bias, kernel.name, kernel.meta())
    assert torch.equal(y, kernel.apply(tensors, x, bias))


def test_can_implement_format_version_3() -> None:
    v3 = LayerSpec(64, 256, 4, 32, torch.bfloat16, "cpu", zero_points=True, column_scale=True, compact_steps=True)
    assert NativeCpuKernel.can_implement(v3) == (True, None)
    ok, why = NativeCpuKernel.can_implement(replace(v3, zero_points=False))
    assert not ok and "format version 3 (compact steps) layers have zero points" in (why or "")
    assert NativeCpuKernel.can_implement(replace(v3, bits=8)) == (True, None)  # i16 and dequant take 8-bit codes
    ok, why = NativeCpuKernel.can_implement(replace(v3, act_dtype=torch.float32))
    assert not ok and "needs bf16/fp16 activations" in (why or "")


def test_self_check_cache_key_includes_the_plan_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # A self-check passed under one EASYQUANT_CPU_PLAN must not stand for another plan in the same process (the i8
    # path's bound differs).
    from easyquant_vllm.kernels.moe import MoeSpec, NativeCpuMoeKernel

    spec, cpu = LayerSpec(64, 256, 4, 32, torch.bfloat16, "cpu"), torch.device("cpu")
    moe = MoeSpec(4, 256, 128, 4, 32, torch.bfloat16, "cpu")
    monkeypatch.delenv(native.ENV_PLAN, raising=False)
    keys = [(NativeCpuKernel.variant(spec, cpu), NativeCpuMoeKernel.variant(moe, cpu))]
    for plan in ("i16", "i8"):
        monkeypatch.setenv(native.ENV_PLAN, plan)
        keys.append((NativeCpuKernel.variant(spec, cpu), NativeCpuMoeKernel.variant(moe, cpu)))
    assert len({k[0] for k in keys}) == len({k[1] for k in keys}) == 3


def test_self_check_batches_cover_every_i16_row_tile() -> None:
    # The i16 path runs batch rows 4 at a time, then a tile of the 1-3 rows left: the start-up self-check must
    # run each of the four tiles.
    batches = NativeCpuKernel.check_batches(LayerSpec(64, 256, 4, 64, torch.bfloat16, "cpu"), torch.device("cpu"))
    assert {4 for m in batches if m >= 4} | {m % 4 for m in batches if m % 4} == {1, 2, 3, 4}


def test_repack_keeps_each_word_and_groups_steps_per_block() -> None:
    qw = quantize_weight(heavy_tailed(48, 256, seed=1), QuantSpec.for_version(1, group_size=64))
    w_q, scales = native.repack(qw.qweight, qw.scales)
    assert w_q.dtype == torch.int32 and w_q.shape == (3, 32 * 16)
    assert scales.dtype == torch.float16 and scales.shape == (3, 4 * 16)
    for b, q, j in ((0, 0, 0), (1, 5, 7), (2, 31, 15)):
        assert w_q[b, q * 16 + j] == qw.qweight[16 * b + j, q]
        assert scales[b, (q // 8) * 16 + j] == qw.scales[16 * b + j, q // 8]


@pytest.mark.parametrize("version", FORMAT_VERSIONS)
def test_plan_picks_the_path_by_m_at_run_time_under_compile(version: int) -> None:
    paths = native.available_paths(torch.bfloat16)
    small, large = ("bf16dp", "amx") if "amx" in paths else ("i16", "dequant")
    qw = quantized(heavy_tailed(64, 256, seed=2), version, 64)
    kernel = NativeCpuKernel(layer_spec(qw, torch.bfloat16), plan=native.parse_plan(f"{small}:4,{large}", paths))
    tensors = kernel.prepare(qw)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: kernel.apply(tensors, a, None), dynamic=True, fullgraph=True)
    for m, path in ((24, large), (2, small), (80, large)):
        reset_dispatch_counts()
        x = torch.randn(m, 256).bfloat16()
        y = compiled(x)
        assert dict(dispatch_counts()) == {f"native-int4-cpu:{path}": 1}, m
        assert _rel(y, x.double() @ qw.dequantize(torch.float64).T) < 6e-3


def test_plan_text_round_trips_and_bad_plans_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = native.parse_plan("bf16dp:2,amx:96,dequant", native.PATHS)
    assert plan == [2, 1, 96, 2, 1 << 30, 3] and native.plan_text(plan) == "bf16dp:2,amx:96,dequant"
    with pytest.raises(ValueError, match="unknown path 'avx9'"):
        native.parse_plan("avx9", native.PATHS)
    with pytest.raises(ValueError, match="every path but the last needs ':m_max'"):
        native.parse_plan("fma,dequant", native.PATHS)
    with pytest.raises(ValueError, match="path 'amx' is not available on this CPU"):
        native.parse_plan("amx", ("fma", "dequant"))
    assert native.parse_plan("i16:16,fma", native.PATHS) == [16, 4, 1 << 30, 0]
    monkeypatch.setenv(native.ENV_PLAN, "fma")
    assert native.default_plan(torch.bfloat16, native.PATHS) == [1 << 30, 0]


def test_default_plan_per_isa(monkeypatch: pytest.MonkeyPatch) -> None:
    # A function of the paths the CPU has, not of this machine: every ISA's plan is checked everywhere.
    monkeypatch.delenv(native.ENV_PLAN, raising=False)
    avx2 = ("fma", "dequant", "i16", "i8")
    avx512 = (*avx2, "bf16dp", "vnni")  # AVX512-BF16 and VNNI, no AMX (AMD Zen 4)
    assert native.plan_text(native.default_plan(torch.bfloat16, native.PATHS)) == "vnni:6,amx:160,dequant"
    assert native.plan_text(native.default_plan(torch.bfloat16, avx512)) == "vnni:128,dequant"
    assert native.plan_text(native.default_plan(torch.float16, (*avx2, "vnni"))) == "vnni"
    # without VNNI (an AVX512 CPU that lacks it): the bf16 paths as before, i16 for fp16
    no_vnni = tuple(p for p in native.PATHS if p != "vnni")
    assert native.plan_text(native.default_plan(torch.bfloat16, no_vnni)) == "bf16dp:2,amx:160,dequant"
    assert native.plan_text(native.default_plan(torch.bfloat16, (*avx2, "bf16dp"))) == "bf16dp:128,dequant"
    assert native.plan_text(native.default_plan(torch.float16, ("fma", "dequant", "i16"))) == "i16"
    for dtype in (torch.bfloat16, torch.float16):  # an AVX2-only CPU has i8 too: never planned
        assert native.plan_text(native.default_plan(dtype, avx2)) == "i16"
    # 8-bit codes: with AMX vnni to 8 rows (i16 to 6), then amx; else the integer path, then oneDNN's GEMM on W'
    # where the CPU has native bf16; for every M on AVX2
    assert native.plan_text(native.default_plan(torch.bfloat16, native.PATHS, bits=8)) == "vnni:8,amx:160,dequant"
    assert native.plan_text(native.default_plan(torch.bfloat16, avx512, bits=8)) == "vnni:96,dequant"
    assert native.plan_text(native.default_plan(torch.bfloat16, no_vnni, bits=8)) == "i16:6,amx:160,dequant"
    assert native.plan_text(native.default_plan(torch.bfloat16, (*avx2, "bf16dp"), bits=8)) == "i16:96,dequant"
    assert native.plan_text(native.default_plan(torch.bfloat16, avx2, bits=8)) == "i16"
    # EASYQUANT_CPU_PLAN is for the 4-bit layers; it reaches 8-bit ones only where every path it names takes them
    monkeypatch.setenv(native.ENV_PLAN, "i8")
    assert native.plan_text(native.default_plan(torch.bfloat16, avx2, bits=8)) == "i16"
    monkeypatch.setenv(native.ENV_PLAN, "i16:4,dequant")
    assert native.plan_text(native.default_plan(torch.bfloat16, native.PATHS, bits=8)) == "i16:4,dequant"


def test_op_names_a_path_the_cpu_lacks_and_bad_tensors() -> None:
    qw = quantize_weight(heavy_tailed(32, 64, seed=3), QuantSpec.for_version(1, group_size=32))
    kernel = NativeCpuKernel(LayerSpec(32, 64, 4, 32, torch.float16, "cpu"), plan=[1 << 30, 1])  # bf16dp for fp16
    t = kernel.prepare(qw)
    with pytest.raises(RuntimeError, match="path 1 is not available on this CPU for Half"):
        kernel.apply(t, torch.randn(1, 64).half(), None)
    kernel.plan = [1 << 30, 0]
    with pytest.raises(RuntimeError, match="w_q must be contiguous int32 with N\\*K/8 = 256 words \\(4-bit codes\\)"):
        kernel.apply({**t, "w_q": t["w_q"].long()}, torch.randn(1, 64).half(), None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_self_check_takes_the_opt_in_i8_plan(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    # EASYQUANT_CPU_PLAN=i8 must serve: its x rounding is held to the i8 bound, not fp16's tighter one (in bf16
    # the two bounds agree; fp16 is the case that needs the floor).
    from easyquant_vllm.kernels import select

    if "i8" not in native.available_paths(dtype):
        pytest.skip(f"path i8 needs {NEEDS['i8']}")
    spec = LayerSpec(64, 256, 4, 64, dtype, "cpu", zero_points=True, column_scale=True)
    monkeypatch.delenv(native.ENV_PLAN, raising=False)
    assert NativeCpuKernel(spec).check_tolerance_floor == 0.0
    monkeypatch.setenv(native.ENV_PLAN, "i8")
    monkeypatch.setattr(select, "_checked", {})
    assert NativeCpuKernel(spec).check_tolerance_floor == native.I8_CHECK_TOLERANCE
    assert select.self_check(NativeCpuKernel, spec, torch.device("cpu")) is None


def test_build_failure_falls_back_to_the_next_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from easyquant_vllm.kernels import select

    monkeypatch.setattr(select, "_checked", {})
    monkeypatch.setattr(native, "build_problem", lambda: "building eq_cpu.cpp failed (no C++ compiler)")
    spec = LayerSpec(64, 256, 4, 64, torch.bfloat16, "cpu")
    kernel, reasons = choose_kernel(spec)
    assert kernel is not NativeCpuKernel
    assert any("native-int4-cpu: building eq_cpu.cpp failed (no C++ compiler)" in r for r in reasons)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_path_over_several_row_tiles(dtype: torch.dtype) -> None:
    # dequant writes W' a 4 MB tile of rows at a time: at K = 8960 a tile is 224 rows, so N = 288 is one whole tile
    # and a partial one (rows 224..287, their outliers, their slice of the bias and of y).
    n, k = 288, 8960
    qw = quantized(heavy_tailed(n, k, seed=5), 3, 32)
    assert int(qw.outliers.indptr[224]) < qw.outliers.nnz  # the second tile has outliers too
    kernel = _kernel(qw, dtype, "dequant")
    tensors = kernel.prepare(qw)
    ref_w = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(3)
    for m, with_bias in ((3, True), (20, False)):
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
        y = kernel.apply(tensors, x, bias)
        ref = x.double() @ ref_w.T + (bias.double() if bias is not None else 0)
        for cols in (slice(0, 224), slice(224, n)):
            assert _rel(y[:, cols], ref[:, cols]) < _bound("dequant", dtype), (m, cols)
