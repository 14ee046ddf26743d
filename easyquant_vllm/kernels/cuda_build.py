"""Where the CUDA sources live and how they are compiled: one definition for run time and tests.

CuPy compiles ``cuda/*.cu`` with NVRTC at run time. Tests call the same :func:`nvrtc_compile` on a
machine without a GPU: CuPy's high-level ``RawModule`` needs a device, but the low-level
``cupy.cuda.nvrtc`` binding does not, given the CUDA headers of the ``nvidia-cuda-runtime`` wheel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
"""The kernel sources (a source checkout or editable install; see docs/kernels.md)."""

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
"""Architectures every kernel must compile for (Ampere, Ada, Hopper)."""

GEMV_BATCH_TILES = (1, 2, 4, 8, 16)
"""The batch sizes kM the GEMV is instantiated for (cuda/eq_gemv.cu); a launch takes the smallest >= M."""

GEMV_ROWS_PER_WARP = 2
"""= kRowsPerWarp in cuda/eq_gemv.cu: output rows one warp owns (a test reads the source to check)."""

MMA_BATCH_TILES = (1, 2, 4, 8)
"""Batch tiles of 8 rows the tensor-core kernel (cuda/eq_mma.cu) is instantiated for: M <= 8, 16, 32, 64."""

MMA_WARPS = 8
"""= kMmaWarps in cuda/eq_mma.cu: warps per block, all on one 16-row tile, splitting K."""

FORMAT_VARIANTS = ("", "_v2")
"""Entry-point suffixes: format version 1, and version 2 (zero points and a column scale; docs/format.md)."""

KERNEL_NAMES = {
    "eq_gemv.cu": tuple(
        f"eq_gemv_int4_{t}_m{m}{v}" for t in ("f16", "bf16") for m in GEMV_BATCH_TILES for v in FORMAT_VARIANTS
    ),
    "eq_dequant.cu": tuple(f"eq_dequant_int4_{t}{v}" for t in ("f16", "bf16") for v in FORMAT_VARIANTS),
    "eq_mma.cu": (
        *(f"eq_mma_int4_{t}_t{j}{v}" for t in ("f16", "bf16") for j in MMA_BATCH_TILES for v in FORMAT_VARIANTS),
        *(f"eq_dequant_mma_int4_{t}{v}" for t in ("f16", "bf16") for v in FORMAT_VARIANTS),
    ),
}


def cuda_include_dir() -> Path:
    """The CUDA headers NVRTC needs (cuda_fp16.h, ...).

    First the ``nvidia-cuda-runtime`` wheel's (what scripts/setup.sh pins), else a CUDA toolkit's
    (``$CUDA_PATH``, ``$CUDA_HOME``, ``/usr/local/cuda``). Raises ImportError naming both when neither exists.
    """
    candidates = []
    try:
        import nvidia.cu13  # the wheel's namespace package

        candidates += [Path(p) / "include" for p in nvidia.cu13.__path__]
    except ImportError:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for path in candidates:
        if (path / "cuda_fp16.h").is_file():
            return path
    raise ImportError("no CUDA headers (cuda_fp16.h) found: pip install nvidia-cuda-runtime==13.0.96, "
                      "or set CUDA_PATH to a CUDA 13 toolkit")  # fmt: skip


CUPY_APPENDED_OPTIONS = ("-ftz=true",)
"""What ``cupy.RawModule`` appends to the options it is given before calling NVRTC (cupy 14,
``cupy/cuda/compiler.py``: ``options += ('-ftz=true',)``; a test watches for changes). Our compile checks
add the same, so that they see exactly the code that runs."""


def nvrtc_base_options() -> list[str]:
    """The options the run time hands to ``cupy.RawModule``; CuPy adds :data:`CUPY_APPENDED_OPTIONS` and
    the device's ``-arch``."""
    return ["-std=c++17", f"-I{CUDA_DIR}", f"-I{cuda_include_dir()}"]


def nvrtc_options(arch: str) -> list[str]:
    """What NVRTC receives at run time on ``arch`` (e.g. ``"sm_90"``), plus ptxas statistics for the log."""
    return [*nvrtc_base_options(), *CUPY_APPENDED_OPTIONS, f"-arch={arch}", "-Xptxas=-v"]


@dataclass(frozen=True)
class NvrtcResult:
    cubin: bytes
    log: str  # NVRTC + ptxas messages (registers, spills per kernel)


def nvrtc_compile(source: str, arch: str) -> NvrtcResult:
    """Compile ``cuda/<source>`` with NVRTC for ``arch``; raises RuntimeError with the log on failure."""
    from cupy.cuda import nvrtc

    code = (CUDA_DIR / source).read_text()
    prog = nvrtc.createProgram(code, source, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, nvrtc_options(arch))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed on {source} for {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        return NvrtcResult(nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)
