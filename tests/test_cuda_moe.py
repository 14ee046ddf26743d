"""The CUDA mixture-of-experts layer without a GPU: routing, launch plans and kernels on host threads; GPU tests.

``CudaInt4MoeKernel`` runs here exactly as on a GPU up to the launch: its prepare, the ``easyquant::moe`` op, the
forward with its fixed-shape plans, and :func:`kernel_args`' marshalling. The launches then go to a host build of
cuda/eq_moe.cu (tests/cuda_emulation.py) instead of CuPy. Compile checks (nvcc, NVRTC) and the SASS checks of
eq_moe.cu are in tests/test_cuda_kernels.py with the dense kernels'.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.nvrtc import KERNEL_NAMES
from easyquant_vllm.kernels import cuda_int4, cuda_moe, dispatch_counts, reset_dispatch_counts, select
from easyquant_vllm.kernels.cuda_build import CUDA_DIR
from easyquant_vllm.kernels.mma_layout import from_mma_layout
from easyquant_vllm.kernels.moe import (
    CudaInt4MoeKernel,
    MoeSpec,
    NativeCpuMoeKernel,
    TorchReferenceMoeKernel,
    choose_moe_kernel,
    moe_dense,
)
from easyquant_vllm.quant import QuantSpec, quantize_group
from easyquant_vllm.sharding import stack_rows
from tests.conftest import heavy_tailed
from tests.cuda_emulation import EmulatedLauncher, build_library, entry_signatures, force_v3_edges

HOST = torch.device("cpu")  # where the emulated "GPU" keeps its tensors


@pytest.fixture(scope="module")
def emulation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_library(tmp_path_factory.mktemp("moe_emu") / "moe_emu.so", "-O2")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def gpu(emulation: Path, monkeypatch: pytest.MonkeyPatch) -> EmulatedLauncher:
    """A working sm_80+ 'GPU' whose launches run on host threads, and a fresh self-check cache."""
    launcher = EmulatedLauncher(emulation)
    monkeypatch.setattr(cuda_int4, "launcher", launcher)
    monkeypatch.setattr(cuda_int4, "_has_mma", lambda device: True)
    monkeypatch.setattr(cuda_int4, "cuda_runtime_problem", lambda: None)
    monkeypatch.setattr(select, "_checked", {})
    monkeypatch.setattr(select, "_warned", set())
    monkeypatch.delenv(select.ENV_FORCE, raising=False)
    return launcher


def _experts(e: int, hidden: int, inter: int, version: int, group: int, outliers: str = "3sigma",
             column_scale: bool = True) -> list:  # type: ignore[type-arg]  # fmt: skip
    """``(w13 [2I, H], w2 [H, I])`` per expert, gate and up quantized together (one column scale in versions 2, 3).
    ``outliers``: "3sigma" (the format's default), "none", or "many" (1 sigma, up to 20 %: hundreds in some rows);
    the last row of every down projection is zero, so it has none. Version 3 without ``column_scale`` normalizes
    nothing; its experts get the edge cases of :func:`force_v3_edges`."""
    over = {"3sigma": {}, "none": {"outlier_threshold": 0.0},
            "many": {"outlier_threshold": 1.0, "max_outlier_fraction": 0.2}}[outliers]  # fmt: skip
    if not column_scale:
        over["normalize"] = "none"
    if version == 3:  # one-byte steps and zeros: the kernels' whole range (6-bit ones unpack into the same bytes)
        over["meta_bits"] = 8
    spec = QuantSpec.for_version(version, group_size=group, **over)
    out = []
    for i in range(e):
        gate_up = [heavy_tailed(inter, hidden, seed=10 * i + 1), heavy_tailed(inter, hidden, seed=10 * i + 2)]
        gate, up = quantize_group(gate_up, spec)
        w = heavy_tailed(hidden, inter, seed=10 * i + 3)
        w[-1] = 0.0
        w13, w2 = stack_rows([gate, up]), quantize_group([w], spec)[0]
        out.append((force_v3_edges(w13), force_v3_edges(w2)) if version == 3 else (w13, w2))
    return out


def _spec(e: int, hidden: int, inter: int, group: int, dtype: torch.dtype, version: int,
          column_scale: bool = True) -> MoeSpec:  # fmt: skip
    """The layer's spec for experts of format ``version`` (as :func:`_experts` quantizes them)."""
    return MoeSpec(e, hidden, inter, 4, group, dtype, "cuda", zero_points=version > 1,
                   column_scale=version > 1 and column_scale, compact_steps=version == 3)  # fmt: skip


def _dense(experts) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    return (torch.stack([a.dequantize(torch.float64) for a, _ in experts]),
            torch.stack([b.dequantize(torch.float64) for _, b in experts]))  # fmt: skip


def _rounded_like_the_kernel(x, ids, weights, w13, w2, dtype) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The layer in float64 with the kernel's two roundings: SiLU-gate output to ``dtype`` (it feeds w2's
    kernel), the final sum to ``dtype``; pairs with an id outside [0, E) contribute nothing."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    inter = w13.shape[1] // 2
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < w13.shape[0]:
                h = w13[e] @ x[t].double()
                a = (F.silu(h[:inter]) * h[inter:]).to(dtype).double()
                y[t] += float(weights[t, j]) * (w2[e] @ a)
    return y.to(dtype).double()


def designed_routing(e: int = 7) -> torch.Tensor:
    """``[40, 2]``: expert 0 gets 35 tokens, 1 gets 1, 2 gets 5, 3 gets 21, 4 gets 12, 5 gets 6, 6 none. Tensor
    cores: tile classes 8 (experts 1, 2, 5), 16 (4), 32 (3), 64 (0); GEMV: 1, 4 and 8 (remainders) and 16."""
    ids = torch.zeros(40, 2, dtype=torch.int64)
    ids[:35, 0], ids[35:, 0] = 0, 2
    ids[0, 1], ids[1:22, 1], ids[22:34, 1], ids[34:, 1] = 1, 3, 4, 5
    assert e >= 7
    return ids


def _routing(kind: str, m: int, topk: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "designed":
        return designed_routing(e)[:m, :topk]
    if kind == "one":  # every token to expert 3: the top tile class repeats, the rest goes to a small tile
        return torch.full((m, topk), 3, dtype=torch.int64)
    return torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(m)])


# (M, topk, routing, H, I, group, version, dtype, outliers). The layouts follow from H and I: both tensor cores
# (128, 64), both GEMV (96, 32: K % 64 != 0 for w13 and w2), or one of each (128, 96: w2 GEMV; 96, 64: w13 GEMV).
LAYER_CASES = [
    (1, 2, "random", 128, 64, 64, 2, torch.bfloat16, "3sigma"),
    (1, 2, "random", 96, 32, 32, 1, torch.float16, "3sigma"),
    (3, 1, "random", 128, 64, 64, 1, torch.float16, "none"),
    (3, 1, "random", 96, 32, 32, 2, torch.bfloat16, "many"),
    (40, 2, "designed", 128, 64, 64, 2, torch.bfloat16, "many"),
    (40, 2, "designed", 128, 64, 64, 1, torch.float16, "3sigma"),
    (40, 2, "designed", 96, 32, 32, 2, torch.float16, "3sigma"),
    (40, 2, "designed", 128, 96, 32, 1, torch.bfloat16, "many"),
    (40, 1, "designed", 96, 64, 32, 2, torch.float16, "none"),
    (72, 1, "one", 128, 64, 64, 2, torch.float16, "3sigma"),
    (40, 2, "designed", 128, 64, -1, 2, torch.bfloat16, "3sigma"),  # per channel: G = K
    (3, 2, "random", 576, 64, 64, 2, torch.float16, "3sigma"),  # w13: 9 k-blocks over 8 warps
]


@pytest.mark.parametrize(("m", "topk", "routing", "hidden", "inter", "group", "version", "dtype", "outliers"),
                         LAYER_CASES)  # fmt: skip
def test_moe_layer_emulated_matches_reference(gpu: EmulatedLauncher, m: int, topk: int, routing: str, hidden: int,
                                              inter: int, group: int, version: int, dtype: torch.dtype,
                                              outliers: str) -> None:  # fmt: skip
    _check_layer(gpu, m, topk, routing, hidden, inter, group, version, dtype, outliers)


# Format version 3 (the *_v3 entry points), with zq = 0 and 255, a = 0 and 255 forced into every expert: both layouts
# and mixed, every tile class (the designed routing), groups 32, 64, 128 and per channel, with and without a column
# scale, outliers none, 3 sigma and many (residuals: the dense part is not 0 under them).
V3_LAYER_CASES = [  # (M, topk, routing, H, I, group, dtype, outliers, column scale)
    (1, 2, "random", 128, 64, 64, torch.bfloat16, "3sigma", True),
    (3, 1, "random", 96, 32, 32, torch.float16, "many", True),
    (40, 2, "designed", 128, 64, 32, torch.float16, "many", True),
    (40, 2, "designed", 96, 32, 32, torch.bfloat16, "3sigma", False),
    (40, 2, "designed", 128, 96, -1, torch.bfloat16, "none", True),
    (72, 1, "one", 256, 128, 128, torch.float16, "3sigma", False),
]


@pytest.mark.parametrize(("m", "topk", "routing", "hidden", "inter", "group", "dtype", "outliers", "column_scale"),
                         V3_LAYER_CASES)  # fmt: skip
def test_moe_layer_v3_emulated_matches_reference(gpu: EmulatedLauncher, m: int, topk: int, routing: str, hidden: int,
                                                 inter: int, group: int, dtype: torch.dtype, outliers: str,
                                                 column_scale: bool) -> None:  # fmt: skip
    _check_layer(gpu, m, topk, routing, hidden, inter, group, 3, dtype, outliers, column_scale)
    assert all(name.endswith("_v3") for name in gpu.launched if "_int4_" in name)


def _check_layer(gpu: EmulatedLauncher, m: int, topk: int, routing: str, hidden: int, inter: int, group: int,
                 version: int, dtype: torch.dtype, outliers: str, column_scale: bool = True) -> None:  # fmt: skip
    e = 7
    experts = _experts(e, hidden, inter, version, group, outliers, column_scale)
    if outliers == "many":
        counts = experts[0][1].outliers.indptr.diff()
        assert int(counts.max()) > 8 and int(counts[-1]) == 0  # rows with many outliers, and one with none
    kernel = CudaInt4MoeKernel(_spec(e, hidden, inter, group, dtype, version, column_scale), HOST)
    assert kernel.mma == {"w13": hidden % 64 == 0, "w2": inter % 64 == 0}
    tensors = kernel.prepare(experts)
    ids = _routing(routing, m, topk, e, seed=m)
    weights = torch.softmax(torch.randn(m, topk, generator=torch.Generator().manual_seed(m + 1)), -1)
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(m + 2)).to(dtype)
    y = kernel.apply(tensors, x, ids, weights)
    assert y.dtype == dtype and y.shape == (m, hidden)
    w13, w2 = _dense(experts)
    exact = moe_dense(x.double(), ids, weights.double(), w13, w2)
    rounded = _rounded_like_the_kernel(x, ids, weights, w13, w2, dtype)
    scale = exact.abs().mean()
    # Against the float64 layer rounded where the kernel rounds (the activation feeding w2, the output): Marlin's
    # criterion, mean |error| / mean |reference| < 1e-3. The tensor cores with a column scale round x * c to the
    # activation type once more (cuda/eq_mma.cu): bf16 gets 4e-3 there. Against the unrounded layer the roundings
    # themselves count: bf16 (8 significant bits) rounds twice per product chain, ~3e-3 measured.
    extra_bf16 = dtype == torch.bfloat16 and version > 1
    assert float((y.double() - rounded).abs().mean() / scale) < (4e-3 if extra_bf16 else 1e-3)
    assert float((y.double() - exact).abs().mean() / scale) < (1e-3 if dtype == torch.float16 else 8e-3)
    ran = {name.split("_int4_")[0] for name in gpu.launched if "_int4_" in name}
    assert ran == {f"eq_moe_{'mma' if kernel.mma[p] else 'gemv'}" for p in ("w13", "w2")}


def test_moe_layer_emulated_runs_a_large_batch_in_chunks(gpu: EmulatedLauncher,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # Prefill-sized batches run in chunks of tokens (bounded workspaces): 40 tokens at top-2 in passes of 8 pairs
    # give the same result as one pass.
    experts = _experts(7, 128, 64, 2, 64)
    kernel = CudaInt4MoeKernel(MoeSpec(7, 128, 64, 4, 64, torch.float16, "cuda", True, True), HOST)
    tensors = kernel.prepare(experts)
    x, ids, w = torch.randn(40, 128).half(), designed_routing(), torch.rand(40, 2)
    whole = kernel.apply(tensors, x, ids, w)
    routed = gpu.launched["eq_moe_route"]
    monkeypatch.setattr(cuda_moe, "CHUNK_PAIRS", 8)
    assert torch.equal(kernel.apply(tensors, x, ids, w), whole)  # each row is computed alone: bit-identical
    assert gpu.launched["eq_moe_route"] == routed + 10


def test_moe_layer_emulated_ignores_expert_ids_out_of_range(gpu: EmulatedLauncher) -> None:
    # vLLM marks experts of other ranks with -1 under expert parallelism; a bad id must not crash or leak into y.
    experts = _experts(4, 128, 64, 2, 64)
    kernel = CudaInt4MoeKernel(MoeSpec(4, 128, 64, 4, 64, torch.float16, "cuda", True, True), HOST)
    tensors = kernel.prepare(experts)
    ids = torch.tensor([[0, -1], [4, 2], [1, 3]])
    weights = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    x = torch.randn(3, 128).half()
    y = kernel.apply(tensors, x, ids, weights)
    ref = _rounded_like_the_kernel(x, ids, weights, *_dense(experts), torch.float16)
    assert float((y.double() - ref).abs().mean() / ref.abs().mean()) < 1e-3


# --- the routing kernel against a Python reference -------------------------------------------------------------


def _route(ids: torch.Tensor, e: int, heights_up: tuple[int, ...], heights_down: tuple[int, ...]) -> dict:  # type: ignore[type-arg]
    p, topk = ids.numel(), ids.shape[1]
    flat = ids.reshape(-1).to(torch.int32)
    weights = torch.rand(p)
    bounds = [cuda_moe.tile_bounds(h, p, e) for h in (heights_up, heights_down)]
    classes = cuda_moe.MAX_CLASSES
    out = {  # -7: anything the kernel should have written and did not shows
        "src_rows": torch.full((p,), -7, dtype=torch.int32),
        "y_rows": torch.full((p,), -7, dtype=torch.int32),
        "y_scale": torch.full((p,), -7.0),
        "num_tiles": torch.full((2, classes), -7, dtype=torch.int32),
        "tiles": torch.full((2, classes, max(*bounds[0], *bounds[1]), 3), -7, dtype=torch.int32),
    }
    plan = cuda_moe.route_plan(flat, weights, out["src_rows"], out["y_rows"], out["y_scale"], out["tiles"],
                               out["num_tiles"], topk, e, heights_up, heights_down)  # fmt: skip
    cuda_int4.launcher.launch(plan)
    return {**out, "weights": weights, "bounds": bounds}


def _check_route(ids: torch.Tensor, e: int, r: dict, heights: tuple[tuple[int, ...], ...]) -> None:  # type: ignore[type-arg]
    p, topk = ids.numel(), ids.shape[1]
    flat = ids.reshape(-1).tolist()
    valid = [i for i in range(p) if 0 <= flat[i] < e]
    # every pair exactly once; the valid ones first, grouped by expert into one contiguous range each
    assert sorted(r["y_rows"].tolist()) == list(range(p))
    pairs = r["y_rows"].tolist()
    assert r["src_rows"].tolist() == [q // topk for q in pairs]
    assert torch.equal(r["y_scale"], torch.tensor([float(r["weights"][q]) if q in valid else 0.0 for q in pairs]))
    experts_in_order = [flat[q] for q in pairs[: len(valid)]]
    assert sorted(pairs[len(valid) :]) == sorted(set(range(p)) - set(valid))
    ranges: dict[int, tuple[int, int]] = {}
    for s, x in enumerate(experts_in_order):
        lo, _ = ranges.get(x, (s, s))
        assert lo == s or experts_in_order[s - 1] == x, f"expert {x}'s rows are not contiguous"
        ranges[x] = (lo, s + 1)
    for stage, hs in enumerate(heights):
        covered: dict[int, list[tuple[int, int]]] = {}
        for c, hi in enumerate(hs):
            lo = hs[c - 1] if c else 0
            n = int(r["num_tiles"][stage, c])
            expected = sum((cnt // hs[-1] if c == len(hs) - 1 else 0) + (lo < cnt % hs[-1] <= hi)
                           for cnt in (flat.count(x) for x in range(e)))  # fmt: skip
            assert n == expected <= r["bounds"][stage][c], (stage, c, n, expected)
            for x, s0, rows in r["tiles"][stage, c, :n].tolist():
                assert lo < rows <= hi, (stage, c, rows)  # the core's contract: the tile's first half is full
                covered.setdefault(x, []).append((s0, rows))
        for x, spans in covered.items():  # the tiles of an expert cover its rows exactly, none twice
            rows = sorted(s for s0, n in spans for s in range(s0, s0 + n))
            assert rows == list(range(*ranges[x])), (stage, x)
        assert set(covered) == set(ranges)


ROUTE_CASES = [
    (torch.tensor([[3, 1]]), 8),  # decode: two experts, one token each
    (torch.tensor([[2], [2], [5]]), 6),
    (designed_routing(), 7),  # experts with 0, 1, few and many tokens
    (torch.full((150, 1), 3), 4),  # one expert, 150 tokens: two full 64-row tiles and a remainder of 22
    (torch.tensor([[0, -1], [5, 1], [1, 0], [-3, 9]]), 5),  # ids outside [0, E): no tile, sorted last
    (torch.randint(0, 64, (33, 8), generator=torch.Generator().manual_seed(3)), 64),  # many experts, top-8
]


@pytest.mark.parametrize(("ids", "e"), ROUTE_CASES)
def test_route_kernel_groups_pairs_by_expert_and_tiles_them(gpu: EmulatedLauncher, ids: torch.Tensor, e: int) -> None:
    heights = (cuda_moe.MMA_TILES, cuda_moe.GEMV_TILES)
    _check_route(ids, e, _route(ids, e, *heights), heights)


def test_tile_bounds_hold_for_any_split_of_the_pairs() -> None:
    # The grids are sized by these bounds (they may depend on M, topk and E only): no split of the pairs over the
    # experts may produce more tiles of a class than its bound. Adversarial splits: every remainder just above a
    # class's lower height, all pairs on one expert, evenly spread.
    gen = torch.Generator().manual_seed(0)
    for heights in (cuda_moe.MMA_TILES, cuda_moe.GEMV_TILES):
        for pairs, e in ((1, 8), (2, 128), (40, 6), (80, 7), (300, 16), (1000, 64), (4096, 8)):
            splits = [[pairs] + [0] * (e - 1), [pairs // e + (i < pairs % e) for i in range(e)]]
            for lo in (0, *heights[:-1]):
                k = min(e, pairs // (lo + 1))
                splits.append([lo + 1] * k + [0] * (e - k))
            splits += [torch.bincount(torch.randint(0, e, (pairs,), generator=gen), minlength=e).tolist()
                       for _ in range(20)]  # fmt: skip
            bounds = cuda_moe.tile_bounds(heights, pairs, e)
            for counts in splits:
                assert sum(counts) <= pairs
                top = heights[-1]
                for c, hi in enumerate(heights):
                    lo = heights[c - 1] if c else 0
                    n = sum((x // top if c == len(heights) - 1 else 0) + (lo < x % top <= hi) for x in counts)
                    assert n <= bounds[c], (heights, pairs, e, counts, c)


# --- plans, signatures, the emulation library ------------------------------------------------------------------


_C_TYPES = {torch.float16: "__half*", torch.bfloat16: "__nv_bfloat16*", torch.int32: ("int*", "int4*"),
            torch.uint8: "uint8_t*", torch.float32: "float*"}  # fmt: skip


class _Recorder:
    """Records the plans and runs them on the emulation."""

    def __init__(self, inner: EmulatedLauncher) -> None:
        self.inner, self.plans = inner, []  # type: ignore[var-annotated]

    def launch(self, plan) -> None:  # type: ignore[no-untyped-def]
        self.plans.append(plan)
        self.inner.launch(plan)


PLAN_CASES = [(128, 64, torch.bfloat16, 2), (96, 32, torch.float16, 1), (128, 96, torch.float16, 2),
              (128, 96, torch.bfloat16, 3)]  # fmt: skip


@pytest.mark.parametrize(("hidden", "inter", "dtype", "version"), PLAN_CASES)
def test_moe_launch_plans_match_the_kernel_signatures(gpu: EmulatedLauncher, monkeypatch: pytest.MonkeyPatch,
                                                      hidden: int, inter: int, dtype: torch.dtype,
                                                      version: int) -> None:  # fmt: skip
    # What only a GPU run would otherwise show: every launch passes the arguments in the order and C type of its
    # entry point, and its grid covers every weight row for every tile slot.
    sigs = entry_signatures("eq_moe.cu")
    g = 32
    experts = _experts(7, hidden, inter, version, g)
    kernel = CudaInt4MoeKernel(_spec(7, hidden, inter, g, dtype, version), HOST)
    recorder = _Recorder(gpu)
    monkeypatch.setattr(cuda_int4, "launcher", recorder)
    # 24 tokens: every tile class of both layouts is launched (the grids depend on M, topk and E only)
    kernel.apply(kernel.prepare(experts), torch.randn(24, hidden).to(dtype), designed_routing()[:24], torch.rand(24, 2))
    names = [p.name for p in recorder.plans]
    assert names[0] == "eq_moe_route" and names[-1].startswith("eq_moe_sum_")
    up_stage = True  # the products before the SiLU-gate are w13's
    for plan in recorder.plans:
        up_stage = up_stage and not plan.name.startswith("eq_moe_silu_mul")
        params = sigs[plan.name]
        assert len(params) == len(plan.args), plan.name
        for c_type, arg in zip(params, plan.args, strict=True):
            if isinstance(arg, torch.Tensor):
                assert c_type.replace("const ", "").endswith(_C_TYPES[arg.dtype]), (plan.name, c_type, arg.dtype)
            elif arg is None:  # version 1's zeros/colscale, the up stage's y_rows/y_scale
                assert c_type.endswith("*"), (plan.name, c_type)
            else:
                assert c_type == "int" and isinstance(arg, int), (plan.name, c_type, arg)
        if "_int4_" in plan.name:
            x, *_, y_rows, y_scale, y, max_tiles, n, k, _g = plan.args
            mma = "_mma_" in plan.name
            rows_per_block = 16 if mma else plan.threads // 32 * 2
            row_blocks = -(-n // rows_per_block)
            assert plan.grid == row_blocks * max_tiles and (row_blocks - 1) * rows_per_block < n
            assert plan.threads == (256 if mma else 128) and y.shape[1] == n and x.shape[1] == k
            assert (n, k) == ((2 * inter, hidden) if up_stage else (hidden, inter))
            assert (y_rows is None) == (y_scale is None) == up_stage  # only the down stage scatters and weighs
            assert _format_suffix(plan.name) == ("", "_v2", "_v3")[version - 1]


def _format_suffix(name: str) -> str:
    return name[-3:] if name[-3:] in ("_v2", "_v3") else ""


def test_emulation_library_has_every_entry_point(gpu: EmulatedLauncher) -> None:
    for name in KERNEL_NAMES["eq_moe.cu"]:  # status 2: known, but -1 arguments do not fit its signature
        assert gpu.lib.eq_emu_launch(name.encode(), 1, 32, None, -1) == 2, name
    assert gpu.lib.eq_emu_launch(b"eq_moe_nothing", 1, 32, None, 0) == 1


def test_python_constants_match_the_moe_kernel_source() -> None:
    import re

    source = (CUDA_DIR / "eq_moe.cu").read_text()
    assert int(re.search(r"constexpr int kMoeMaxExperts = (\d+);", source).group(1)) == cuda_moe.MAX_EXPERTS
    assert int(re.search(r"constexpr int kMoeMaxClasses = (\d+);", source).group(1)) == cuda_moe.MAX_CLASSES
    assert len(cuda_moe.GEMV_TILES) <= cuda_moe.MAX_CLASSES and len(cuda_moe.MMA_TILES) <= cuda_moe.MAX_CLASSES
    for t in cuda_moe.MMA_TILES:
        assert f"EQ_MOE_GEMM_ENTRY(mma, SUFFIX, T, t, {t // 8}, true)" in source
    for t in cuda_moe.GEMV_TILES:
        assert f"EQ_MOE_GEMM_ENTRY(gemv, SUFFIX, T, m, {t}, false)" in source


# --- the layer as vLLM runs it: one op under torch.compile, kernel choice and self-check ------------------------


def test_moe_op_traces_once_and_routes_at_run_time(gpu: EmulatedLauncher) -> None:
    # vLLM traces apply() with fullgraph and shape guards off: the routing, the tile classes and every launch must
    # happen inside the one op, decided per call from the data.
    experts = _experts(4, 128, 64, 2, 32)
    spec = MoeSpec(4, 128, 64, 4, 32, torch.bfloat16, "cuda", True, True)
    kernel = CudaInt4MoeKernel(spec, HOST)
    tensors = kernel.prepare(experts)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, i, w: kernel.apply(tensors, x, i, w), fullgraph=True, dynamic=True)
    for m in (3, 11):
        gen = torch.Generator().manual_seed(m)  # seeded: 3 tokens are a small sample for a mean-error bound
        x = torch.randn(m, 128, generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(m)])
        w = torch.rand(m, 2, generator=gen)
        reset_dispatch_counts()
        y = compiled(x, ids, w)
        assert torch.equal(y, kernel.apply(tensors, x, ids, w))  # the same launches: bit-identical
        assert dispatch_counts()["cuda-int4:moe-w13-mma"] == 2 and dispatch_counts()["cuda-int4:moe-w2-mma"] == 2
        ref = _rounded_like_the_kernel(x, ids, w, *_dense(experts), torch.bfloat16)
        assert float((y.double() - ref).abs().mean() / ref.abs().mean()) < 4e-3


def test_moe_op_fake_gives_the_output_shape() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.empty(5, 128, dtype=torch.float16))
        ids = mode.from_tensor(torch.empty(5, 2, dtype=torch.int32))
        y = torch.ops.easyquant.moe(x, ids, ids.float(), [], "cuda-int4", [4, 128, 64, 64, 1, 1, 0])
    assert y.shape == (5, 128) and y.dtype == torch.float16


def test_cuda_moe_kernel_declines_with_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = MoeSpec(8, 256, 128, 4, 64, torch.bfloat16, "cuda", True, True)
    assert CudaInt4MoeKernel.can_implement(MoeSpec(8, 256, 128, 4, 64, torch.bfloat16, "cpu")) == (
        False, "cuda-int4 runs on CUDA devices only")  # fmt: skip
    assert not CudaInt4MoeKernel.can_implement(MoeSpec(2000, 256, 128, 4, 64, torch.bfloat16, "cuda"))[0]
    ok32, why = CudaInt4MoeKernel.can_implement(MoeSpec(8, 256, 128, 4, 64, torch.float32, "cuda"))
    assert not ok32 and why is not None and why.startswith("w13: ") and "fp16/bf16" in why
    monkeypatch.setattr(cuda_int4, "cuda_runtime_problem", lambda: "cuda-int4 needs CuPy (pip install cupy-cuda13x)")
    assert CudaInt4MoeKernel.can_implement(ok) == (False, "w13: cuda-int4 needs CuPy (pip install cupy-cuda13x)")
    monkeypatch.setattr(cuda_int4, "cuda_runtime_problem", lambda: None)
    assert CudaInt4MoeKernel.can_implement(ok) == (True, None)
    # the self-check's small layer keeps each projection's layout (K % 64 decides it)
    for hidden, inter in ((128, 64), (96, 64), (128, 96), (96, 96)):
        spec = MoeSpec(8, hidden, inter, 4, 32, torch.float16, "cuda")
        h, i = CudaInt4MoeKernel.check_shape(spec, HOST)
        assert (h % 64 == 0, i % 64 == 0) == (hidden % 64 == 0, inter % 64 == 0)


@pytest.mark.parametrize("version", [2, 3])
def test_cuda_moe_kernel_is_chosen_after_its_self_check(gpu: EmulatedLauncher, version: int) -> None:
    # Group size 32 and I = 96: w13 (K = H = 256) has the tensor-core layout, w2 (K = 96) the GEMV, in the layer and
    # in its self-check's small layer.
    spec = _spec(16, 256, 96, 32, torch.float16, version)
    kernel, reasons = choose_moe_kernel(spec, HOST, "model.layers.0.mlp.experts")
    assert kernel is CudaInt4MoeKernel and reasons == []
    # the self-check's batches launched every tile class of both layouts, in the layer's format
    launched = [name for name in gpu.launched if "_int4_" in name]
    assert {_format_suffix(name) for name in launched} == {f"_v{version}"}
    tiles = {name[:-3].split("_int4_f16_")[1] for name in launched}
    assert tiles == {"t1", "t2", "t4", "t8", "m1", "m2", "m4", "m8", "m16"}
    launched = sum(gpu.launched.values())
    choose_moe_kernel(spec, HOST)  # the same variant: checked once
    assert sum(gpu.launched.values()) == launched


def test_easyquant_kernel_forces_the_cuda_moe_kernel(gpu: EmulatedLauncher, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MoeSpec(8, 256, 128, 4, 128, torch.float16, "cuda", True, True)
    monkeypatch.setitem(select._checked, ("cuda-int4", "cpu", *CudaInt4MoeKernel.variant(spec, HOST)), None)
    monkeypatch.setenv(select.ENV_FORCE, "cuda-int4")  # its self-check passed (above): forced, it is chosen
    assert choose_moe_kernel(spec, HOST) == (CudaInt4MoeKernel, [])
    cpu = MoeSpec(8, 256, 128, 4, 128, torch.float16, "cpu", True, True)
    with pytest.raises(ValueError, match=r"EASYQUANT_KERNEL=cuda-int4 cannot run .*: cuda-int4 runs on CUDA devices"):
        choose_moe_kernel(cpu, HOST)


def test_cuda_moe_kernel_failing_its_check_falls_back_and_force_is_an_error(
    gpu: EmulatedLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = MoeSpec(8, 256, 128, 4, 128, torch.bfloat16, "cuda", True, True)

    class Broken:
        def launch(self, plan) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("injected launch failure")

    monkeypatch.setattr(cuda_int4, "launcher", Broken())
    warnings: list[str] = []
    kernel, reasons = select.select_kernel(spec, HOST, (CudaInt4MoeKernel, NativeCpuMoeKernel, TorchReferenceMoeKernel),  # type: ignore[arg-type]
                                           "model.layers.0.mlp.experts", warn=warnings.append)  # fmt: skip
    assert kernel is TorchReferenceMoeKernel and "injected launch failure" in warnings[0]
    assert any(r.startswith("native-int4-cpu: ") for r in reasons)  # declined: not a CPU layer
    monkeypatch.setattr(select, "_checked", {})
    monkeypatch.setenv(select.ENV_FORCE, "cuda-int4")
    with pytest.raises(ValueError, match=r"EASYQUANT_KERNEL=cuda-int4 failed its start-up self-check .*injected"):
        choose_moe_kernel(spec, HOST)


def test_moe_forward_names_a_bad_tensor(gpu: EmulatedLauncher) -> None:
    experts = _experts(4, 128, 64, 2, 64)
    kernel = CudaInt4MoeKernel(MoeSpec(4, 128, 64, 4, 64, torch.float16, "cuda", True, True), HOST)
    tensors = kernel.prepare(experts)
    x, ids, w = torch.randn(2, 128).half(), torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)
    with pytest.raises(ValueError, match=r"x must be fp16/bf16 \[M, H\], got torch.float32"):
        kernel.apply(tensors, x.float(), ids, w)
    with pytest.raises(ValueError, match=r"w2 scales must be float16 \[4, 128, 1\], got torch.float32"):
        kernel.apply({**tensors, "w2_scales": tensors["w2_scales"].float()}, x, ids, w)
    with pytest.raises(ValueError, match=r"w13 col_scale must be float16 \[4, 128\]"):
        kernel.apply({**tensors, "w13_col_scale": tensors["w13_col_scale"][:, :64].contiguous()}, x, ids, w)
    with pytest.raises(ValueError, match=r"topk_ids/topk_weights must be \[2, topk\] each"):
        kernel.apply(tensors, x, ids[:1], w[:1])


def test_prepare_stacks_every_expert_in_the_dense_kernels_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_int4, "_has_mma", lambda device: True)
    experts = _experts(3, 128, 96, 2, 32, "many")
    kernel = CudaInt4MoeKernel(MoeSpec(3, 128, 96, 4, 32, torch.bfloat16, "cuda", True, True), HOST)
    assert kernel.mma == {"w13": True, "w2": False}  # w2's K = 96: no tensor-core layout
    t = kernel.prepare(experts)
    nnz = 0
    for e, (w13, w2) in enumerate(experts):
        assert torch.equal(from_mma_layout(t["w13_qweight"][e], 192, 128), w13.qweight)  # tensor cores
        assert torch.equal(t["w2_qweight"][e], w2.qweight)  # GEMV: the checkpoint's layout
        assert torch.equal(t["w13_scales"][e], w13.scales) and torch.equal(t["w2_zeros"][e], w2.zeros)
        hi_lo = t["w13_col_scale"][e].view(torch.bfloat16).view(-1, 2, 4).float().sum(1).reshape(-1)
        assert torch.equal(hi_lo.half(), w13.col_scale)  # bf16 tensor cores: the exact hi/lo split
        assert torch.equal(t["w2_col_scale"][e], w2.col_scale)  # the GEMV's fp16 column scale
        rows = t["w2_indptr"][e * 128 : (e + 1) * 128 + 1].long()
        assert torch.equal(rows - nnz, w2.outliers.indptr.long())  # one running CSR over all experts' rows
        nnz += w2.outliers.nnz
    assert t["w2_indptr"].numel() == 3 * 128 + 1 and int(t["w2_indptr"][-1]) == nnz == t["w2_values"].numel()


def test_prepare_stacks_version_3_in_the_dense_kernels_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    # Format version 3: per expert, what CudaInt4Kernel.prepare gives a dense layer (v3_tensors): the row units as
    # scales, the (a, zq) pairs as zeros, the column scale (ones where the checkpoint has none; bf16 tensor cores: the
    # hi/lo split).
    monkeypatch.setattr(cuda_int4, "_has_mma", lambda device: True)
    for column_scale in (True, False):
        experts = _experts(3, 128, 96, 3, 32, "3sigma", column_scale)
        kernel = CudaInt4MoeKernel(_spec(3, 128, 96, 32, torch.bfloat16, 3, column_scale), HOST)
        t = kernel.prepare(experts)
        assert kernel.meta()[-1] == 3 and t["w13_zeros"].shape == (3, 192, 4, 2) and t["w2_scales"].shape == (3, 128)
        for e, (w13, w2) in enumerate(experts):
            d, pairs, c = cuda_int4.v3_tensors(w2)
            assert torch.equal(t["w2_scales"][e], d) and torch.equal(t["w2_zeros"][e], pairs)
            assert torch.equal(t["w2_col_scale"][e], c) and bool((c == 1).all()) is not column_scale
            assert torch.equal(pairs[..., 0], w2.scales) and torch.equal(pairs[..., 1], w2.zeros)
            assert torch.equal(t["w13_col_scale"][e], cuda_int4.split_col_scale(cuda_int4.v3_tensors(w13)[2]))


def test_moe_kernels_emulated_have_no_data_races(tmp_path: Path) -> None:
    # ThreadSanitizer over the routing (shared-memory atomics between barriers), the tensor-core tiles (8 warps
    # reduce through shared memory) and the GEMV tiles, in a child process with the TSan runtime preloaded.
    # OMP_NUM_THREADS=1: torch's own (uninstrumented) OpenMP threads would be reported otherwise.
    runtime = subprocess.run(["g++", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if not Path(runtime).is_file():
        pytest.skip("no ThreadSanitizer runtime (libtsan.so)")
    library = build_library(tmp_path / "moe_emu_tsan.so", "-O1", "-g", "-fsanitize=thread")
    script = f"""
import torch
from pathlib import Path
from easyquant_vllm.kernels import cuda_int4
from easyquant_vllm.kernels.moe import CudaInt4MoeKernel, MoeSpec
from tests.cuda_emulation import EmulatedLauncher
from tests.test_cuda_moe import _experts, designed_routing
cuda_int4.launcher = EmulatedLauncher(Path({str(library)!r}))
cuda_int4._has_mma = lambda device: True
kernel = CudaInt4MoeKernel(MoeSpec(7, 128, 32, 4, 32, torch.float16, "cuda", True, True), torch.device("cpu"))
ids = designed_routing()[:6]  # w13 on tensor cores, w2 (K = 32) on the GEMV
kernel.apply(kernel.prepare(_experts(7, 128, 32, 2, 32)), torch.randn(6, 128).half(), ids, torch.rand(6, 2))
print("ok")
"""
    env = {**os.environ, "LD_PRELOAD": runtime, "OMP_NUM_THREADS": "1", "TSAN_OPTIONS": "halt_on_error=1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]  # TSan exits 66 on a report


# --- on a GPU (pytest -m gpu); skipped elsewhere by conftest -----------------------------------------------------

GPU_CASES = [  # (M, topk, routing, H, I, group, version, dtype)
    (1, 2, "random", 1024, 256, 128, 2, torch.bfloat16),
    (4, 8, "random", 2048, 768, 128, 2, torch.float16),
    (40, 2, "designed", 512, 192, 64, 1, torch.bfloat16),
    (72, 1, "one", 512, 96, 32, 2, torch.float16),  # w2: K = 96, the GEMV
    (256, 2, "random", 1024, 512, 128, 2, torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "topk", "routing", "hidden", "inter", "group", "version", "dtype"), GPU_CASES)
def test_gpu_moe_layer_matches_reference(m: int, topk: int, routing: str, hidden: int, inter: int, group: int,
                                         version: int, dtype: torch.dtype) -> None:  # fmt: skip
    e = 8
    experts = _experts(e, hidden, inter, version, group)
    kernel = CudaInt4MoeKernel(MoeSpec(e, hidden, inter, 4, group, dtype, "cuda", version == 2, version == 2),
                               torch.device("cuda"))  # fmt: skip
    tensors = {k: t.cuda() for k, t in kernel.prepare(experts).items()}
    ids = _routing(routing, m, topk, e, seed=m)
    weights = torch.softmax(torch.randn(m, topk), -1)
    x = torch.randn(m, hidden).to(dtype)
    y = kernel.apply(tensors, x.cuda(), ids.cuda(), weights.cuda()).cpu()
    ref = _rounded_like_the_kernel(x, ids, weights, *_dense(experts), dtype)
    bound = 4e-3 if dtype == torch.bfloat16 and version == 2 else 1e-3
    assert float((y.double() - ref).abs().mean() / ref.abs().mean()) < bound


@pytest.mark.gpu
@pytest.mark.parametrize("inter", [256, 96])  # 96: w2 on the GEMV
def test_gpu_moe_op_under_compile_and_cuda_graph(inter: int) -> None:
    # The one op per layer under torch.compile(dynamic=True, fullgraph) and CUDA-graph capture: the routing is
    # replayed on new router choices without any host synchronisation.
    e, hidden = 8, 512
    experts = _experts(e, hidden, inter, 2, 32)
    kernel = CudaInt4MoeKernel(MoeSpec(e, hidden, inter, 4, 32, torch.float16, "cuda", True, True),
                               torch.device("cuda"))  # fmt: skip
    tensors = {k: t.cuda() for k, t in kernel.prepare(experts).items()}
    compiled = torch.compile(lambda a, i, w: kernel.apply(tensors, a, i, w), dynamic=True, fullgraph=True)
    w13, w2 = _dense(experts)
    for m in (1, 24):
        x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
        ids = torch.stack([torch.randperm(e)[:2] for _ in range(m)]).cuda()
        w = torch.rand(m, 2, device="cuda")
        eager = kernel.apply(tensors, x, ids, w)
        torch.testing.assert_close(compiled(x, ids, w), eager)
        static = [x.clone(), ids.clone(), w.clone()]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(*static)
        new_ids = torch.stack([torch.randperm(e)[:2] for _ in range(m)]).cuda()  # a different routing, replayed
        static[1].copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        ref = _rounded_like_the_kernel(x.cpu(), new_ids.cpu(), w.cpu(), w13, w2, torch.float16)
        assert float((out.double().cpu() - ref).abs().mean() / ref.abs().mean()) < 1e-3


@pytest.mark.gpu
def test_gpu_moe_self_check_passes() -> None:
    select._checked.clear()
    spec = MoeSpec(8, 512, 256, 4, 128, torch.bfloat16, "cuda", True, True)
    assert choose_moe_kernel(spec, torch.device("cuda"))[0] is CudaInt4MoeKernel  # the real check, on the real GPU
