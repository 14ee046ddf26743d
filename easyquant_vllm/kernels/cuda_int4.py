"""CUDA kernel: tensor cores (M <= 64) or a CUDA-core GEMV (M <= 16), else dequantize + cuBLAS; CuPy launches.

``CudaInt4Kernel.forward`` runs inside the ``easyquant::linear`` op (:mod:`.op`) and picks the path per
batch there, at run time (docs/kernels.md, "Dispatch"): under torch.compile the graph holds the op, not
a branch frozen at trace time, and CUDA graphs capture whichever launches the op makes. The launch
functions :func:`mma_int4`, :func:`dequant_mma_int4` (MMA layout, regrouped at load), :func:`gemv_int4`
and :func:`dequant_int4` (the checkpoint's layout) each build a :class:`LaunchPlan` and hand it to
:data:`launcher`: CuPy on torch's current stream, tensors passed by device address (no copies, and no
DLPack stream sync, which CUDA-graph capture forbids). Tests swap :data:`launcher` for a host stand-in
to run the dispatch and the start-up self-check without a GPU. Inputs are checked before launch;
errors name the tensor and its actual dtype, shape or alignment.

Format version 2 (zero points ``zeros [N, K/G] uint8``, column scale ``col_scale [K] fp16``) runs the
``*_v2`` entry points of the same kernels; every launch function takes both tensors or neither (a layer
with only one of them gets the neutral other, ``z = 8`` or ``c = 1``, at load: see :func:`v2_tensors`).
Format version 3 (compact steps, fractional zeros) runs the ``*_v3`` entry points with the same arguments in the
kernel layout of :func:`v3_tensors`: ``scales`` the row units ``d [N] fp16``, ``zeros`` each group's step
multiplier and zero as the pairs ``(a, zq) [N, K/G, 2] uint8`` (one 16-bit load per group), ``col_scale`` as in
version 2 (``c = 1`` where the checkpoint has none). The launch functions tell the versions apart by ``zeros``'
and ``scales``' shapes (:func:`format_of`).

Status: compiled and tested without a GPU (tests/test_cuda_kernels.py); the launch itself and the
GPU tests (``pytest -m gpu``) have not run yet: no GPU was lent to the tasks that built them
(docs/kernels.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..quant import QuantizedWeight
from .base import Kernel, LayerSpec, check_csr_ends, count
from .cuda_build import (
    CUDA_DIR,
    FORMAT_VARIANTS,
    GEMV_BATCH_TILES,
    GEMV_ROWS_PER_WARP,
    MMA_BATCH_TILES,
    MMA_WARPS,
    nvrtc_base_options,
)
from .mma_layout import mma_compatible, to_mma_layout

GEMV_KERNEL_MAX_M = GEMV_BATCH_TILES[-1]  # = kMaxM in cuda/eq_gemv.cu: the most rows one GEMV launch takes
GEMV_MAX_M = 16
"""For layers without the MMA layout: GEMV for M <= 16, dequantize + cuBLAS above. From the issue-rate
model of docs/kernels.md (SASS instruction counts): the GEMV stays ahead of dequantize + matmul, which
moves 4.5 bytes per weight, up to about M = 25 on an H100; 16 is the largest tile. Not yet timed on a GPU."""
MMA_MAX_M = 8 * MMA_BATCH_TILES[-1]
"""Tensor-core kernel for M <= 64 (where the layer has the MMA layout), dequantize + cuBLAS above. By the
SASS model (docs/kernels.md) it streams at HBM speed to M = 16, and at M = 64 still moves weights at
~52 % of HBM (~1.9x fp16), where dequantize + cuBLAS is ~0.44x of fp16."""
THREADS = 128  # 4 warps per block
_ROWS_PER_BLOCK = THREADS // 32 * GEMV_ROWS_PER_WARP
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _group_ok(k: int, g: int) -> bool:
    """The kernels' group sizes: per channel (G == K), or a power of two >= 32 dividing K (a shift finds the group)."""
    return g == k or (g >= 32 and g & (g - 1) == 0 and k % g == 0)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"easyquant CUDA kernel: {message}")


def check_weight(qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
                 values: torch.Tensor, group_size: int, mma: bool = False, zeros: torch.Tensor | None = None,
                 col_scale: torch.Tensor | None = None, split_scale: bool = False) -> tuple[int, int, int]:  # fmt: skip
    """Validate the weight tensors; returns ``(N, K, G)``. Placement and alignment are checked last (that
    they are CUDA tensors, the launcher checks).

    ``qweight`` is canonical ``[N, K/8]`` int32, or with ``mma=True`` the tensor-core layout
    ``[N/16, 2K]`` int32 of :mod:`.mma_layout`. Format version 2 adds ``zeros [N, K/G] uint8`` (values
    0..15) and ``col_scale [K] float16`` (16-byte aligned: the kernels load 8 or 4 scales at once), both
    or neither; with ``split_scale`` (the tensor-core kernels with bf16 activations) ``col_scale`` is
    :func:`split_col_scale`'s ``[2K]``. Format version 3 (:func:`v3_tensors`): ``scales [N] float16`` (the row
    units), ``zeros [N, K/G, 2] uint8`` (the ``(a, zq)`` pairs) and ``col_scale`` as in version 2.
    """
    if mma:
        _require(qweight.dtype == torch.int32 and qweight.dim() == 2 and qweight.shape[1] % 128 == 0,
                 f"qweight (MMA layout) must be int32 [N/16, K/64 * 128], got {qweight.dtype} "
                 f"{list(qweight.shape)}")  # fmt: skip
        n, k = qweight.shape[0] * 16, qweight.shape[1] // 2
    else:
        _require(qweight.dtype == torch.int32 and qweight.dim() == 2,
                 f"qweight must be int32 [N, K/8], got {qweight.dtype} {list(qweight.shape)}")  # fmt: skip
        n, k = qweight.shape[0], qweight.shape[1] * 8
    _require(group_size == -1 or group_size > 0, f"group_size must be > 0 or -1 (per channel), got {group_size}")
    g = k if group_size == -1 else group_size
    _require(n > 0 and k > 0 and k % 32 == 0 and _group_ok(k, g),
             f"needs K % 32 == 0 and a group size, multiple of 32, dividing K; got K = {k}, G = {g}")  # fmt: skip
    version = 1 if zeros is None else 3 if zeros.dim() == 3 else 2  # version 3: the (a, zq) pairs [N, K/G, 2]
    steps_shape = (n,) if version == 3 else (n, k // g)  # version 3: the row units d
    _require(scales.dtype == torch.float16 and tuple(scales.shape) == steps_shape,
             f"scales must be float16 {list(steps_shape)}, got {scales.dtype} {list(scales.shape)}")  # fmt: skip
    _require(indptr.dtype == torch.int32 and tuple(indptr.shape) == (n + 1,),
             f"outlier_indptr must be int32 [{n + 1}], got {indptr.dtype} {list(indptr.shape)}")  # fmt: skip
    _require(indices.dtype == torch.int32 and values.dtype == torch.float16 and indices.shape == values.shape,
             f"outlier_indices/values must be int32/float16 of one length, got {indices.dtype} "
             f"{list(indices.shape)} / {values.dtype} {list(values.shape)}")  # fmt: skip
    check_csr_ends(indptr, indices, values, n, "easyquant CUDA kernel")  # indptr's values: where it is on the host
    _require(
        (zeros is None) == (col_scale is None),
        "zeros and col_scale go together (format version 2); pass z = 8 or c = 1 for the missing one",
    )
    named = [("qweight", qweight), ("scales", scales), ("outlier_indptr", indptr), ("outlier_indices", indices),
             ("outlier_values", values)]  # fmt: skip
    if zeros is not None and col_scale is not None:
        zshape = (n, k // g, 2) if version == 3 else (n, k // g)  # version 3: the (a, zq) pairs
        _require(zeros.dtype == torch.uint8 and tuple(zeros.shape) == zshape,
                 f"zeros must be uint8 {list(zshape)}, got {zeros.dtype} {list(zeros.shape)}")  # fmt: skip
        kc, what = (2 * k, "split_col_scale(c)") if split_scale else (k, "float16")
        _require(col_scale.dtype == torch.float16 and tuple(col_scale.shape) == (kc,),
                 f"col_scale must be {what} [{kc}], got {col_scale.dtype} {list(col_scale.shape)}")  # fmt: skip
        named += [("zeros", zeros), ("col_scale", col_scale)]
    for name, t in named:
        _require(t.is_contiguous() and t.device == qweight.device,
                 f"{name} must be contiguous and on {qweight.device}, got {t.device}")  # fmt: skip
    _require(qweight.data_ptr() % 16 == 0, "qweight must be 16-byte aligned (128-bit loads)")
    _require(col_scale is None or col_scale.data_ptr() % 16 == 0, "col_scale must be 16-byte aligned (128-bit loads)")
    _require(version != 3 or zeros is None or zeros.data_ptr() % 2 == 0,
             "zeros (version 3) must be 2-byte aligned (16-bit loads)")  # fmt: skip
    return n, k, g


def format_of(scales: torch.Tensor, zeros: torch.Tensor | None) -> int:
    """The format version of a layer's kernel tensors: 1 without ``zeros``; 3 with version 3's layout (the row units
    ``[N]`` as ``scales``, the pairs ``[N, K/G, 2]`` as ``zeros``: two dimensions more; stacked experts, ``[E, N]``
    and ``[E, N, K/G, 2]``); else 2 (``scales`` and ``zeros`` both ``[N, K/G]``)."""
    if zeros is None:
        return 1
    return 3 if zeros.dim() == scales.dim() + 2 else 2


def v2_tensors(zeros: torch.Tensor | None, col_scale: torch.Tensor | None, n: int, k: int,
               g: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Both format-version-2 tensors or neither, as the ``*_v2`` kernels take them: the missing one of a
    layer that has only zero points (or only a column scale) becomes its neutral value (``z = 8``, the
    symmetric code offset, or ``c = 1``). Copies into fresh, aligned storage."""
    if zeros is None and col_scale is None:
        return None, None
    device = (zeros if zeros is not None else col_scale).device
    z = torch.full((n, k // g), 8, dtype=torch.uint8, device=device) if zeros is None else zeros.to(torch.uint8)
    c = torch.ones(k, dtype=torch.float16, device=device) if col_scale is None else col_scale.to(torch.float16)
    return z.contiguous().clone(), c.contiguous().clone()


def v3_tensors(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A format-version-3 layer (``qw.row_steps`` set) in the ``*_v3`` kernels' layout: ``(row_steps, pairs,
    col_scale)``. ``row_steps [N] fp16`` the units ``d``; ``pairs [N, K/G, 2] uint8`` each group's step multiplier
    ``a`` (byte 0) and zero ``zq`` (byte 1, sixteenths of a code), which the kernels read as one 16-bit word per
    group; ``col_scale [K] fp16``, ones where the checkpoint has none (exact: ``c = 1`` changes no rounding).
    Fresh, contiguous storage."""
    if qw.row_steps is None or qw.zeros is None:
        raise ValueError("v3_tensors: not a format-version-3 weight (row_steps and zeros are needed)")
    k = qw.shape[1]
    pairs = torch.stack([qw.scales.to(torch.uint8), qw.zeros.to(torch.uint8)], dim=-1).contiguous()
    c = torch.ones(k, dtype=torch.float16, device=pairs.device) if qw.col_scale is None else qw.col_scale.half()
    return qw.row_steps.to(torch.float16).contiguous().clone(), pairs, c.contiguous().clone()


def format_version(zero_points: bool, column_scale: bool, compact_steps: bool) -> int:
    """A layer's format version from its spec's flags (docs/format.md): 3 with compact steps, 2 with zero points or
    a column scale, else 1."""
    return 3 if compact_steps else 2 if zero_points or column_scale else 1


def split_col_scale(col_scale: torch.Tensor) -> torch.Tensor:
    """``c [K] float16`` -> ``[2K]``, the column scale as the tensor-core kernels take it with bf16 activations.

    ``c`` has 11 significant bits, a bf16 only 8, so it is split exactly into ``c = hi + lo`` (two bf16: the
    remainder of rounding to 8 bits has at most 4), stored per 4 columns as ``[hi x 4, lo x 4]`` (what one
    lane's 128-bit load covers: cuda/eq_mma.cu, ``ColScale``). Returned as a float16-typed view of the bf16
    bits, the type of the kernel parameter.
    """
    c = col_scale.float()
    hi = c.to(torch.bfloat16)
    lo = (c - hi.float()).to(torch.bfloat16)
    _require(c.numel() % 4 == 0 and torch.equal(hi.float() + lo.float(), c),
             "col_scale is not float16 values (split into two bf16 is inexact)")  # fmt: skip
    return torch.stack([hi.view(-1, 4), lo.view(-1, 4)], dim=1).reshape(-1).view(torch.float16).contiguous()


def _split_for(x_dtype: torch.dtype, col_scale: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """The tensor-core kernels' column scale for activations of ``x_dtype``: bf16 takes the split (done
    once at load by :meth:`CudaInt4Kernel.prepare`; a plain ``[K]`` scale is split here, per call)."""
    if col_scale is None or x_dtype != torch.bfloat16 or col_scale.numel() == 2 * k:
        return col_scale
    return split_col_scale(col_scale)


def _variant(scales: torch.Tensor, zeros: torch.Tensor | None) -> str:
    """The entry-point suffix of the format version (cuda_build.FORMAT_VARIANTS)."""
    return FORMAT_VARIANTS[format_of(scales, zeros) - 1]


@functools.cache
def _module(source: str, device_index: int) -> Any:
    """``cuda/<source>`` compiled once per device by NVRTC for its architecture; every entry point of the
    file comes from this one module (CuPy also caches the cubin on disk across processes)."""
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=(CUDA_DIR / source).read_text(), backend="nvrtc",
                              options=tuple(nvrtc_base_options()))  # fmt: skip


@functools.cache
def _function(source: str, name: str, device_index: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_index):
        return _module(source, device_index).get_function(name)


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: entry point, grid (blocks of :data:`THREADS`), and its arguments in the
    order of the C signature (tensors by pointer, ints as ``int``). Built without a device, so tests
    check it against the kernels' signatures on any machine."""

    source: str
    name: str
    grid: int
    args: tuple[Any, ...]
    threads: int = THREADS


# Every plan passes the arguments in the order of the entry points' one C signature (cuda/*.cu):
#   products: x, qweight, scales, zeros, colscale, indptr, indices, values, y, M, N, K, G
#   dequant:  qweight, scales, zeros, colscale, indptr, indices, values, w, N, K, G
# with zeros / colscale None (a null pointer) for format version 1, and version 3's row units as scales and its
# (a, zq) pairs as zeros.


def gemv_plan(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor,
              indices: torch.Tensor, values: torch.Tensor, y: torch.Tensor, group_size: int,
              zeros: torch.Tensor | None = None, col_scale: torch.Tensor | None = None) -> LaunchPlan:  # fmt: skip
    """The GEMV launch for ``x [M, K]`` into ``y [M, N]``: the smallest batch tile >= M."""
    m, k = x.shape
    n = qweight.shape[0]
    tile = next(t for t in GEMV_BATCH_TILES if t >= m)
    g = k if group_size == -1 else group_size
    return LaunchPlan("eq_gemv.cu", f"eq_gemv_int4_{_SUFFIX[x.dtype]}_m{tile}{_variant(scales, zeros)}",
                      -(-n // _ROWS_PER_BLOCK),
                      (x, qweight, scales, zeros, col_scale, indptr, indices, values, y, m, n, k, g))  # fmt: skip


def dequant_plan(qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
                 values: torch.Tensor, w: torch.Tensor, group_size: int, zeros: torch.Tensor | None = None,
                 col_scale: torch.Tensor | None = None) -> LaunchPlan:  # fmt: skip
    """The dequantize launch writing ``w [N, K]``: one warp per row."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    return LaunchPlan("eq_dequant.cu", f"eq_dequant_int4_{_SUFFIX[w.dtype]}{_variant(scales, zeros)}",
                      -(-n // (THREADS // 32)),
                      (qweight, scales, zeros, col_scale, indptr, indices, values, w, n, k, g))  # fmt: skip


def mma_plan(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor,
             indices: torch.Tensor, values: torch.Tensor, y: torch.Tensor, group_size: int,
             zeros: torch.Tensor | None = None, col_scale: torch.Tensor | None = None) -> LaunchPlan:  # fmt: skip
    """The tensor-core launch for ``x [M <= 64, K]`` into ``y [M, N]``: one block of 8 warps per 16 rows."""
    m, k = x.shape
    n = y.shape[1]
    tiles = next(t for t in MMA_BATCH_TILES if 8 * t >= m)
    g = k if group_size == -1 else group_size
    return LaunchPlan("eq_mma.cu", f"eq_mma_int4_{_SUFFIX[x.dtype]}_t{tiles}{_variant(scales, zeros)}", n // 16,
                      (x, qweight, scales, zeros, col_scale, indptr, indices, values, y, m, n, k, g),
                      threads=32 * MMA_WARPS)  # fmt: skip


def dequant_mma_plan(qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
                     values: torch.Tensor, w: torch.Tensor, group_size: int, zeros: torch.Tensor | None = None,
                     col_scale: torch.Tensor | None = None) -> LaunchPlan:  # fmt: skip
    """W' ``[N, K]`` from the MMA layout: one warp per 16-row tile."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    return LaunchPlan("eq_mma.cu", f"eq_dequant_mma_int4_{_SUFFIX[w.dtype]}{_variant(scales, zeros)}",
                      -(-(n // 16) // (THREADS // 32)),
                      (qweight, scales, zeros, col_scale, indptr, indices, values, w, n, k, g))  # fmt: skip


def kernel_args(plan: LaunchPlan) -> tuple[Any, ...]:
    """The plan's arguments as CuPy passes them by value: tensors as their raw device address (8 bytes,
    a pointer parameter's ABI), None as a null pointer, ints as int32.

    Not DLPack: ``cupy.from_dlpack`` calls ``tensor.__dlpack__(stream=...)``, and torch answers by
    making that stream wait on its current one. Inside CUDA-graph capture that cross-stream sync is
    an error (pytorch/pytorch#163242, wjakob/nanobind#1241). A raw address involves no stream at all;
    the kernel is ordered by launching on torch's current stream.
    """
    import numpy as np

    return tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else np.uint64(0) if a is None
                 else np.int32(a) for a in plan.args)  # fmt: skip


class CupyLauncher:
    """Runs a :class:`LaunchPlan` with CuPy on torch's current stream of the tensors' device."""

    def launch(self, plan: LaunchPlan) -> None:
        import cupy

        tensors = [a for a in plan.args if isinstance(a, torch.Tensor)]
        device = tensors[0].device
        for t in tensors:
            _require(t.is_cuda and t.device == device, f"{plan.name}: every tensor must be on one CUDA device, "
                                                       f"got {t.device} next to {device}")  # fmt: skip
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        with cupy.cuda.Device(index):
            _function(plan.source, plan.name, index)((plan.grid,), (plan.threads,), kernel_args(plan), stream=stream)


launcher: Any = CupyLauncher()
"""What executes launch plans. Tests replace it with a host stand-in (any object with ``launch(plan)``)."""


def _aligned_x(x: torch.Tensor, k: int, max_m: int) -> torch.Tensor:
    _require(x.dtype in _SUFFIX and x.dim() == 2 and x.shape[1] == k and 1 <= x.shape[0] <= max_m,
             f"x must be fp16/bf16 [1..{max_m}, {k}], got {x.dtype} {list(x.shape)}")  # fmt: skip
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x  # a view into a larger buffer: the kernels load 8 or 16 bytes


def gemv_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor,
              indices: torch.Tensor, values: torch.Tensor, group_size: int, zeros: torch.Tensor | None = None,
              col_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``x [M <= 16, K] fp16/bf16`` -> ``[M, N]``: the fused GEMV of cuda/eq_gemv.cu (canonical layout)."""
    n, k, g = check_weight(qweight, scales, indptr, indices, values, group_size, zeros=zeros, col_scale=col_scale)
    x = _aligned_x(x, k, GEMV_KERNEL_MAX_M)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    launcher.launch(gemv_plan(x, qweight, scales, indptr, indices, values, y, g, zeros, col_scale))
    return y


def dequant_int4(qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
                 values: torch.Tensor, group_size: int, dtype: torch.dtype, zeros: torch.Tensor | None = None,
                 col_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """W' ``[N, K]`` in ``dtype`` (fp16/bf16): cuda/eq_dequant.cu, bit-identical to the reference."""
    n, k, g = check_weight(qweight, scales, indptr, indices, values, group_size, zeros=zeros, col_scale=col_scale)
    _require(dtype in _SUFFIX, f"dtype must be float16 or bfloat16, got {dtype}")
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    launcher.launch(dequant_plan(qweight, scales, indptr, indices, values, w, g, zeros, col_scale))
    return w


def mma_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor,
             indices: torch.Tensor, values: torch.Tensor, group_size: int, zeros: torch.Tensor | None = None,
             col_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``x [M <= 64, K] fp16/bf16`` -> ``[M, N]`` on tensor cores (cuda/eq_mma.cu); ``qweight`` in the MMA layout."""
    col_scale = _split_for(x.dtype, col_scale, qweight.shape[1] // 2)
    n, k, g = check_weight(qweight, scales, indptr, indices, values, group_size, mma=True, zeros=zeros,
                           col_scale=col_scale, split_scale=x.dtype == torch.bfloat16)  # fmt: skip
    x = _aligned_x(x, k, MMA_MAX_M)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    launcher.launch(mma_plan(x, qweight, scales, indptr, indices, values, y, g, zeros, col_scale))
    return y


def dequant_mma_int4(qweight: torch.Tensor, scales: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
                     values: torch.Tensor, group_size: int, dtype: torch.dtype, zeros: torch.Tensor | None = None,
                     col_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """W' ``[N, K]`` in ``dtype`` from the MMA layout (cuda/eq_mma.cu), bit-identical to the reference."""
    col_scale = _split_for(dtype, col_scale, qweight.shape[1] // 2)
    n, k, g = check_weight(qweight, scales, indptr, indices, values, group_size, mma=True, zeros=zeros,
                           col_scale=col_scale, split_scale=dtype == torch.bfloat16)  # fmt: skip
    _require(dtype in _SUFFIX, f"dtype must be float16 or bfloat16, got {dtype}")
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    launcher.launch(dequant_mma_plan(qweight, scales, indptr, indices, values, w, g, zeros, col_scale))
    return w


def _has_mma(device: torch.device) -> bool:
    """mma.sync.m16n8k16 with fp16 and bf16 operands needs sm_80 (Ampere) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def cuda_runtime_problem() -> str | None:
    """Why CuPy's CUDA cannot run here, or None: CuPy missing, or a driver older than the CUDA runtime
    CuPy was built for. cupy-cuda13x imports fine on a CUDA 12 driver (< 580) and only fails at the first
    compile or launch, which in vLLM is the profile run: checked up front instead."""
    try:
        import cupy
    except ImportError:
        return "cuda-int4 needs CuPy (pip install cupy-cuda13x)"
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
        runtime = cupy.cuda.runtime.runtimeGetVersion()
    except Exception as e:  # the driver refuses
        return f"CuPy cannot query the CUDA driver ({type(e).__name__}: {e})"
    if driver == 0:
        return "no NVIDIA driver found (CUDA reports driver version 0)"
    if driver // 1000 < runtime // 1000:
        return (f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, older than the CUDA "
                f"{runtime // 1000}.{runtime % 1000 // 10} this CuPy build needs; update the driver or install the "
                f"cupy-cuda{driver // 1000}x wheel")  # fmt: skip
    return None


class CudaInt4Kernel(Kernel):
    """int4 on CUDA: the MMA layout (tensor cores, M <= 64) where the shape and GPU allow, else the
    checkpoint's layout (GEMV, M <= 16); dequantize + cuBLAS for larger batches. ``meta = [N, G, mma, version]``
    (the checkpoint's format version); versions 2 and 3 add ``zeros`` and ``col_scale`` to the op's tensors (version
    3 in the layout of :func:`v3_tensors`)."""

    name = "cuda-int4"
    TENSORS = ("qweight", "scales", "indptr", "indices", "values")

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        if spec.device_type != "cuda":
            return False, "cuda-int4 runs on CUDA devices only"
        if spec.bits != 4 or spec.act_dtype not in _SUFFIX:
            return False, f"cuda-int4 needs 4-bit codes and fp16/bf16 activations, got {spec.bits} / {spec.act_dtype}"
        if spec.k % 32 or not _group_ok(spec.k, spec.group):
            return False, (f"cuda-int4 needs K % 32 == 0 and a power-of-two group size >= 32 (or per channel), "
                           f"got K = {spec.k}, G = {spec.group}")  # fmt: skip
        problem = cuda_runtime_problem()
        return (False, problem) if problem else (True, None)

    def __init__(self, spec: LayerSpec, device: torch.device | None = None) -> None:
        super().__init__(spec)
        device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.mma = mma_compatible(spec.n, spec.k) and _has_mma(device)

    @classmethod
    def variant(cls, spec: LayerSpec, device: torch.device) -> tuple[Any, ...]:
        return (spec.act_dtype, spec.group_size == -1, mma_compatible(spec.n, spec.k) and _has_mma(device),
                spec.zero_points or spec.column_scale, spec.compact_steps)  # fmt: skip

    @classmethod
    def check_shape(cls, spec: LayerSpec, device: torch.device) -> tuple[int, int]:
        k = 128 if spec.group_size == -1 else max(64, 2 * spec.group_size)
        mma = mma_compatible(spec.n, spec.k) and _has_mma(device)
        return (32 if mma else 40), k  # 40 rows: no MMA layout, so the small case takes the GEMV paths

    @classmethod
    def check_batches(cls, spec: LayerSpec, device: torch.device) -> tuple[int, ...]:
        if mma_compatible(spec.n, spec.k) and _has_mma(device):
            return (*(8 * t for t in MMA_BATCH_TILES), MMA_MAX_M + 1)  # every tile, then dequantize + cuBLAS
        return (*GEMV_BATCH_TILES, GEMV_MAX_M + 1)

    @property
    def version(self) -> int:
        """The layer's format version: 3 (compact steps), 2 (zero points or a column scale) or 1."""
        return format_version(self.spec.zero_points, self.spec.column_scale, self.spec.compact_steps)

    def meta(self) -> list[int]:
        return [self.spec.n, self.spec.group_size, int(self.mma), self.version]

    def apply_tensors(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """:attr:`TENSORS`, then ``zeros`` and ``col_scale`` for a layer of format version 2 or 3."""
        return [tensors[t] for t in (*self.TENSORS, *(("zeros", "col_scale") if self.version > 1 else ()))]

    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The tensor-core layout where the shape and GPU allow it (N % 16, K % 64, sm_80+), regrouped
        once here from the checkpoint's (on the CPU, in row blocks: see :func:`to_mma_layout`); else the
        canonical layout, which the GEMV reads as it is. Format version 3: ``scales``, ``zeros`` and ``col_scale``
        as :func:`v3_tensors` lays them out (the row units, the ``(a, zq)`` pairs, the column scale)."""
        o = qw.outliers
        check_csr_ends(o.indptr.cpu(), o.indices, o.values, qw.shape[0], f"{self.name} prepare")
        qweight = to_mma_layout(qw.qweight) if self.mma else qw.qweight
        tensors = {"qweight": qweight.contiguous(), "scales": qw.scales.contiguous(), "indptr": o.indptr.contiguous(),
                   "indices": o.indices.contiguous(), "values": o.values.contiguous()}  # fmt: skip
        if self.version == 3:
            tensors["scales"], tensors["zeros"], tensors["col_scale"] = v3_tensors(qw)
        elif self.version == 2:
            n, k, g = self.spec.n, self.spec.k, self.spec.group
            tensors["zeros"], tensors["col_scale"] = v2_tensors(qw.zeros, qw.col_scale, n, k, g)
        if self.version > 1 and self.mma and self.spec.act_dtype == torch.bfloat16:  # the exact hi/lo split of c
            tensors["col_scale"] = split_col_scale(tensors["col_scale"])
        return tensors

    @classmethod
    def forward(cls, w: Sequence[torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
                meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
        qweight, scales, indptr, indices, values, *extra = w
        _, group_size, mma, _ = meta
        csr = (indptr, indices, values)
        zc = dict(zip(("zeros", "col_scale"), extra, strict=False))  # empty for format version 1
        m = x.shape[0]
        if mma and m <= MMA_MAX_M:
            count(cls.name, "mma")
            y = mma_int4(x, qweight, scales, *csr, group_size, **zc)
        elif mma:
            count(cls.name, "dequant")
            y = x @ dequant_mma_int4(qweight, scales, *csr, group_size, x.dtype, **zc).t()
        elif m <= GEMV_MAX_M:
            count(cls.name, "gemv")
            y = gemv_int4(x, qweight, scales, *csr, group_size, **zc)
        else:
            count(cls.name, "dequant")
            y = x @ dequant_int4(qweight, scales, *csr, group_size, x.dtype, **zc).t()
        return y if bias is None else y.add_(bias)
