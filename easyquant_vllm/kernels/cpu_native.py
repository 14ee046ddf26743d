"""CPU kernel of our own (``csrc/eq_cpu.cpp``): int4 (and int8) GEMM, CSR outliers and bias in one C++ op call.

Built with ``torch.utils.cpp_extension`` at first use (about 10-60 s, then cached in torch's extension
directory; ``scripts/setup.sh`` builds it ahead). Where no compiler is available the build error is
reported once and the layers take the next kernel (``cpu-wna16`` / ``torch-int4-cpu``).

Why: vLLM's ``cpu_gemm_wna16`` and PyTorch's int4 GEMM ran at ~0.5x of the unquantized model in vLLM's
compiled mode on AVX512 CPUs: 3-5x slower than dense bf16 at batch 16, a general sparse product for the
outliers, and several ops (each with Python overhead) per layer. Here ``apply`` emits one C++ op that the
compiled graph calls directly, and the op picks a path by the batch size M:

=========  =================================  =============================================================
path       needs                              what
=========  =================================  =============================================================
fma        AVX2 + FMA                         exact fp32 ``s * (u - z)`` times fp32 ``x * c``
i16        AVX2 + FMA                         integer codes times ``x * c`` in 16-bit fixed point per 128
                                              columns (``vpmaddwd``), scaled per group in fp32
vnni       AVX512-VNNI                        i16's arithmetic with ``vpdpwssd`` on the 16 rows of a block
                                              at once: i16's outputs bit for bit, fewer instructions
bf16dp     AVX512-BF16, bf16 activations      exact bf16 codes, ``vdpbf16ps`` per group, step applied in fp32
amx        AMX-BF16 + AVX512-VBMI, bf16       the same codes as AMX B tiles, 16 batch rows per pass (8-bit
                                              codes: two tiles, one per nibble)
dequant    AVX2                               W'^T in x's dtype (bit-identical to the reference), ATen GEMM
i8         AVX2 + FMA; opt-in, not planned    integer codes times ``x * c`` rounded to int8 per 32 columns
                                              (``vpmaddubsw``, as llama.cpp's Q8 activations): faster than
                                              i16, but x is rounded (``I8_CHECK_TOLERANCE``)
=========  =================================  =============================================================

The plan (which path for which M) is fixed per ISA and dtype from measurements (docs/serving.md); it is
passed to the op as ints, so the compiled graph holds no branch on M. 8-bit codes (a quantized lm_head,
``--lm-head-bits 8``) take the paths of :data:`PATHS_8BIT` only. Every path serves format versions 1, 2
and 3 (for version 3 the op takes the rows' units, ``row_steps``, and decodes each group's step and fractional
zero point in its per-group epilogue).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from ..quant import QuantizedWeight
from .base import Kernel, LayerSpec, cpu_int4_unsupported

logger = logging.getLogger("vllm.easyquant")

SOURCE = Path(__file__).resolve().parent / "csrc" / "eq_cpu.cpp"
SOURCES = (SOURCE, SOURCE.with_name("eq_cpu_moe.cpp"))
"""The op library: the linear op (eq_cpu.cpp) and the MoE op that runs it per expert (eq_cpu_moe.cpp)."""
PATHS = ("fma", "bf16dp", "amx", "dequant", "i16", "i8", "vnni")
"""Path ids of the C++ op, in order (``Path`` in eq_cpu.cpp; a new path takes the next id)."""
PATHS_8BIT = ("i16", "vnni", "amx", "dequant")
"""The paths that also take 8-bit codes (the op refuses the others for them)."""

I8_CHECK_TOLERANCE = 2e-2
"""Self-check bound (mean relative error) of a plan with the i8 path, whatever the activations' dtype: x * c
rounded to int8 per 32 columns is ~5e-3 on the check's Gaussian x, more than fp16's own bound (select.py)."""
_BLOCK_N = 16
OPTIONAL_TENSORS = ("zeros", "col_scale", "row_steps")
"""The op's optional weight tensors, in the order :meth:`NativeCpuKernel.apply_tensors` appends them: format
version 2's zero points and column scale, format version 3's row units."""
ENV_VERBOSE = "EASYQUANT_VERBOSE_BUILD"
"""Set to show the compiler's output when the C++ op is built."""


@functools.cache
def build_problem() -> str | None:
    """Build (or load from torch's extension cache) the C++ op; None on success, else why it failed."""
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for is OpenMP code inlined from ATen's headers. The library links
        # libgomp.so.1, which resolves to the copy torch already loaded: one thread pool, not two.
        load(name="easyquant_cpu", sources=[str(p) for p in SOURCES], extra_cflags=["-O3", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=bool(os.environ.get(ENV_VERBOSE)))  # fmt: skip
    except Exception as e:  # no compiler, no ninja, a compile error: the other CPU kernels take over
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        compiler = [line for line in lines if ": error:" in line or "fatal error" in line]
        first_error = (compiler or lines[-1:] or [str(e)])[0]
        reason = f"building {SOURCE.name} failed ({type(e).__name__}: {first_error})"
        logger.warning("EasyQuant: %s; the native CPU kernel is not used", reason)
        return reason
    register_fake()
    return None


ENV_MALLOC = "EASYQUANT_MALLOC_TUNING"
"""Set to ``0`` to leave glibc's malloc thresholds as they are (:func:`tune_malloc`)."""
MMAP_THRESHOLD = 32 << 20
"""Allocations up to this size come from the heap (HEAP_MAX_SIZE / 2: the most older glibc versions accept)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap is given back to the OS only past this size."""


@functools.cache
def tune_malloc() -> bool:
    """Keep freed buffers of up to 32 MiB in the process's heap (glibc ``mallopt``); True where it was set.

    Why: with glibc's defaults a multi-megabyte tensor freed at the end of a decode step can be unmapped (or trimmed
    off the heap's top) and mapped again the next step, so every step pays its page faults on first touch. Served
    Qwen2.5-1.5B at batch 16 with our kernels spent 21.9 ms of each ~125 ms step in one ``aten::copy_`` (vLLM's
    sampler turning the [16, 151936] logits into fp32: 9.7 MB of fresh pages a step; 0.1 ms with the buffer
    reused), measured under torch's profiler (docs/serving.md). It did not happen in the unquantized engine, whose
    heap is laid out differently. The thresholds are fixed here instead (as vLLM's CPU guide fixes the allocator
    with tcmalloc): buffers up to 32 MiB stay in the heap for reuse, and the heap is trimmed past 1 GiB of free
    top. It only works when set before the model's tensors are allocated (set after loading, the copy stayed
    slow: the heap's layout by then is what matters), so ``EasyQuantConfig.get_quant_method`` calls it on CPU
    platforms: the process that builds an EasyQuant model, when it builds it. A no-op (False) off glibc, with another
    allocator preloaded (whose own policy then applies), where the user set glibc's thresholds
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES=glibc.malloc.*``), or with
    ``EASYQUANT_MALLOC_TUNING=0``. The cost: up to 1 GiB of freed memory stays mapped (the served engines' RSS after a
    run did not change measurably: 5.08-5.15 against 5.06-5.14 GiB on Qwen2.5-1.5B).
    """
    if os.environ.get(ENV_MALLOC, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(v) for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or "glibc.malloc." in (
        os.environ.get("GLIBC_TUNABLES") or ""
    ):
        return False  # the user's own thresholds stand
    try:
        libc = ctypes.CDLL("libc.so.6")
        process = ctypes.CDLL(None)  # the symbols the process resolves (a preloaded allocator's first)
    except OSError:
        return False
    if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        return False  # tcmalloc, jemalloc, ... preloaded: glibc's thresholds would not apply to the allocations
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    ok = libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1 and libc.mallopt(m_trim_threshold, TRIM_THRESHOLD) == 1
    if ok:
        logger.info("EasyQuant: glibc malloc keeps freed buffers up to %d MiB for reuse (%s=0 to leave it as it was)",
                    MMAP_THRESHOLD >> 20, ENV_MALLOC)  # fmt: skip
    return ok


def available_paths(dtype: torch.dtype) -> tuple[str, ...]:
    """The op's paths this CPU can run for activations of ``dtype`` (none where the op cannot be built)."""
    if build_problem() is not None:
        return ()
    return tuple(PATHS[p] for p in torch.ops.easyquant.cpu_int4_paths(dtype))


def path_calls() -> dict[str, int]:
    """How often each path ran in this process (the native side of the dispatch counter); empty where the
    op has not been built in this process (never builds it)."""
    if build_problem.cache_info().currsize == 0 or build_problem() is not None:
        return {}
    return dict(zip(PATHS, torch.ops.easyquant.cpu_int4_path_calls(), strict=True))


ENV_PLAN = "EASYQUANT_CPU_PLAN"
"""Overrides the plan for measurements, e.g. ``fma`` or ``bf16dp:2,amx:96,dequant``: ``path:m_max`` pairs in
order, the last without a bound."""


def default_plan(dtype: torch.dtype, paths: Sequence[str], bits: int = 4) -> list[int]:
    """``[m_max, path, m_max, path, ...]`` for the op: the first pair with M <= m_max is used.

    The bounds are crossovers measured layer by layer (docs/serving.md, ``bench/cpu_kernels.py``). The integer
    path is the AVX512-VNNI one (``vnni``) where the CPU has it, else ``i16`` (the same outputs, AVX2). With AMX:
    ``vnni`` to 6 rows, the AMX tiles to 160, then dequantize + oneDNN's GEMM (AMX). On Qwen2.5-1.5B's layers
    (format 3, g32, 2 threads, one pass; 2026-12-06) ``vnni`` was 2x faster than ``amx`` at one row and ~1.1x at
    4-5 rows, about even at 6, and ``amx`` 1.15x faster at 8 and 1.7x at 16; ``amx`` beat dequant + oneDNN 2-6x
    at 16-64 rows and 1.3-1.5x at 128, and lost to it by 1.1-1.45x at 192 and 1.5x at 256. With AVX512-BF16 and
    VNNI but no AMX: ``vnni`` to 128 rows (1.5-2.1x ``bf16dp``'s speed at every M measured, formats 2 and 3), then
    dequant, the bound measured for ``bf16dp``. With AVX2 only (or fp16 activations, which the bf16 paths do not
    take), the integer path for every M: ``i16`` ran 1.5-3.2x faster than the fma path at M = 1-64 on AVX2 (1.3x at 128
    and 256), and the dense GEMM that dequant hands over to (no native bf16 there) was 4.5-11x slower.

    8-bit codes (``bits = 8``, the lm_head: one row per sequence): with AMX ``vnni`` to 8 rows, ``amx`` to 160,
    measured on Qwen2.5-1.5B's 151936 x 1536 head (g32, 2 threads, one pass through two copies; 2026-12-06, after
    ``vnni`` began reading four runs of blocks side by side): ``vnni`` 23.4 against ``amx`` 27.1 ms at 8 rows and
    20.4 against 27.8 at 4, ``amx`` 1.3x faster at 12 rows and at 16 (before the runs: ``vnni`` ahead to 6 rows
    only); ``amx`` 1.5-1.7x ``vnni`` at 32-128 rows; dequant + oneDNN's GEMM lost to ``amx`` 1.7-2.5x at 32-128
    rows and won 1.3x at 192. With AVX512-BF16 but no AMX: the
    integer path, dequant beyond 96 rows; AVX2: the integer path for every M. ``EASYQUANT_CPU_PLAN`` applies to
    them only where it names 8-bit paths alone (it is meant for the 4-bit layers: an ``i8`` override leaves the
    8-bit lm_head on this plan).
    """
    override = os.environ.get(ENV_PLAN)
    plan = parse_plan(override, paths) if override else None
    vnni = "vnni" in paths  # AVX512-VNNI: i16's outputs, faster
    integer = "vnni" if vnni else "i16"
    if bits == 8:
        if plan is not None and all(PATHS[p] in PATHS_8BIT for p in plan[1::2]):
            return plan
        if "amx" in paths:
            return _flatten([(integer, 8 if vnni else 6), ("amx", 160), ("dequant", 0)])
        return _flatten([(integer, 96), ("dequant", 0)] if "bf16dp" in paths else [(integer, 0)])
    if plan is not None:
        return plan
    if "amx" in paths:
        steps = [("vnni", 6) if vnni else ("bf16dp", 2), ("amx", 160), ("dequant", 0)]
    elif "bf16dp" in paths:
        steps = [("vnni" if vnni else "bf16dp", 128), ("dequant", 0)]
    else:
        steps = [(integer, 0)]
    return _flatten(steps)


def _flatten(steps: Sequence[tuple[str, int]]) -> list[int]:
    flat: list[int] = []
    for path, m_max in steps:
        flat += [m_max if m_max > 0 else 1 << 30, PATHS.index(path)]
    return flat


def parse_plan(text: str, paths: Sequence[str]) -> list[int]:
    """``"bf16dp:2,amx:96,dequant"`` -> the op's flat plan; ValueError naming what is wrong."""
    steps = []
    for i, item in enumerate(text.split(",")):
        name, _, bound = item.strip().partition(":")
        if name not in PATHS:
            raise ValueError(f"{ENV_PLAN}={text!r}: unknown path {name!r}; paths: {list(PATHS)}")
        if name not in paths:
            raise ValueError(
                f"{ENV_PLAN}={text!r}: path {name!r} is not available on this CPU (available: {list(paths)})"
            )
        last = i == text.count(",")
        if (bound and not bound.isdigit()) or (not bound and not last):
            raise ValueError(f"{ENV_PLAN}={text!r}: every path but the last needs ':m_max' (a positive integer)")
        steps.append((name, int(bound) if bound and not last else 0))
    return _flatten(steps)


def plan_text(plan: Sequence[int]) -> str:
    """The flat plan as ``"bf16dp:2,amx:96,dequant"`` (logs and benchmarks)."""
    pairs = [(PATHS[plan[i + 1]], plan[i]) for i in range(0, len(plan), 2)]
    return ",".join(name if i == len(pairs) - 1 else f"{name}:{m}" for i, (name, m) in enumerate(pairs))


def repack(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``qweight [N, K/8] int32``, ``scales [N, K/G]`` (fp16 steps; uint8 multipliers in format version
    3) -> the op's layout.

    Returns ``w_q [N/16, K/8 * 16] int32`` (word (b, q, j) = ``qweight[16b + j, q]``: the 16 rows of a block
    side by side, each word unchanged) and ``scales [N/16, K/G * 16]`` in their dtype (the 16 rows contiguous
    per group).
    """
    return _blocks(qweight), _blocks(scales)


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` -> ``[N/16, C * 16]``: entry (b, c, j) = ``t[16b + j, c]`` (a block's 16 rows side by side)."""
    n, cols = t.shape
    return t.view(n // _BLOCK_N, _BLOCK_N, cols).transpose(1, 2).reshape(n // _BLOCK_N, -1).contiguous()


def block_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows [T]`` (int64) of a blocked ``[N/16, C * 16]`` tensor (:func:`_blocks`) as ``[T, C]``: the
    canonical rows, read in place (an embedding lookup of the kernel's own tensors)."""
    return t.view(t.shape[0], -1, _BLOCK_N)[rows // _BLOCK_N, :, rows % _BLOCK_N]


def lookup_operands(tensors: dict[str, torch.Tensor], qw: QuantizedWeight) -> tuple[list[str], list[int]]:
    """What ``easyquant::embedding`` reads for the input lookups of a vocabulary matrix this kernel serves: the
    names of :meth:`NativeCpuKernel.prepare`'s tensors in the op's order, and its meta (``blocked = 1``). A tied,
    quantized lm_head then holds one copy of its codes, not a canonical one beside the kernel's (on Qwen2.5-1.5B:
    233 MB at 8 bits)."""
    from .op import embedding_meta

    names = ["w_q", "scales", "indptr", "indices", "values", *(t for t in OPTIONAL_TENSORS if t in tensors)]
    return names, embedding_meta(qw, blocked=True)


class NativeCpuKernel(Kernel):
    """Our C++ CPU kernel; ``meta = [N, G, has zeros, has column scale, compact steps]`` plus the plan
    (``[m_max, path, ...]``)."""

    name = "native-int4-cpu"
    TENSORS = ("w_q", "scales", "indptr", "indices", "values")

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        # 4-bit codes on every path, 8-bit ones on PATHS_8BIT (i16 runs on every AVX2 CPU)
        why = cpu_int4_unsupported(cls.name, spec, bits=(4, 8))
        if why:
            return False, why
        if spec.compact_steps and not spec.zero_points:
            return False, f"{cls.name}: format version 3 (compact steps) layers have zero points; this spec has none"
        if spec.n % 16 or spec.k % 32 or spec.group % 32 or spec.k % spec.group:
            return False, (f"{cls.name} needs N % 16 == 0, K % 32 == 0 and a group size, multiple of 32, dividing K; "
                           f"got N = {spec.n}, K = {spec.k}, G = {spec.group}")  # fmt: skip
        problem = build_problem()
        if problem:
            return False, problem
        if not available_paths(spec.act_dtype):
            return False, f"{cls.name} needs AVX2 + FMA"
        return True, None

    def __init__(self, spec: LayerSpec, device: torch.device | None = None,
                 plan: Sequence[int] | None = None) -> None:  # fmt: skip
        super().__init__(spec, device)
        paths = available_paths(spec.act_dtype)
        self.plan = list(plan) if plan is not None else default_plan(spec.act_dtype, paths, spec.bits)

    @classmethod
    def variant(cls, spec: LayerSpec, device: torch.device) -> tuple[object, ...]:
        """As every kernel's, plus ``EASYQUANT_CPU_PLAN``: the plan it sets is what the self-check ran, so a check
        passed under one plan is not reused under another in the same process."""
        return (*super().variant(spec, device), os.environ.get(ENV_PLAN, ""))

    @property
    def check_tolerance_floor(self) -> float:
        """The self-check's bound is at least this (:func:`.select.check_tolerance`): nonzero with the i8 path."""
        return I8_CHECK_TOLERANCE if PATHS.index("i8") in self.plan[1::2] else 0.0

    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The op's layout; format version 2 adds ``zeros`` (uint8, blocked like the steps) and ``col_scale``
        (fp32 ``[K]``) where the weight has them. Format version 3: ``scales`` are the uint8 multipliers and
        ``zeros`` the sixteenths of a code (both blocked), plus ``row_steps`` (the rows' units, fp32 ``[N]``:
        widened once here, so that the op multiplies without converting)."""
        w_q, scales = repack(qw.qweight, qw.scales)
        o = qw.outliers
        tensors = {"w_q": w_q, "scales": scales, "indptr": o.indptr.contiguous(), "indices": o.indices.contiguous(),
                   "values": o.values.float().contiguous()}  # fmt: skip
        if qw.zeros is not None:
            tensors["zeros"] = _blocks(qw.zeros.to(torch.uint8))
        if qw.col_scale is not None:
            tensors["col_scale"] = qw.col_scale.float().contiguous()
        if qw.row_steps is not None:
            tensors["row_steps"] = qw.row_steps.float().contiguous()
        return tensors

    def meta(self) -> list[int]:
        s = self.spec
        return [s.n, s.group_size, int(s.zero_points), int(s.column_scale), int(s.compact_steps), *self.plan]

    def apply_tensors(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The op's tensor list: :attr:`TENSORS`, then ``zeros``, ``col_scale`` and ``row_steps`` where the layer
        has them."""
        return [tensors[t] for t in (*self.TENSORS, *OPTIONAL_TENSORS) if t in tensors]

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The C++ op is the traced call itself (no Python between the compiled graph and the kernel): it
        # picks the path by M at run time from the plan.
        x2 = x.reshape(-1, self.spec.k)
        t = tensors
        y = torch.ops.easyquant.cpu_int4_linear(x2, t["w_q"], t["scales"], t.get("zeros"), t.get("col_scale"),
                                                t["indptr"], t["indices"], t["values"], bias, self.spec.group_size,
                                                self.plan, t.get("row_steps"))  # fmt: skip
        return y.reshape(*x.shape[:-1], self.spec.n)

    @classmethod
    def forward(cls, w: Sequence[torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
                meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
        """The same C++ op, for callers that go through ``easyquant::linear`` (``apply`` calls it directly)."""
        w_q, scales, indptr, indices, values, *rest = w
        zeros = rest.pop(0) if meta[2] else None
        col_scale = rest.pop(0) if meta[3] else None
        row_steps = rest.pop(0) if meta[4] else None
        return torch.ops.easyquant.cpu_int4_linear(x, w_q, scales, zeros, col_scale, indptr, indices, values, bias,
                                                   meta[1], list(meta[5:]), row_steps)  # fmt: skip

    @classmethod
    def check_batches(cls, spec: LayerSpec, device: torch.device) -> tuple[int, ...]:
        # Every path of the plans above and their row tiles: 1-2 rows, 3-8, one and several 16-row slices,
        # beyond 64 rows, beyond the last bound. The i16 path's tiles of 1, 2, 3 and 4 rows: M = 1, 2, 3, and 9
        # (4 + 4 + 1); 70 = 17 x 4 + 2 crosses many tiles.
        return (1, 2, 3, 9, 17, 70, 150)


def _fake(x, w_q, scales, zeros, col_scale, indptr, indices, values, bias,  # type: ignore[no-untyped-def]
          group_size, plan, row_steps=None):  # fmt: skip
    return x.new_empty((x.shape[0], indptr.shape[0] - 1))


_registered_fake = False


def _moe_fake(x, topk_ids, topk_weights, *weights_and_meta):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape)


def register_fake() -> None:
    """The ops' shape functions for torch.compile (once the library that defines the ops is loaded)."""
    global _registered_fake
    if not _registered_fake:
        torch.library.register_fake("easyquant::cpu_int4_linear", _fake)
        torch.library.register_fake("easyquant::cpu_int4_moe", _moe_fake)
        _registered_fake = True
