"""Where the CUDA sources live and the options CuPy compiles them with (run time; the compile checks that tests
and benchmarks run are in ``bench/nvrtc.py``).

The sources (``kernels/cuda/*.cu``, ``*.cuh``, ``*.h``) are package data: they ship in the wheel and are found
next to this file wherever the package is installed. CuPy compiles them with NVRTC at the first launch, for the
device's architecture.
"""

from __future__ import annotations

import os
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
"""The kernel sources, installed with the package (docs/kernels.md)."""

GEMV_BATCH_TILES = (1, 2, 4, 8, 16)
"""The batch sizes kM the GEMV is instantiated for (cuda/eq_gemv.cu); a launch takes the smallest >= M."""

GEMV_ROWS_PER_WARP = 2
"""= kRowsPerWarp in cuda/eq_gemv.cu: output rows one warp owns (a test reads the source to check)."""

MMA_BATCH_TILES = (1, 2, 4, 8)
"""Batch tiles of 8 rows the tensor-core kernel (cuda/eq_mma.cu) is instantiated for: M <= 8, 16, 32, 64."""

MMA_WARPS = 8
"""= kMmaWarps in cuda/eq_mma.cu: warps per block, all on one 16-row tile, splitting K."""

FORMAT_VARIANTS = ("", "_v2", "_v3")
"""Entry-point suffixes of format versions 1, 2 (zero points and a column scale) and 3 (compact steps and fractional
zeros; docs/format.md), in version order."""


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


def nvrtc_base_options() -> list[str]:
    """The options the run time hands to ``cupy.RawModule``; CuPy adds ``-ftz=true`` and the device's ``-arch``."""
    return ["-std=c++17", f"-I{CUDA_DIR}", f"-I{cuda_include_dir()}"]
