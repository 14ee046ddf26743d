"""The mixture-of-experts layer on CUDA: experts stacked at load, launch plans, the forward inside ``easyquant::moe``.

The layer runs as six fixed-shape steps on torch's current stream (cuda/eq_moe.cu, top of the file): the routing
kernel groups the ``P = M * topk`` (token, slot) pairs by expert and cuts each expert's rows into tiles; the rows of
x are gathered in that order; ``w13`` (up), SiLU-gate, ``w2`` (down, scaled by the router weight) and the sum over
the slots follow. Which experts got how many tokens never leaves the device: every grid is sized from ``M``,
``topk``, ``E`` and the layer shape alone (:func:`tile_bounds`), blocks without a tile return at once, so vLLM can
trace the op once and capture it in CUDA graphs per batch size.

Per projection the layout decides the products, as in the dense kernel (docs/kernels.md, "Dispatch"): the
tensor-core layout where ``N % 16 == 0``, ``K % 64 == 0`` and the GPU is sm_80+ (8/16/32/64-row tiles), else the
checkpoint's layout and the CUDA-core GEMV (1/2/4/8/16-row tiles). Within a projection each expert's tokens take the
smallest tile that holds them: an expert with a token or few in decode runs one small tile, one with many runs
64-row (or 16-row) tiles.

Launches go through :data:`cuda_int4.launcher` as :class:`~.cuda_int4.LaunchPlan` objects (raw device addresses, no
DLPack), so tests run the same plans on a host build of the same kernels. Status: compiled and run on host threads
in tests; not yet run on a GPU (docs/kernels.md, "Mixture of experts").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quant import QuantizedWeight
from . import cuda_int4
from .base import check_csr_ends, count
from .cuda_build import GEMV_BATCH_TILES, MMA_BATCH_TILES, MMA_WARPS
from .cuda_int4 import (
    THREADS,
    LaunchPlan,
    _group_ok,
    _require,
    _variant,
    split_col_scale,
    v2_tensors,
    v3_tensors,
)
from .mma_layout import to_mma_layout

MMA_TILES = tuple(8 * t for t in MMA_BATCH_TILES)
"""Tile heights (rows of one expert) of the tensor-core products: 8, 16, 32, 64 (eq_moe_mma_int4_*_t1..t8)."""
GEMV_TILES = GEMV_BATCH_TILES
"""Tile heights of the CUDA-core products: 1, 2, 4, 8, 16 (eq_moe_gemv_int4_*_m1..m16)."""
MAX_EXPERTS = 1024
"""= kMoeMaxExperts in cuda/eq_moe.cu: the routing counts experts in shared memory."""
MAX_CLASSES = 5
"""= kMoeMaxClasses: rows of the routing's tile table per stage (the GEMV's five heights)."""
ROUTE_THREADS = 256  # one block: P / 256 pairs per thread, E / 256 experts
ELEMENTWISE_THREADS = 256
ELEMENTWISE_BLOCKS_PER_SM = 4  # the SiLU-gate and the sum loop over rows: a few blocks per SM suffice
HOST_SMS = 2
"""What :func:`device_sms` answers for a CPU device (tests run the plans on host threads)."""
CHUNK_PAIRS = 8192
"""Most (token, slot) pairs one pass takes. The workspaces grow with them (fp32 ``[P, 2I]`` and ``[P, H]``, the
gathered ``[P, H]`` activations): a larger batch (prefill) runs in chunks of tokens, each a full pass over the
experts it routes to. Decode batches (up to 1024 tokens at top-8) take one pass, as CUDA graphs hold them."""
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}


def tile_bounds(heights: Sequence[int], pairs: int, experts: int) -> tuple[int, ...]:
    """The most tiles each height class can receive, from the batch shape alone (grids must not depend on routing).

    ``heights`` ascending powers of two; class ``c`` takes tiles of ``heights[c-1] < rows <= heights[c]`` (the first
    class from 1 row): each expert's remainder after full top-height tiles, and the full tiles themselves in the top
    class. A lower class gets at most one tile per expert, each holding more than ``heights[c-1]`` of the ``pairs``
    rows; a top tile holds more than ``heights[-2]`` rows, and there are at most ``pairs // top`` full ones plus one
    remainder per expert.
    """
    out = []
    for c, height in enumerate(heights):
        lower = heights[c - 1] if c else 0
        if c < len(heights) - 1:
            out.append(min(experts, pairs // (lower + 1)))
        else:
            out.append(min(pairs // (lower + 1), pairs // height + experts))
    return tuple(out)


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (:data:`HOST_SMS` for a CPU device): sizes the row-looping kernels."""
    if device.type != "cuda":
        return HOST_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


# --- load time: the experts stacked in the kernels' layouts ----------------------------------------------------


def stack_projection(weights: Sequence[QuantizedWeight], mma: bool, version: int,
                     split: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """One projection of every expert (each ``[N, K]``, canonical) -> the stacked tensors of cuda/eq_moe.cu.

    ``qweight``: ``[E, N/16, K/64*128]`` int32 in the tensor-core layout (``mma``), else the checkpoint's
    ``[E, N, K/8]``; ``scales [E, N, K/G]`` fp16; the outliers as one running CSR over all ``E * N`` rows
    (``indptr [E*N + 1]`` int32, ``indices``/``values [nnz]`` int32/fp16); with format ``version`` 2 also ``zeros
    [E, N, K/G]`` uint8 and ``col_scale [E, K]`` fp16, or ``[E, 2K]`` (:func:`split_col_scale`) with ``split``
    (tensor cores, bf16 activations). Version 3 stacks the dense kernels' layout of :func:`v3_tensors`: ``scales
    [E, N]`` fp16 (the row units), ``zeros [E, N, K/G, 2]`` uint8 (the ``(a, zq)`` pairs) and ``col_scale`` as in
    version 2. Each stacked tensor is filled expert by expert (the peak is one expert's temporaries), on the experts'
    device.
    """
    n, k = weights[0].shape
    g = k if weights[0].group_size == -1 else weights[0].group_size
    e, dev = len(weights), weights[0].qweight.device
    first = to_mma_layout(weights[0].qweight) if mma else weights[0].qweight
    qweight = torch.empty(e, *first.shape, dtype=torch.int32, device=dev)
    scales = torch.empty(e, n, *(() if version == 3 else (k // g,)), dtype=torch.float16, device=dev)
    extra = {}  # versions 2 and 3: zeros, col_scale
    if version > 1:
        extra["zeros"] = torch.empty(e, n, k // g, *((2,) if version == 3 else ()), dtype=torch.uint8, device=dev)
        extra["col_scale"] = torch.empty(e, 2 * k if split else k, dtype=torch.float16, device=dev)
    for i, w in enumerate(weights):
        if w.shape != (n, k):
            raise ValueError(f"expert {i}: weight is {list(w.shape)}, expert 0's is {[n, k]}")
        qweight[i] = first if i == 0 else (to_mma_layout(w.qweight) if mma else w.qweight)
        if version == 3:
            scales[i], extra["zeros"][i], c = v3_tensors(w)
        else:
            scales[i] = w.scales
        if version == 2:
            z, c = v2_tensors(w.zeros, w.col_scale, n, k, g)
            extra["zeros"][i] = z
        if version > 1:
            extra["col_scale"][i] = split_col_scale(c) if split else c
    nnz = [w.outliers.nnz for w in weights]
    if sum(nnz) >= 2**31:
        raise ValueError(f"{sum(nnz)} outliers over all experts: the kernels index them with int32")
    base = torch.cumsum(torch.tensor([0, *nnz[:-1]], dtype=torch.int64), 0)
    rows = [w.outliers.indptr[:-1].long() + b for w, b in zip(weights, base.tolist(), strict=True)]
    out = {
        "qweight": qweight,
        "scales": scales,
        "indptr": torch.cat([*rows, torch.tensor([sum(nnz)], device=dev)]).to(torch.int32),
        "indices": torch.cat([w.outliers.indices for w in weights]).to(torch.int32),
        "values": torch.cat([w.outliers.values for w in weights]).to(torch.float16),
    }
    return {**out, **extra}


# --- run time ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """One stacked projection as the op receives it (see :func:`stack_projection`); ``zeros``/``col_scale`` are None
    for format version 1; version 3's ``scales`` are the row units ``[E, N]`` and its ``zeros`` the ``(a, zq)``
    pairs ``[E, N, K/G, 2]``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    zeros: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None

    def check(self, name: str, experts: int, n: int, k: int, group_size: int, mma: bool, dtype: torch.dtype) -> int:
        """Validate against the layer's shape (``n``, ``k``: this projection's ``[N, K]``); returns ``G``. The errors
        name the tensor and what it is."""
        q, where = self.qweight, f"easyquant CUDA MoE kernel, {name}"
        g = k if group_size == -1 else group_size
        qshape = (experts, n // 16, k // 64 * 128) if mma else (experts, n, k // 8)
        _require(k % 32 == 0 and _group_ok(k, g) and (not mma or (n % 16 == 0 and k % 64 == 0)),
                 f"{name}: needs K % 32 == 0 and a power-of-two group size >= 32 dividing K (tensor cores also "
                 f"N % 16 == 0, K % 64 == 0); got N = {n}, K = {k}, G = {g}")  # fmt: skip
        _require(q.dtype == torch.int32 and tuple(q.shape) == qshape,
                 f"{name} qweight must be int32 {list(qshape)}, got {q.dtype} {list(q.shape)}")  # fmt: skip
        version = 1 if self.zeros is None else 3 if self.zeros.dim() == 4 else 2  # v3: pairs [E, N, K/G, 2]
        steps = [experts, n] if version == 3 else [experts, n, k // g]  # version 3: the row units
        _require(self.scales.dtype == torch.float16 and list(self.scales.shape) == steps,
                 f"{name} scales must be float16 {steps}, got {self.scales.dtype} "
                 f"{list(self.scales.shape)}")  # fmt: skip
        check_csr_ends(self.indptr, self.indices, self.values, experts * n, where)
        _require(self.indices.dtype == torch.int32 and self.values.dtype == torch.float16,
                 f"{name} outlier indices/values must be int32/float16, got {self.indices.dtype} / "
                 f"{self.values.dtype}")  # fmt: skip
        _require(experts * n < 2**31 and experts * 2 * k < 2**31, f"{name}: {experts} experts of {n} x {k} "
                 "exceed the kernels' int32 row and column indices")  # fmt: skip
        named = [("qweight", q), ("scales", self.scales), ("indptr", self.indptr), ("indices", self.indices),
                 ("values", self.values)]  # fmt: skip
        if self.zeros is not None or self.col_scale is not None:
            _require(self.zeros is not None and self.col_scale is not None, f"{name}: zeros and col_scale go together")
            assert self.zeros is not None and self.col_scale is not None
            kc = 2 * k if mma and dtype == torch.bfloat16 else k  # the tensor cores take bf16's exact hi/lo split
            zshape = [experts, n, k // g, *([2] if version == 3 else [])]  # version 3: the (a, zq) pairs
            _require(self.zeros.dtype == torch.uint8 and list(self.zeros.shape) == zshape,
                     f"{name} zeros must be uint8 {zshape}, got {self.zeros.dtype} "
                     f"{list(self.zeros.shape)}")  # fmt: skip
            _require(self.col_scale.dtype == torch.float16 and tuple(self.col_scale.shape) == (experts, kc),
                     f"{name} col_scale must be float16 {[experts, kc]}, got {self.col_scale.dtype} "
                     f"{list(self.col_scale.shape)}")  # fmt: skip
            named += [("zeros", self.zeros), ("col_scale", self.col_scale)]
        for what, t in named:
            _require(t.is_contiguous() and t.device == q.device,
                     f"{name} {what} must be contiguous and on {q.device}, got {t.device}")  # fmt: skip
        for what, t in (("qweight", q), ("col_scale", self.col_scale)):
            _require(t is None or t.data_ptr() % 16 == 0, f"{name} {what} must be 16-byte aligned (128-bit loads)")
        _require(version != 3 or self.zeros is None or self.zeros.data_ptr() % 2 == 0,
                 f"{name} zeros (version 3) must be 2-byte aligned (16-bit loads)")  # fmt: skip
        return g


def route_plan(ids: torch.Tensor, weights: torch.Tensor, src_rows: torch.Tensor, y_rows: torch.Tensor,
               y_scale: torch.Tensor, tiles: torch.Tensor, num_tiles: torch.Tensor, topk: int, experts: int,
               heights_up: Sequence[int], heights_down: Sequence[int]) -> LaunchPlan:  # fmt: skip
    """``eq_moe_route``: ``ids``/``weights [P]`` int32/fp32 -> the sorted order and both stages' tile tables
    (``tiles [2, MAX_CLASSES, T, 3]``, ``num_tiles [2, MAX_CLASSES]`` int32). One block."""
    return LaunchPlan("eq_moe.cu", "eq_moe_route", 1,
                      (ids, weights, src_rows, y_rows, y_scale, tiles, num_tiles, ids.numel(), topk, experts,
                       heights_up[0], len(heights_up), heights_down[0], len(heights_down), tiles.shape[2]),
                      threads=ROUTE_THREADS)  # fmt: skip


def gemm_plans(x: torch.Tensor, w: Projection, tiles: torch.Tensor, num_tiles: torch.Tensor,
               y_rows: torch.Tensor | None, y_scale: torch.Tensor | None, y: torch.Tensor, n: int, k: int, g: int,
               mma: bool, bounds: Sequence[int]) -> list[LaunchPlan]:  # fmt: skip
    """One launch per tile class with room for tiles: ``x [P, K]`` (sorted rows) through ``w`` into ``y [*, N]``
    fp32 (``y_rows``/``y_scale``: the down stage's scatter and router weights, None for the up stage). Grid: the
    class's bound times the blocks one tile needs (16 weight rows per tensor-core block, 8 per GEMV block)."""
    kind, letter, heights = ("mma", "t", MMA_TILES) if mma else ("gemv", "m", GEMV_TILES)
    row_blocks = n // 16 if mma else -(-n // (THREADS // 32 * 2))
    variant = _variant(w.scales, w.zeros)
    plans = []
    for c, (height, bound) in enumerate(zip(heights, bounds, strict=True)):
        if bound == 0:
            continue
        tile = height // 8 if mma else height
        plans.append(LaunchPlan("eq_moe.cu", f"eq_moe_{kind}_int4_{_SUFFIX[x.dtype]}_{letter}{tile}{variant}",
                                row_blocks * bound,
                                (x, w.qweight, w.scales, w.zeros, w.col_scale, w.indptr, w.indices, w.values, tiles[c],
                                 num_tiles[c : c + 1], y_rows, y_scale, y, bound, n, k, g),
                                threads=32 * MMA_WARPS if mma else THREADS))  # fmt: skip
    return plans


def silu_mul_plan(h: torch.Tensor, a: torch.Tensor, sms: int) -> LaunchPlan:
    """``a [P, I] = silu(h[:, :I]) * h[:, I:]`` (``h [P, 2I]`` fp32): a few blocks per SM, rows in a loop."""
    p, inter = a.shape
    return LaunchPlan("eq_moe.cu", f"eq_moe_silu_mul_{_SUFFIX[a.dtype]}", min(p, ELEMENTWISE_BLOCKS_PER_SM * sms),
                      (h, a, p, inter), threads=ELEMENTWISE_THREADS)  # fmt: skip


def sum_plan(y_pair: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, topk: int, experts: int,
             sms: int) -> LaunchPlan:  # fmt: skip
    """``y [M, H]`` = the sum over each token's ``topk`` rows of ``y_pair [M*topk, H]`` (fp32, slot order)."""
    m, hidden = y.shape
    return LaunchPlan("eq_moe.cu", f"eq_moe_sum_{_SUFFIX[y.dtype]}", min(m, ELEMENTWISE_BLOCKS_PER_SM * sms),
                      (y_pair, ids, y, m, topk, hidden, experts), threads=ELEMENTWISE_THREADS)  # fmt: skip


def moe_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, up: Projection,
                down: Projection, experts: int, inter: int, group_size: int, mma_up: bool,
                mma_down: bool) -> torch.Tensor:  # fmt: skip
    """``x [M, H]`` fp16/bf16 and the router's ``topk_ids``/``topk_weights [M, topk]`` -> ``[M, H]`` in x's dtype:
    this rank's sum over each token's experts (docs/format.md). Runs inside the op: eager, no host synchronisation."""
    _require(x.dtype in _SUFFIX and x.dim() == 2, f"x must be fp16/bf16 [M, H], got {x.dtype} {list(x.shape)}")
    m, hidden = x.shape
    _require(topk_ids.dim() == 2 and topk_ids.shape[0] == m and topk_weights.shape == topk_ids.shape,
             f"topk_ids/topk_weights must be [{m}, topk] each, got {list(topk_ids.shape)} / "
             f"{list(topk_weights.shape)}")  # fmt: skip
    topk = topk_ids.shape[1]
    pairs = m * topk
    g_up = up.check("w13", experts, 2 * inter, hidden, group_size, mma_up, x.dtype)
    g_down = down.check("w2", experts, hidden, inter, group_size, mma_down, x.dtype)
    if pairs == 0:
        return x.new_zeros(x.shape)
    chunk = max(1, CHUNK_PAIRS // topk)  # tokens per pass
    if m > chunk:  # a loop over fixed token ranges (from M alone), never over the routing
        return torch.cat([moe_forward(x[i : i + chunk], topk_ids[i : i + chunk], topk_weights[i : i + chunk], up,
                                      down, experts, inter, group_size, mma_up, mma_down)
                          for i in range(0, m, chunk)])  # fmt: skip
    count("cuda-int4", f"moe-w13-{'mma' if mma_up else 'gemv'}")
    count("cuda-int4", f"moe-w2-{'mma' if mma_down else 'gemv'}")
    dev, launch = x.device, cuda_int4.launcher.launch
    heights_up, heights_down = (MMA_TILES if mma_up else GEMV_TILES), (MMA_TILES if mma_down else GEMV_TILES)
    bounds_up, bounds_down = tile_bounds(heights_up, pairs, experts), tile_bounds(heights_down, pairs, experts)
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    src_rows, y_rows = (torch.empty(pairs, dtype=torch.int32, device=dev) for _ in range(2))
    y_scale = torch.empty(pairs, dtype=torch.float32, device=dev)
    tiles = torch.empty(2, MAX_CLASSES, max(*bounds_up, *bounds_down), 3, dtype=torch.int32, device=dev)
    num_tiles = torch.empty(2, MAX_CLASSES, dtype=torch.int32, device=dev)
    launch(route_plan(ids, weights, src_rows, y_rows, y_scale, tiles, num_tiles, topk, experts, heights_up,
                      heights_down))  # fmt: skip
    xs = x.contiguous().index_select(0, src_rows)  # [P, H]: row s is sorted row s's token
    h = torch.empty(pairs, 2 * inter, dtype=torch.float32, device=dev)
    for plan in gemm_plans(xs, up, tiles[0], num_tiles[0], None, None, h, 2 * inter, hidden, g_up, mma_up, bounds_up):
        launch(plan)
    a = torch.empty(pairs, inter, dtype=x.dtype, device=dev)
    sms = device_sms(dev)
    launch(silu_mul_plan(h, a, sms))
    y_pair = torch.empty(pairs, hidden, dtype=torch.float32, device=dev)
    for plan in gemm_plans(a, down, tiles[1], num_tiles[1], y_rows, y_scale, y_pair, hidden, inter, g_down, mma_down,
                           bounds_down):  # fmt: skip
        launch(plan)
    y = torch.empty(m, hidden, dtype=x.dtype, device=dev)
    launch(sum_plan(y_pair, ids, y, topk, experts, sms))
    return y


__all__ = ["GEMV_TILES", "MAX_EXPERTS", "MMA_TILES", "Projection", "device_sms", "gemm_plans", "moe_forward",
           "route_plan", "silu_mul_plan", "stack_projection", "sum_plan", "tile_bounds"]  # fmt: skip
