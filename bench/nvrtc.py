"""Compile checks of the CUDA kernels without a GPU (tests and benchmarks; serving never runs this).

CuPy compiles the kernels with NVRTC at run time. Here the same sources are compiled with the same options for
every architecture we ship: CuPy's high-level ``RawModule`` needs a device, but the low-level
``cupy.cuda.nvrtc`` binding does not, given the CUDA headers of the ``nvidia-cuda-runtime`` wheel.
"""

from __future__ import annotations

from dataclasses import dataclass

from easyquant_vllm.kernels.cuda_build import (
    CUDA_DIR,
    FORMAT_VARIANTS,
    GEMV_BATCH_TILES,
    MMA_BATCH_TILES,
    nvrtc_base_options,
)

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
"""Architectures every kernel must compile for (Ampere, Ada, Hopper)."""

KERNEL_NAMES = {
    "eq_gemv.cu": tuple(
        f"eq_gemv_int4_{t}_m{m}{v}" for t in ("f16", "bf16") for m in GEMV_BATCH_TILES for v in FORMAT_VARIANTS
    ),
    "eq_dequant.cu": tuple(f"eq_dequant_int4_{t}{v}" for t in ("f16", "bf16") for v in FORMAT_VARIANTS),
    "eq_mma.cu": (
        *(f"eq_mma_int4_{t}_t{j}{v}" for t in ("f16", "bf16") for j in MMA_BATCH_TILES for v in FORMAT_VARIANTS),
        *(f"eq_dequant_mma_int4_{t}{v}" for t in ("f16", "bf16") for v in FORMAT_VARIANTS),
    ),
    "eq_moe.cu": (
        "eq_moe_route",
        *(f"eq_moe_mma_int4_{t}_t{j}{v}" for t in ("f16", "bf16") for j in MMA_BATCH_TILES for v in FORMAT_VARIANTS),
        *(f"eq_moe_gemv_int4_{t}_m{m}{v}" for t in ("f16", "bf16") for m in GEMV_BATCH_TILES for v in FORMAT_VARIANTS),
        *(f"eq_moe_{step}_{t}" for step in ("silu_mul", "sum") for t in ("f16", "bf16")),
    ),
}
"""Every entry point each source must export (what the launch plans of kernels/cuda_int4.py name)."""

CUPY_APPENDED_OPTIONS = ("-ftz=true",)
"""What ``cupy.RawModule`` appends to the options it is given before calling NVRTC (cupy 14,
``cupy/cuda/compiler.py``: ``options += ('-ftz=true',)``; a test watches for changes). The compile checks add
the same, so that they see exactly the code that runs."""


def nvrtc_options(arch: str) -> list[str]:
    """What NVRTC receives at run time on ``arch`` (e.g. ``"sm_90"``), plus ptxas statistics for the log."""
    return [*nvrtc_base_options(), *CUPY_APPENDED_OPTIONS, f"-arch={arch}", "-Xptxas=-v"]


@dataclass(frozen=True)
class NvrtcResult:
    cubin: bytes
    log: str  # NVRTC + ptxas messages (registers, spills per kernel)


def nvrtc_compile(source: str, arch: str) -> NvrtcResult:
    """Compile ``kernels/cuda/<source>`` with NVRTC for ``arch``; raises RuntimeError with the log on failure."""
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
