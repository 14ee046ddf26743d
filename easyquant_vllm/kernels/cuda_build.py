"""Where the CUDA sources live and how they are compiled: one definition for run time and tests.

CuPy compiles ``cuda/*.cu`` with NVRTC at run time. Tests call the same :func:`nvrtc_compile` on a
machine without a GPU: CuPy's high-level ``RawModule`` needs a device, but the low-level
``cupy.cuda.nvrtc`` binding does not, given the CUDA headers of the ``nvidia-cuda-runtime`` wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
"""The kernel sources (a source checkout or editable install; see docs/kernels.md)."""

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
"""Architectures every kernel must compile for (Ampere, Ada, Hopper)."""

KERNEL_NAMES = {
    "eq_gemv.cu": ("eq_gemv_int4_f16", "eq_gemv_int4_bf16"),
    "eq_dequant.cu": ("eq_dequant_int4_f16", "eq_dequant_int4_bf16"),
}


def cuda_include_dir() -> Path:
    """The CUDA runtime headers shipped by the ``nvidia-cuda-runtime`` wheel (cuda_fp16.h, ...)."""
    import nvidia.cu13  # the wheel's namespace package

    return Path(next(iter(nvidia.cu13.__path__))) / "include"


def nvrtc_base_options() -> list[str]:
    """The options every compile of ``cuda/*.cu`` uses: at run time CuPy adds the device's ``-arch``."""
    return ["-std=c++17", f"-I{CUDA_DIR}", f"-I{cuda_include_dir()}"]


def nvrtc_options(arch: str) -> list[str]:
    """:func:`nvrtc_base_options` for one architecture, e.g. ``"sm_90"``, with ptxas statistics."""
    return [*nvrtc_base_options(), f"-arch={arch}", "-Xptxas=-v"]


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
