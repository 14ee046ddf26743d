"""The CUDA kernels without a GPU: nvcc/ptxas compile checks, and the same source executed on CPU
threads (cuda/cuda_host.h) against the PyTorch reference, also under ThreadSanitizer."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import sass
from bench.nvrtc import ARCHS, KERNEL_NAMES
from easyquant_vllm.kernels.cuda_build import (
    CUDA_DIR,
    FORMAT_VARIANTS,
    GEMV_BATCH_TILES,
    GEMV_ROWS_PER_WARP,
    MMA_BATCH_TILES,
    MMA_WARPS,
)
from easyquant_vllm.kernels.cuda_int4 import split_col_scale, v2_tensors, v3_tensors
from easyquant_vllm.kernels.mma_layout import to_mma_layout
from easyquant_vllm.quant import QuantSpec, quantize_group, quantize_weight
from easyquant_vllm.quant.quantize import dequantize_dense
from tests.conftest import heavy_tailed
from tests.cuda_emulation import force_v3_edges

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "cuda" / "gemv_driver.cpp"
KERNELS = {source: sorted(names) for source, names in KERNEL_NAMES.items()}
# Registers per thread. The kernels that should run at HBM speed stay at <= 80 (GEMV tiles <= 4: 58-80,
# tensor-core tiles of 8 and 16 rows: 40-62, dequantize: 32), so enough warps per SM keep the weight
# loads in flight. GEMV tiles 8 and 16 (16 and 32 fp32 accumulators, 102-137) and the tensor-core
# tiles of 32 and 64 rows (32 and 64 accumulators, 80-96 and 138) are at most partly issue-bound by the
# SASS model (docs/kernels.md): <= 168.
# Format version 2 (*_v2) holds a bias per row and 8 column scales besides: its small tiles measured
# 56-102 registers (the GEMV's kM = 4 tile on sm_80; the tensor-core tiles stay at 56-72), so they get 104;
# format version 3 (*_v3) holds the rows' units and the group's steps as well, within the same 104.
# The MoE kernels (eq_moe.cu) run the same cores per expert tile: their tensor-core tiles meet the same budgets; their
# GEMV tiles up to 4 rows measured 56-94 registers on sm_86/89/90 and up to 128 on sm_80 (v2, 4 rows: the expert and
# tile offsets stay live across the loop). That path only serves layers without the tensor-core layout.
REGISTER_BUDGET = 168
SMALL_TILE_REGISTER_BUDGET = 80
SMALL_TILE_REGISTER_BUDGET_V2 = 104
MOE_GEMV_SMALL_TILE_REGISTER_BUDGET = 128


def _tile(name: str) -> str:
    """An entry point's name without its format suffix (``_v2``, ``_v3``): what its tile is."""
    return re.sub(r"_v\d$", "", name)


def _build(out: Path, *flags: str) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("g++ not available")
    cmd = ["g++", "-std=c++20", "-pthread", "-Wall", "-Wno-unknown-pragmas", *flags, "-o", str(out), str(DRIVER)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("emu") / "gemv_driver", "-O2")


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def run_emulated(driver: Path, tmp: Path, x: torch.Tensor, qw, threads: int = 128, mode: str = "run") -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Run a kernel on the host: ``mode="run"`` the GEMV for ``x [M, K]`` (fp16/bf16) -> y [M, N];
    ``"dequant"`` W' -> [N, K] in x's dtype; ``"mma"`` / ``"dequant_mma"`` the same from cuda/eq_mma.cu
    with the weights repacked to the MMA layout. Results come back as float32."""
    m, k = x.shape
    n = qw.shape[0]
    g = k if qw.group_size == -1 else qw.group_size
    o = qw.outliers
    version = qw.format_version
    header = np.array([m, n, k, g, o.nnz, 0 if x.dtype == torch.float16 else 1, threads, version], dtype=np.int32)
    words = to_mma_layout(qw.qweight).reshape(-1) if mode in ("mma", "dequant_mma") else qw.qweight
    scales = qw.scales
    if version == 3:  # the kernel layout of CudaInt4Kernel.prepare: row units, (a, zq) pairs, c (ones if none)
        scales, zeros, col_scale = v3_tensors(qw)
    elif version == 2:  # as the linear method hands them over: both, the missing one neutral (v2_tensors)
        zeros, col_scale = v2_tensors(qw.zeros, qw.col_scale, n, k, g)
    parts = [header, _bits(x), words.numpy().astype(np.int32), _bits(scales),
             o.indptr.numpy().astype(np.int32), o.indices.numpy().astype(np.int32), _bits(o.values)]  # fmt: skip
    if version > 1:
        if mode in ("mma", "dequant_mma") and x.dtype == torch.bfloat16:
            col_scale = split_col_scale(col_scale)  # as CudaInt4Kernel.prepare hands it to the tensor cores
        parts += [zeros.numpy(), _bits(col_scale)]
    (tmp / "in.bin").write_bytes(b"".join(p.tobytes() for p in parts))
    r = subprocess.run([str(driver), mode, str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shape = (m, n) if mode in ("run", "mma") else (n, k)
    return torch.from_numpy(np.fromfile(tmp / "out.bin", dtype=np.float32).reshape(shape))


def _reference(x: torch.Tensor, qw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return x.double() @ qw.dequantize(torch.float64).T


# (M, N, K, group_size, dtype, outliers): N odd (a warp's second row idle) and not a multiple of the
# 8 rows per block, K below one warp-iteration (96 = 3 chunks) and above it (2048 = 2 iterations),
# per channel, 0 outliers, a dense outlier pattern (threshold 1 sigma, cap 20 %: hundreds in some
# rows), and every batch tile kM = 1, 2, 4, 8, 16, full (M = kM) and masked (M < kM).
CASES = [
    (1, 37, 96, 32, torch.float16, "3sigma"),
    (8, 64, 2048, 128, torch.bfloat16, "3sigma"),
    (3, 50, 256, -1, torch.float16, "3sigma"),
    (5, 33, 512, 64, torch.bfloat16, "3sigma"),
    (2, 16, 128, 32, torch.float16, "none"),
    (4, 24, 1024, 64, torch.float16, "many"),
    (7, 40, 384, 128, torch.bfloat16, "many"),
    (16, 29, 256, 64, torch.float16, "3sigma"),
    (11, 45, 160, 32, torch.bfloat16, "many"),
    (1, 9, 64, -1, torch.bfloat16, "3sigma"),
]


def _quantize(w: torch.Tensor, spec: QuantSpec, v2: str):  # type: ignore[no-untyped-def]
    """``v2``: "" (format version 1), "zc" (zero points and column scale, the default), "z" or "c" (one); "v3c" and
    "v3" format version 3 with and without a column scale, with its edge cases forced in (force_v3_edges)."""
    if v2.startswith("v3"):
        spec = replace(spec, zero_points=True, compact_steps=True, normalize="sinkhorn" if v2 == "v3c" else "none")
        return force_v3_edges(quantize_group([w], spec)[0])
    spec = replace(spec, zero_points="z" in v2, normalize="sinkhorn" if "c" in v2 else "none")
    return quantize_group([w], spec)[0]


def _check_product(driver: Path, tmp: Path, m, n, k, group_size, dtype, outliers, mode: str, v2: str = "") -> None:  # type: ignore[no-untyped-def]
    spec = {"3sigma": {}, "none": {"outlier_threshold": 0.0},
            "many": {"outlier_threshold": 1.0, "max_outlier_fraction": 0.2}}[outliers]  # fmt: skip
    w = heavy_tailed(n, k, seed=m * 1000 + n)
    w[n // 2] = 0.0  # a row with no outliers at all (and all-zero steps)
    qw = _quantize(w, QuantSpec.for_version(1, group_size=group_size, **spec), v2)
    counts = qw.outliers.indptr[1:] - qw.outliers.indptr[:-1]
    assert int(counts[n // 2]) == 0
    if outliers == "many":
        assert int(counts.max()) > 64  # more than two passes of a warp over one row's outliers
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    y = run_emulated(driver, tmp, x, qw, mode=mode).double()
    ref = _reference(x, qw)
    scale = ref.abs().mean()
    # The kernels accumulate in fp32 and round y to the activation dtype once. Against the exact
    # reference rounded the same way: Marlin's criterion, mean |error| / mean |reference| < 1e-3.
    # Against the unrounded reference, the final rounding itself counts: fp16 stays under 1e-3; bf16's
    # 8-bit mantissa alone costs ~1.3e-3 on average (measured), so it gets 4e-3. The tensor-core kernel
    # with a column scale rounds x * c to bf16 for the mma (cuda/eq_mma.cu): one more bf16 rounding.
    bf16_rounds_twice = mode == "mma" and "c" in v2 and dtype == torch.bfloat16
    assert float((y - ref.to(dtype).double()).abs().mean() / scale) < (4e-3 if bf16_rounds_twice else 1e-3)
    assert float((y - ref).abs().mean() / scale) < (1e-3 if dtype == torch.float16 else 4e-3)


@pytest.mark.parametrize(("m", "n", "k", "group_size", "dtype", "outliers"), CASES)
def test_gemv_emulated_matches_reference(driver: Path, tmp_path: Path, m, n, k, group_size, dtype, outliers) -> None:  # type: ignore[no-untyped-def]
    _check_product(driver, tmp_path, m, n, k, group_size, dtype, outliers, "run")


# Format version 2 (zero points and column scale; or only one of them, the other neutral): the *_v2 entry
# points over the same shapes' corner cases (idle second row, per channel, masked tiles, many outliers).
V2_CASES = [
    (1, 37, 96, 32, torch.float16, "3sigma", "zc"),
    (8, 64, 2048, 128, torch.bfloat16, "3sigma", "zc"),
    (3, 50, 256, -1, torch.float16, "3sigma", "zc"),
    (11, 45, 160, 32, torch.bfloat16, "many", "zc"),
    (4, 24, 1024, 64, torch.float16, "many", "z"),
    (5, 33, 512, 64, torch.bfloat16, "none", "c"),
]


@pytest.mark.parametrize(("m", "n", "k", "group_size", "dtype", "outliers", "v2"), V2_CASES)
def test_gemv_v2_emulated_matches_reference(driver: Path, tmp_path: Path, m, n, k, group_size, dtype, outliers,  # type: ignore[no-untyped-def]
                                            v2) -> None:  # fmt: skip
    _check_product(driver, tmp_path, m, n, k, group_size, dtype, outliers, "run", v2)


# Format version 3 (compact steps, fractional zeros; with "v3c" and without "v3" a column scale), the *_v3 entry
# points, with zq = 0 and 255, a = 0 and 255 forced in (force_v3_edges): every GEMV tile full (M = 1, 2, 4, 8, 16) and
# masked (3, 7, 11), groups 32, 64, 128 and per channel, outliers none, 3 sigma and hundreds per row (residuals in
# version 3: the dense part is not 0 under them), fp16 and bf16.
V3_CASES = [
    (1, 37, 96, 32, torch.float16, "3sigma", "v3c"),
    (2, 50, 256, -1, torch.bfloat16, "many", "v3c"),
    (3, 45, 160, 32, torch.bfloat16, "many", "v3"),
    (4, 24, 1024, 64, torch.float16, "3sigma", "v3c"),
    (7, 40, 384, 128, torch.float16, "none", "v3"),
    (8, 64, 2048, 128, torch.bfloat16, "3sigma", "v3c"),
    (11, 33, 512, 64, torch.bfloat16, "3sigma", "v3c"),
    (16, 29, 256, 64, torch.float16, "many", "v3c"),
]


@pytest.mark.parametrize(("m", "n", "k", "group_size", "dtype", "outliers", "v3"), V3_CASES)
def test_gemv_v3_emulated_matches_reference(driver: Path, tmp_path: Path, m, n, k, group_size, dtype, outliers,  # type: ignore[no-untyped-def]
                                            v3) -> None:  # fmt: skip
    _check_product(driver, tmp_path, m, n, k, group_size, dtype, outliers, "run", v3)


# The tensor-core kernel (N % 16 == 0, K % 64 == 0): K of one k-block (only warp 0 of 8 has work), of
# 9 k-blocks (warps with 1 and 2 blocks), 16 blocks; groups of 32 (two scalings per k-block), 64, 128
# (a group across two warps' blocks) and per channel; every batch tile (8, 16, 32, 64 rows) full and
# masked; rows with 0 and with hundreds of outliers.
MMA_CASES = [
    (1, 32, 64, 32, torch.float16, "3sigma"),
    (8, 48, 576, 64, torch.bfloat16, "3sigma"),
    (3, 16, 576, -1, torch.float16, "many"),
    (16, 32, 1024, 128, torch.bfloat16, "3sigma"),
    (11, 64, 256, 32, torch.float16, "many"),
    (5, 16, 128, 64, torch.bfloat16, "none"),
    (24, 32, 256, 64, torch.float16, "3sigma"),
    (33, 48, 256, 32, torch.bfloat16, "many"),
    (64, 16, 512, 128, torch.float16, "3sigma"),
]


@pytest.mark.parametrize(("m", "n", "k", "group_size", "dtype", "outliers"), MMA_CASES)
def test_mma_emulated_matches_reference(driver: Path, tmp_path: Path, m, n, k, group_size, dtype, outliers) -> None:  # type: ignore[no-untyped-def]
    _check_product(driver, tmp_path, m, n, k, group_size, dtype, outliers, "mma")


MMA_V2_CASES = [
    (1, 32, 64, 32, torch.float16, "3sigma", "zc"),
    (8, 48, 576, 64, torch.bfloat16, "3sigma", "zc"),
    (3, 16, 576, -1, torch.float16, "many", "zc"),
    (16, 32, 1024, 128, torch.bfloat16, "3sigma", "zc"),
    (11, 64, 256, 32, torch.float16, "many", "zc"),
    (33, 48, 256, 32, torch.bfloat16, "many", "z"),
    (64, 16, 512, 128, torch.float16, "3sigma", "c"),
]


@pytest.mark.parametrize(("m", "n", "k", "group_size", "dtype", "outliers", "v2"), MMA_V2_CASES)
def test_mma_v2_emulated_matches_reference(driver: Path, tmp_path: Path, m, n, k, group_size, dtype, outliers,  # type: ignore[no-untyped-def]
                                           v2) -> None:  # fmt: skip
    _check_product(driver, tmp_path, m, n, k, group_size, dtype, outliers, "mma", v2)


# Version 3 on tensor cores: every batch tile full (8, 16, 32, 64 rows) and masked (1, 3, 11, 24, 33, 40), groups
# 32 (two scalings per k-block), 64, 128 and per channel, K of one and of 9 k-blocks.
MMA_V3_CASES = [
    (1, 32, 64, 32, torch.float16, "3sigma", "v3c"),
    (3, 16, 576, -1, torch.float16, "many", "v3c"),
    (8, 48, 576, 64, torch.bfloat16, "3sigma", "v3c"),
    (11, 64, 256, 32, torch.bfloat16, "many", "v3c"),
    (16, 32, 1024, 128, torch.bfloat16, "3sigma", "v3"),
    (24, 32, 256, 64, torch.bfloat16, "3sigma", "v3c"),
    (32, 16, 128, 64, torch.float16, "none", "v3"),
    (33, 48, 256, 32, torch.bfloat16, "many", "v3c"),
    (40, 32, 512, -1, torch.bfloat16, "many", "v3c"),
    (64, 16, 512, 128, torch.float16, "3sigma", "v3c"),
]


@pytest.mark.parametrize(("m", "n", "k", "group_size", "dtype", "outliers", "v3"), MMA_V3_CASES)
def test_mma_v3_emulated_matches_reference(driver: Path, tmp_path: Path, m, n, k, group_size, dtype, outliers,  # type: ignore[no-untyped-def]
                                           v3) -> None:  # fmt: skip
    _check_product(driver, tmp_path, m, n, k, group_size, dtype, outliers, "mma", v3)


DEQUANT_CASES = [
    (37, 96, 32, torch.float16, ""),
    (24, 1024, -1, torch.bfloat16, ""),
    (40, 384, 128, torch.float16, ""),
    (37, 96, 32, torch.bfloat16, "zc"),
    (24, 1024, -1, torch.float16, "zc"),
    (40, 384, 128, torch.float16, "z"),
    (16, 256, 64, torch.bfloat16, "c"),
    (37, 96, 32, torch.float16, "v3c"),
    (24, 1024, -1, torch.bfloat16, "v3c"),
    (40, 384, 128, torch.bfloat16, "v3"),
    (16, 256, 64, torch.float16, "v3"),
]
DEQUANT_MMA_CASES = [
    (32, 64, 32, torch.float16, ""),
    (48, 576, -1, torch.bfloat16, ""),
    (16, 1024, 128, torch.float16, ""),
    (32, 64, 32, torch.bfloat16, "zc"),
    (48, 576, -1, torch.float16, "zc"),
    (16, 1024, 128, torch.bfloat16, "z"),
    (32, 256, 64, torch.float16, "c"),
    (32, 64, 32, torch.bfloat16, "v3c"),
    (48, 576, -1, torch.float16, "v3c"),
    (16, 1024, 128, torch.float16, "v3"),
    (32, 256, 64, torch.bfloat16, "v3"),
]


@pytest.mark.parametrize(("n", "k", "group_size", "dtype", "v2"), DEQUANT_CASES)
def test_dequant_emulated_is_bit_identical_to_reference(driver: Path, tmp_path: Path, n, k, group_size, dtype,  # type: ignore[no-untyped-def]
                                                        v2) -> None:  # fmt: skip
    _check_dequant(driver, tmp_path, n, k, group_size, dtype, "dequant", v2)


@pytest.mark.parametrize(("n", "k", "group_size", "dtype", "v2"), DEQUANT_MMA_CASES)
def test_dequant_mma_emulated_is_bit_identical_to_reference(
    driver: Path, tmp_path: Path, n, k, group_size, dtype, v2
) -> None:  # type: ignore[no-untyped-def]
    _check_dequant(driver, tmp_path, n, k, group_size, dtype, "dequant_mma", v2)


def _check_dequant(driver: Path, tmp: Path, n: int, k: int, group_size: int, dtype: torch.dtype, mode: str,
                   v2: str = "") -> None:  # fmt: skip
    w = heavy_tailed(n, k, seed=n)
    w[1] = 0.0
    qw = _quantize(
        w, QuantSpec.for_version(1, group_size=group_size, outlier_threshold=2.0, max_outlier_fraction=0.05), v2
    )
    if v2.startswith("v3"):  # the outliers are residuals: the kernels add them to a dense part that is not 0
        dense = dequantize_dense(qw.qweight, qw.scales, 4, group_size, qw.zeros, qw.col_scale, qw.row_steps)
        rows = torch.repeat_interleave(torch.arange(n), qw.outliers.indptr.diff().long())
        assert bool((dense[rows, qw.outliers.indices.long()] != 0).any())
    x = torch.zeros(1, k, dtype=dtype)  # unused by the dequant kernels; carries the dtype
    w_kernel = run_emulated(driver, tmp, x, qw, mode=mode)
    assert torch.equal(w_kernel, qw.dequantize(dtype).float())  # one rounding of s*q (+ outlier): exact


def test_magic_number_dequant_is_exact_for_all_codes(driver: Path) -> None:
    out = subprocess.run([str(driver), "magic"], capture_output=True, text=True, check=True).stdout.split("\n")
    for u in range(16):
        assert [float(v) for v in out[u].split()] == [u - 8.0] * 8


def test_v3_code_conversions_are_exact_for_all_codes_and_zeros(driver: Path) -> None:
    # Format version 3's fractional zero: q = u - zq / 16 from the magic 64 + u (fp16, ulp 1/16) minus the bias
    # 64 + zq / 16, and on bf16 tensor cores (u - 8) - (z - 8); the bias built from the group's a | zq << 8 by byte
    # permutes and a funnel shift (cuda/eq_int4.cuh). Every nibble position, code and zero: exact.
    out = subprocess.run([str(driver), "magic_v3"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 16 * 256
    for i, line in enumerate(out):
        u, zq = divmod(i, 256)
        assert [float(v) for v in line.split()] == [u - zq / 16] * 24, (u, zq, line)


def test_emulated_mma_follows_the_ptx_fragment_layout(driver: Path) -> None:
    # The host mma.sync of cuda/eq_mma.cu against a plain product, with fragments placed by the PTX ISA's
    # "Matrix Fragments for mma.m16n8k16" formulas (written out separately in the driver).
    out = subprocess.run([str(driver), "mma_unit"], capture_output=True, text=True, check=True).stdout.split()
    a = torch.tensor([[i - c // 4 for c in range(16)] for i in range(16)], dtype=torch.float64)
    b = torch.tensor([[(c * j) % 5 - 2 for j in range(8)] for c in range(16)], dtype=torch.float64)
    assert torch.equal(torch.tensor([float(v) for v in out], dtype=torch.float64).view(16, 8), a @ b)


def test_kernels_emulated_have_no_data_races(tmp_path: Path) -> None:
    tsan = _build(tmp_path / "gemv_tsan", "-O1", "-g", "-fsanitize=thread")
    for n, mode in ((12, "run"), (32, "mma")):  # the mma kernel: shared-memory reduction across 8 warps
        qw = quantize_weight(heavy_tailed(n, 256, seed=5), QuantSpec.for_version(1, group_size=64))
        x = torch.randn(3, 256).half()
        y = run_emulated(tsan, tmp_path, x, qw, threads=64, mode=mode)
        assert float((y.double() - _reference(x, qw)).abs().mean() / _reference(x, qw).abs().mean()) < 1e-3
    # run_emulated asserts exit status 0; TSan exits 66 on a report (halt_on_error is not needed)


class _Nvcc:
    """``nvcc -cubin -Xptxas -v`` once per (source, architecture) for the whole module: the compile checks and the
    SASS checks read the same cubin (eq_moe.cu alone takes ~20 s per architecture)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.done: dict[tuple[str, str], tuple[str, Path]] = {}

    def compile(self, source: str, arch: str) -> tuple[str, Path]:
        """The ptxas log (registers, spills) and the cubin."""
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc not available")
        if (source, arch) not in self.done:
            cubin = self.workdir / f"{Path(source).stem}.{arch}.cubin"
            cmd = ["nvcc", f"-arch={arch}", "-std=c++17", "-cubin", "-Xptxas", "-v", "-o", str(cubin),
                   str(CUDA_DIR / source)]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            self.done[source, arch] = (r.stdout + r.stderr, cubin)
        return self.done[source, arch]

    def sass(self, source: str, arch: str) -> str:
        """The cubin's SASS (nvdisasm; see bench/sass.py for why nvcc's cubin rather than NVRTC's)."""
        nvdisasm = sass.nvdisasm_path()
        if nvdisasm is None:
            pytest.skip("needs nvdisasm (pip install nvidia-cuda-nvdisasm)")
        cubin = self.compile(source, arch)[1]
        return subprocess.run([str(nvdisasm), str(cubin)], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def nvcc(tmp_path_factory: pytest.TempPathFactory) -> _Nvcc:
    return _Nvcc(tmp_path_factory.mktemp("nvcc"))


@pytest.mark.parametrize("source", sorted(KERNELS))
@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_without_spills(arch: str, source: str, nvcc: _Nvcc) -> None:
    log = nvcc.compile(source, arch)[0]
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    assert sorted(kernels) == KERNELS[source]
    stats = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert stats == [("0", "0", "0")] * len(kernels)  # no local memory, no spills
    registers = dict(zip(re.findall(r"Compiling entry function '(\w+)'", log),
                         (int(v) for v in re.findall(r"Used (\d+) registers", log)), strict=True))  # fmt: skip
    assert max(registers.values()) <= REGISTER_BUDGET, registers
    small = {name: r for name, r in registers.items() if not _tile(name).endswith(("_m8", "_m16", "_t4", "_t8"))}
    moe_gemv = {name: small.pop(name) for name in list(small) if name.startswith("eq_moe_gemv_")}
    assert max(r for name, r in small.items() if _tile(name) == name) <= SMALL_TILE_REGISTER_BUDGET, small
    assert max(small.values()) <= SMALL_TILE_REGISTER_BUDGET_V2, small
    assert max(moe_gemv.values(), default=0) <= MOE_GEMV_SMALL_TILE_REGISTER_BUDGET, moe_gemv


def _nvrtc():  # type: ignore[no-untyped-def]
    pytest.importorskip("cupy", reason="cupy-cuda13x not installed (scripts/setup.sh installs it)")
    pytest.importorskip("nvidia.cu13", reason="nvidia-cuda-runtime headers not installed")
    from bench import nvrtc

    return nvrtc


# NVRTC runs the same ptxas as nvcc (whose test above covers all four architectures); what this adds is that the
# run-time options and headers compile, which the oldest and the newest architecture show. Two more cost CI a minute.
@pytest.mark.parametrize("source", sorted(KERNELS))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvrtc_as_at_run_time(arch: str, source: str) -> None:
    result = _nvrtc().nvrtc_compile(source, arch)
    assert result.cubin[:4] == b"\x7fELF"
    stats = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", result.log)
    assert stats == [("0", "0", "0")] * len(KERNELS[source])


def test_compile_checks_use_the_options_cupy_adds_at_run_time() -> None:
    # At run time cupy.RawModule appends options of its own before NVRTC sees ours. Read them off CuPy's
    # source (no GPU needed): the unconditional ``options += (...)`` lines of the function that compiles.
    import ast
    import inspect

    _nvrtc()
    from cupy.cuda import compiler

    from bench.nvrtc import CUPY_APPENDED_OPTIONS, nvrtc_options

    fn = ast.parse(inspect.getsource(compiler._compile_with_cache_cuda)).body[0]
    appended = [opt.value for node in fn.body if isinstance(node, ast.AugAssign) and getattr(node.target, "id", "")
                == "options" for opt in node.value.elts]  # fmt: skip
    assert tuple(appended) == CUPY_APPENDED_OPTIONS == ("-ftz=true",)
    assert set(CUPY_APPENDED_OPTIONS) <= set(nvrtc_options("sm_90"))


@pytest.mark.parametrize("source", sorted(KERNELS))
def test_weight_loads_are_128_bit_and_no_local_memory(source: str, nvcc: _Nvcc) -> None:
    for arch in ("sm_80", "sm_90"):
        text = nvcc.sass(source, arch)
        assert re.search(r"\bLDG\.E\.128\b", text), f"{source} {arch}: the weight chunks are not loaded 128 bits wide"
        assert not re.search(r"\b(LDL|STL)\b", text), f"{source} {arch}: uses local memory"
        if source == "eq_dequant.cu":  # W' goes out 8 values per store
            assert len(re.findall(r"\bSTG\.E\.128\b", text)) >= 4 * 2, f"{arch}: W' is not stored 128 bits wide"
        if source in ("eq_mma.cu", "eq_moe.cu"):  # the products run on tensor cores, fp32 accumulation, both types
            assert re.search(r"\bHMMA\.16816\.F32\s", text) and re.search(r"\bHMMA\.16816\.F32\.BF16\b", text), arch


def test_gemv_main_loop_fits_the_h100_issue_budget_at_m1(nvcc: _Nvcc) -> None:
    # The GEMV is only worth having if at M = 1 it streams weights at HBM speed: its main loop must
    # issue fewer warp instructions per 512 weight bytes than an H100 can issue in the time HBM
    # delivers them (docs/kernels.md). 10 % headroom: measured 144 against a budget of 178.
    counts = sass.loop_counts(nvcc.sass("eq_gemv.cu", "sm_90"), "eq_gemv_int4_", GEMV_ROWS_PER_WARP)
    assert sorted(counts) == sorted(KERNEL_NAMES["eq_gemv.cu"])
    budget = sass.IssueModel().budget()
    for dtype in ("f16", "bf16"):
        assert counts[f"eq_gemv_int4_{dtype}_m1"] <= 0.9 * budget, counts
        # a tile twice as large costs more per row, but less than twice as much (loads and dequant are shared)
        tiles = [counts[f"eq_gemv_int4_{dtype}_m{m}"] for m in GEMV_BATCH_TILES]
        assert all(a < b < 2 * a for a, b in itertools.pairwise(tiles)), tiles


def test_mma_main_loop_fits_the_h100_issue_budget_up_to_m16(nvcc: _Nvcc) -> None:
    # One loop iteration streams one 512-byte k-block of a 16-row tile. The batch tiles M <= 8 and
    # M <= 16 must stay under the H100 budget, i.e. run at HBM speed (measured 118 and 149 of 178);
    # each further 8 batch rows must cost far less than another pass over the weights would.
    counts = sass.loop_counts(nvcc.sass("eq_mma.cu", "sm_90"), "eq_mma_int4_", 1)
    budget = sass.IssueModel().budget()
    for dtype in ("f16", "bf16"):
        tiles = [counts[f"eq_mma_int4_{dtype}_t{j}"] for j in MMA_BATCH_TILES]
        assert max(tiles[:2]) <= budget, tiles
        assert all(a < b < 2 * a for a, b in itertools.pairwise(tiles)), tiles
        # Format versions 2 (zero points, column scale) and 3 (compact steps, fractional zeros) still stream at HBM
        # speed for M <= 8, in both activation types (measured: v2 160 fp16, 170 bf16 with the hi/lo split of c, 211
        # before it; v3 143 fp16, 177 bf16, whose second subtraction per A register costs 16).
        assert counts[f"eq_mma_int4_{dtype}_t1_v2"] <= budget, counts
        assert counts[f"eq_mma_int4_{dtype}_t1_v3"] <= budget, counts


def test_v3_main_loops_cost_at_most_one_instruction_per_a_register_more_than_v2(nvcc: _Nvcc) -> None:
    # Format version 3's fractional zero enters the codes exactly (cuda/eq_int4.cuh): in fp16 (the GEMV's and the
    # fp16 tensor cores' conversion) at version 2's cost, on bf16 tensor cores with one more HSUB2 per A register,
    # 16 per 512 weight bytes. Its one 16-bit load of (a, zq) per group replaces version 2's step and zero loads.
    # Measured (sm_90): GEMV -33.5..-5, fp16 tensor cores -18..-11, bf16 tensor cores +4..+16.
    counts = {**sass.loop_counts(nvcc.sass("eq_mma.cu", "sm_90"), "eq_mma_int4_", 1),
              **sass.loop_counts(nvcc.sass("eq_gemv.cu", "sm_90"), "eq_gemv_int4_", GEMV_ROWS_PER_WARP)}  # fmt: skip
    v3 = {name: n for name, n in counts.items() if name.endswith("_v3")}
    assert len(v3) == 2 * (len(MMA_BATCH_TILES) + len(GEMV_BATCH_TILES))
    for name, n in v3.items():
        assert n <= counts[name.replace("_v3", "_v2")] + 16, (name, n, counts[name.replace("_v3", "_v2")])


def test_moe_main_loops_are_the_dense_kernels_loops(nvcc: _Nvcc) -> None:
    # eq_moe.cu runs the dense kernels' cores per expert tile, indexing the stacked experts from the tile's expert and
    # first row: its main loops must cost what the dense ones cost (measured: tensor cores -1..+7 instructions per
    # 512 B, GEMV -93..+47 on the 16-row tile), and the decode tiles (8 rows on tensor cores, 1 row on the GEMV)
    # at most a few instructions more; the 8-row tensor-core tile stays under the H100's issue budget.
    gemv = nvcc.sass("eq_gemv.cu", "sm_90")
    dense = {**sass.loop_counts(nvcc.sass("eq_mma.cu", "sm_90"), "eq_mma_int4_", 1),
             **sass.loop_counts(gemv, "eq_gemv_int4_", GEMV_ROWS_PER_WARP)}  # fmt: skip
    text = nvcc.sass("eq_moe.cu", "sm_90")
    moe = {**sass.loop_counts(text, "eq_moe_mma_int4_", 1),
           **sass.loop_counts(text, "eq_moe_gemv_int4_", GEMV_ROWS_PER_WARP)}  # fmt: skip
    assert len(moe) == len(dense) == 2 * len(FORMAT_VARIANTS) * (len(MMA_BATCH_TILES) + len(GEMV_BATCH_TILES))
    budget = sass.IssueModel().budget()
    for name, n in moe.items():
        ref = dense[name.replace("eq_moe_", "eq_")]
        if name.endswith("_v3"):  # v3's dense GEMV got cheaper than v2's (-6.5 at M = 1); the MoE's need not be dearer
            ref = max(ref, moe[name.replace("_v3", "_v2")])  # than its v2 tile (measured: 192 vs 189 at M = 1)
        decode = _tile(name).endswith(("_t1", "_t2", "_m1"))
        assert n <= (ref + 6 if decode else 1.1 * ref), (name, n, ref)
        if _tile(name).endswith("_t1"):
            assert n <= budget, (name, n, budget)


def test_python_constants_match_the_kernel_source() -> None:
    core = (CUDA_DIR / "eq_gemv.cuh").read_text()  # the GEMV's core, shared by eq_gemv.cu and eq_moe.cu
    assert int(re.search(r"constexpr int kRowsPerWarp = (\d+);", core).group(1)) == GEMV_ROWS_PER_WARP
    assert int(re.search(r"constexpr int kMaxM = (\d+);", core).group(1)) == GEMV_BATCH_TILES[-1]
    source = (CUDA_DIR / "eq_gemv.cu").read_text()
    for m in GEMV_BATCH_TILES:
        assert f"EQ_GEMV_ENTRY(SUFFIX, T, {m})" in source
    mma = (CUDA_DIR / "eq_mma.cuh").read_text()
    assert int(re.search(r"constexpr int kMmaWarps = (\d+);", mma).group(1)) == MMA_WARPS
    assert int(re.search(r"constexpr int kMmaMaxTiles = (\d+);", mma).group(1)) == MMA_BATCH_TILES[-1]
