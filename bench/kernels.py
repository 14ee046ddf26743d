"""The CUDA kernels by the numbers: bytes per call and compile stats anywhere, timings on a GPU.

    python bench/kernels.py                      # no GPU: bytes per call, roofline, compile stats
    python bench/kernels.py --json out.json      # on a GPU: also latency, GB/s, speed-up vs fp16

Without a GPU it prints, for Llama-7B/70B linear shapes and M = 1..64, the bytes a small-M kernel
(cuda/eq_mma.cu, cuda/eq_gemv.cu) moves per call: int4 codes, fp16 steps, CSR outliers (16-bit value +
32-bit index each), row pointers, activations in and out, against an fp16 GEMV's bytes. Decode is
memory-bound, so the ratio is the ideal speed-up (16 / bits per weight for the weights alone). It then
compiles every kernel with NVRTC, exactly as at run time, and prints registers and spills per
architecture, and the SASS issue model (bench/sass.py): instructions per 512 weight
bytes of each main loop against what an H100 can issue at HBM speed.

With a GPU it also times, on synthetic weights in the canonical layout (random codes, 0.5 % CSR
outliers per row, codes 0 under them as in a real checkpoint):
  * ``fp16``: ``torch.matmul(x, W.T)`` with a dense fp16 W (cuBLAS), the baseline;
  * ``gemv``: the fused CUDA-core GEMV ``cuda_int4.gemv_int4`` (M <= 16, canonical layout);
  * ``mma``: the tensor-core kernel ``cuda_int4.mma_int4`` (M <= 64, MMA layout);
  * ``deq+mm``: ``cuda_int4.dequant_int4`` into a workspace, then ``torch.matmul``;
  * ``eq``: what the ``easyquant::linear`` op of ``CudaInt4Kernel.apply`` dispatches to at this M.
Each is captured ``--calls`` times in one CUDA graph, cycling through enough weight copies that the
set exceeds 4x the L2 cache (so every call reads its weights from HBM, as in a model, where each
layer's weights are touched once per token), and timed with CUDA events over graph replays: the
numbers are device time without Python launch overhead, as vLLM runs decode under CUDA graphs.
Achieved bandwidth counts the bytes above; "% peak" is against a device-to-device copy measured
in the same run (bytes read + written), not the datasheet.

Then the mixture-of-experts layer (``CudaInt4MoeKernel``, cuda/eq_moe.cu) on two expert shapes at each M: device
time of one layer call (routing, both projections, SiLU-gate, weighted sum) under a CUDA graph, cycling through
enough random routings that the experts a call touches are not in L2, and the bandwidth over the bytes of the
experts touched (``--no-moe`` skips it).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # (N, K) of each linear layer
    "7B qkv (fused)": (3 * 4096, 4096),
    "7B o_proj": (4096, 4096),
    "7B gate_up (fused)": (2 * 11008, 4096),
    "7B down_proj": (4096, 11008),
    "70B q_proj": (8192, 8192),
    "70B gate_up (fused)": (2 * 28672, 8192),
    "70B down_proj": (8192, 28672),
}


def gemv_bytes(n: int, k: int, m: int, group: int, frac: float) -> dict[str, float]:
    nnz = frac * n * k
    weights = n * k / 2 + n * (k // group) * 2 + nnz * 6 + (n + 1) * 4
    return {"weights": weights, "io": m * k * 2 + m * n * 2, "fp16": n * k * 2 + m * k * 2 + m * n * 2}


def print_bytes_table(g: int, f: float) -> None:
    bits = 4 + 16 / g + f * 48
    print(f"# small-M kernel bytes per call, int4 g{g}, {100 * f:g} % outliers ({bits:.3f} bits/weight); "
          f"ideal weight-only speed-up over fp16: {16 / bits:.2f}x")  # fmt: skip
    print("| layer | N x K | M | EasyQuant MB | fp16 MB | ideal speed-up |\n|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        for m in (1, 4, 8, 16, 64):
            b = gemv_bytes(n, k, m, g, f)
            ours = b["weights"] + b["io"]
            print(f"| {name} | {n} x {k} | {m} | {ours / 1e6:.2f} | {b['fp16'] / 1e6:.2f} | {b['fp16'] / ours:.2f}x |")
    print("\nAbove the GEMV's M the linear method dequantizes into a workspace (2 bytes/weight written and"
          " read back) and runs cuBLAS; those rows show what a GEMV alone would move.")  # fmt: skip


def print_compile_stats() -> None:
    try:
        from bench.nvrtc import ARCHS, KERNEL_NAMES, nvrtc_compile
    except ImportError as e:
        print(f"\n(no compile stats: {e})")
        return
    print("\n| kernel source | arch | registers of the fp16 entries in bench/nvrtc.py's order (each tile format v1, "
          "v2, v3: GEMV tiles 1 / 2 / 4 / 8 / 16; tensor-core tiles 8 / 16 / 32 / 64 rows, dequantize; MoE: route, "
          "tensor-core tiles, GEMV tiles, SiLU-gate, sum) | spills / stack |\n|---|---|---|---|")  # fmt: skip
    for source in KERNEL_NAMES:
        for arch in ARCHS:
            try:
                log = nvrtc_compile(source, arch).log
            except (ImportError, RuntimeError) as e:
                print(f"| {source} | {arch} | compile failed: {e} | |")
                continue
            names = re.findall(r"Compiling entry function '(\w+)'", log)
            regs = dict(zip(names, re.findall(r"Used (\d+) registers", log), strict=True))
            shown = [regs[n] for n in KERNEL_NAMES[source] if n in regs and "bf16" not in n]  # f16 = bf16 +- 0
            spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
            clean = all(s == ("0", "0") for s in spills)
            print(f"| {source} | {arch} | {' / '.join(shown)} | {'none' if clean else spills} |")


MOE_SHAPES = {  # (experts, hidden, intermediate per rank, experts per token)
    "Mixtral-8x7B experts": (8, 4096, 14336, 2),
    "Qwen3-30B-A3B experts": (128, 2048, 768, 8),
}


def print_moe_loops(dense: dict[str, float], moe: dict[str, float]) -> None:
    """The MoE products' main loops next to the dense kernels' (the same cores, per expert tile), per format."""
    from easyquant_vllm.kernels.cuda_build import FORMAT_VARIANTS

    print("\n# MoE products (cuda/eq_moe.cu) vs the dense kernels: main-loop warp instructions per 512 weight bytes, "
          "sm_90, fp16\n| tile | dense v1 | MoE v1 | dense v2 | MoE v2 | dense v3 | MoE v3 |\n"
          "|---|---|---|---|---|---|---|")  # fmt: skip
    for name in sorted(dense, key=lambda n: (n.startswith("eq_mma"), int(re.sub(r"\D", "", n.split("_")[-1])))):
        if "_f16_" not in name or re.search(r"_v\d$", name):
            continue
        cells = []
        for suffix in FORMAT_VARIANTS:
            d, m = dense.get(name + suffix), moe.get(name.replace("eq_", "eq_moe_") + suffix)
            cells += ["-" if d is None else f"{d:.1f}", "-" if m is None else f"{m:.1f}"]
        print(f"| {name.split('_f16_')[1]} | " + " | ".join(cells) + " |")


def print_issue_model(g: int, f: float) -> None:
    """The SASS issue model (docs/kernels.md): predicted bandwidth fraction and speed-up per kernel and tile."""
    import tempfile

    from bench import sass
    from easyquant_vllm.kernels.cuda_build import GEMV_ROWS_PER_WARP

    try:
        with tempfile.TemporaryDirectory() as d:
            gemv = sass.loop_counts(sass.disassemble("eq_gemv.cu", "sm_90", Path(d)), "eq_gemv_int4_",
                                    GEMV_ROWS_PER_WARP)  # fmt: skip
            mma = sass.loop_counts(sass.disassemble("eq_mma.cu", "sm_90", Path(d)), "eq_mma_int4_", 1)
            moe_text = sass.disassemble("eq_moe.cu", "sm_90", Path(d))
            moe = {**sass.loop_counts(moe_text, "eq_moe_gemv_int4_", GEMV_ROWS_PER_WARP),
                   **sass.loop_counts(moe_text, "eq_moe_mma_int4_", 1)}  # fmt: skip
    except (FileNotFoundError, OSError) as e:
        print(f"\n(no SASS model: {e})")
        return
    model = sass.IssueModel()
    bits = 4 + 16 / g + f * 48
    ideal = 16 / bits
    deq_mm = 16 / (bits + 32)  # dequant reads the int4 weights and writes W', the GEMM reads W' back
    print(f"\n# SASS issue model, sm_90 (H100 SXM: {model.sms} SMs x {model.schedulers_per_sm} schedulers at "
          f"{model.clock_ghz} GHz, {model.hbm_gbs / 1000:g} TB/s): a kernel keeps up with HBM while its main loop "
          f"issues <= {model.budget():.0f} warp instructions per 512 weight bytes. Format v2 = zero points + column "
          "scale (the *_v2 entry points), v3 = compact steps + fractional zeros (*_v3)")  # fmt: skip
    print("| kernel | format | activations | M | instructions / 512 B | predicted % of HBM | predicted speed-up vs "
          "fp16 |\n|---|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for name, n in {**gemv, **mma}.items():
        match = re.fullmatch(r"eq_(gemv|mma)_int4_(f16|bf16)_([mt])(\d+)(_v\d)?", name)
        assert match, name
        kind, act, _, tile, variant = match.groups()
        m = int(tile) if kind == "gemv" else 8 * int(tile)
        label = f"GEMV (CUDA cores), tile {m}" if kind == "gemv" else f"tensor cores, {tile} x 8 batch rows"
        rows.append((kind != "gemv", m, variant or "_v1", act, label, n))
    for _, m, variant, act, label, n in sorted(rows):
        frac = model.bandwidth_fraction(n)
        print(f"| {label} | {variant[1:]} | {act} | <= {m} | {n:.1f} | {100 * frac:.0f} % | "
              f"{ideal * frac:.2f}x |")  # fmt: skip
    print(f"| dequantize + cuBLAS | any | (4.5 bytes per weight) | | {deq_mm:.2f}x |")
    print("Speed-ups assume fp16 cuBLAS at the same HBM fraction as a copy (its best case); they are a model,"
          " not a measurement.")  # fmt: skip
    print_moe_loops({**gemv, **mma}, moe)


# --- timings on a GPU ------------------------------------------------------------------------------


def synthetic_weight(n: int, k: int, group: int, frac: float, seed: int, device: str = "cuda",  # type: ignore[no-untyped-def]
                     version: int = 1):  # fmt: skip
    """A :class:`QuantizedWeight` of format ``version`` on ``device`` in the canonical layout, built without
    quantizing. Version 2: zero points (0..15) and a column scale (0.5..1.5); version 3: the column scale, uint8
    step multipliers of an fp16 unit per row and zeros in sixteenths of a code (0..255), with the code nearest the
    zero under every outlier, as the quantizer writes them."""
    import torch

    from easyquant_vllm.quant import QuantizedWeight
    from easyquant_vllm.quant.outliers import OutlierCSR
    from easyquant_vllm.quant.packing import pack_codes

    gen = torch.Generator(device=device).manual_seed(seed)
    per_row = max(1, round(frac * k))
    cols = torch.rand(n, k, device=device, generator=gen).topk(per_row, dim=1).indices.sort(dim=1).values
    u = torch.randint(0, 16, (n, k), device=device, generator=gen, dtype=torch.int32)
    g = k if group == -1 else group
    top = 256 if version == 3 else 16  # version 3's zeros are sixteenths of a code
    zeros = torch.randint(0, top, (n, k // g), device=device, generator=gen, dtype=torch.uint8) if version > 1 else None
    # code 0 under every outlier (u = the group's zero; version 3: the nearest code), as the quantizer writes it
    under = 8 if zeros is None else zeros.gather(1, cols // g).int()
    u.scatter_(1, cols, under if version < 3 else torch.round(under / 16).clamp(0, 15).int())
    col_scale = (0.5 + torch.rand(k, device=device, generator=gen)).half() if version > 1 else None
    indptr = torch.arange(0, n * per_row + 1, per_row, device=device, dtype=torch.int32)
    values = (torch.randn(n * per_row, device=device, generator=gen) * 0.1).half()
    scales = (0.005 + 0.01 * torch.rand(n, k // g, device=device, generator=gen)).half()
    row_steps = None
    if version == 3:  # steps 0.005..0.015 as 8-bit multiples of a unit per row
        row_steps = (0.015 / 255 * (0.5 + torch.rand(n, device=device, generator=gen))).half()
        scales = torch.randint(85, 256, (n, k // g), device=device, generator=gen, dtype=torch.uint8)
    csr = OutlierCSR(indptr, cols.reshape(-1).to(torch.int32), values, (n, k))
    return QuantizedWeight(pack_codes(u, 4), scales, csr, 4, group, zeros=zeros, col_scale=col_scale,
                           row_steps=row_steps)  # fmt: skip


def launch_args(qw) -> tuple[tuple, dict]:  # type: ignore[no-untyped-def, type-arg]
    """The launch functions' arguments for ``qw`` in the checkpoint layout: ``(qweight, scales, indptr, indices,
    values)`` and the keyword arguments ``zeros``/``col_scale`` (none for version 1; version 3's scales are the row
    units and its zeros the ``(a, zq)`` pairs of :func:`~easyquant_vllm.kernels.cuda_int4.v3_tensors`)."""
    from easyquant_vllm.kernels.cuda_int4 import v2_tensors, v3_tensors

    n, k = qw.shape
    o = qw.outliers
    if qw.row_steps is not None:
        row_steps, pairs, col_scale = v3_tensors(qw)
        return (qw.qweight, row_steps, o.indptr, o.indices, o.values), {"zeros": pairs, "col_scale": col_scale}
    zeros, col_scale = v2_tensors(qw.zeros, qw.col_scale, n, k, k if qw.group_size == -1 else qw.group_size)
    kwargs = {} if zeros is None else {"zeros": zeros, "col_scale": col_scale}
    return (qw.qweight, qw.scales, o.indptr, o.indices, o.values), kwargs


def graph_time_us(fns: list, calls: int, reps: int) -> float:  # type: ignore[type-arg]
    """Median device time per call of ``fns[i % len(fns)]()``, i < calls, captured in one CUDA graph."""
    import torch

    for f in fns:  # warm up: compile, cuBLAS handles and workspaces, outside the capture
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def eager_time_us(fn, calls: int) -> float:  # type: ignore[no-untyped-def]
    """Wall time per call launched from Python, no graph: includes dispatch and CuPy launch overhead."""
    import time

    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def peak_copy_gbs() -> float:
    """Device-to-device copy bandwidth, bytes read + written (the ceiling a memory-bound kernel sees)."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = graph_time_us([lambda: dst.copy_(src)], calls=20, reps=5)
    return 2 * src.numel() / (t * 1e-6) / 1e9


def check_against_reference(qw, dtype) -> float:  # type: ignore[no-untyped-def]
    """Mean relative error of the GEMV (M = 4) vs an fp64 product with the reference W'."""
    import torch

    x = torch.randn(4, qw.shape[1], device="cuda").to(dtype)
    ref = x.double() @ qw.dequantize(torch.float64).T
    from easyquant_vllm.kernels.cuda_int4 import gemv_int4

    canon, kwargs = launch_args(qw)
    y = gemv_int4(x, *canon, qw.group_size, **kwargs)
    return float((y.double() - ref).abs().mean() / ref.abs().mean())


@dataclass
class LayerCopies:
    """One layer shape's weight copies in every layout the paths read, built once per shape."""

    canon: list[tuple]  # type: ignore[type-arg]  # (qweight, scales, indptr, indices, values), checkpoint layout
    zc: list[dict]  # type: ignore[type-arg]  # zeros / col_scale per copy (empty dicts for v1; see launch_args)
    mma: list[tuple]  # type: ignore[type-arg]  # the same with qweight in the MMA layout; [] if the shape has none
    preps: list[dict]  # type: ignore[type-arg]  # what the linear method holds: the layout apply() dispatches on

    @classmethod
    def build(cls, qws, kern) -> LayerCopies:  # type: ignore[no-untyped-def]
        from easyquant_vllm.kernels.mma_layout import mma_compatible, to_mma_layout

        args = [launch_args(q) for q in qws]
        canon = [c for c, _ in args]
        mma = [(to_mma_layout(c[0]), *c[1:]) for c in canon] if mma_compatible(*qws[0].shape) else []
        return cls(canon, [z for _, z in args], mma, [kern.prepare(q) for q in qws])


def time_paths(xs, w16, layer: LayerCopies, kern, args) -> dict[str, float | None]:  # type: ignore[no-untyped-def]
    """Device us per call of each path for activations ``xs [M, K]`` (see the module docstring); the fp16 baseline
    only with ``w16`` (not None)."""

    from easyquant_vllm.kernels import cuda_int4 as ops
    from easyquant_vllm.kernels.cuda_int4 import GEMV_KERNEL_MAX_M, MMA_MAX_M

    g, dtype, m = args.group_size, xs.dtype, xs.shape[0]
    canon, mma, preps, zc = layer.canon, layer.mma, layer.preps, layer.zc

    def timed(fns):  # type: ignore[no-untyped-def]
        return graph_time_us(fns, args.calls, args.reps)

    return {
        "fp16_us": timed([lambda w=w: xs @ w.t() for w in w16]) if w16 is not None else None,
        "gemv_us": timed([lambda c=c, z=z: ops.gemv_int4(xs, *c, g, **z) for c, z in zip(canon, zc, strict=True)])
        if m <= GEMV_KERNEL_MAX_M
        else None,
        "mma_us": timed([lambda c=c, z=z: ops.mma_int4(xs, *c, g, **z) for c, z in zip(mma, zc, strict=False)])
        if mma and m <= MMA_MAX_M
        else None,
        "deq_mm_us": timed(
            [lambda c=c, z=z: xs @ ops.dequant_int4(*c, g, dtype, **z).t() for c, z in zip(canon, zc, strict=True)]
        ),
        "eq_us": timed([lambda p=p: kern.apply(p, xs, None) for p in preps]),
        "eager_us": eager_time_us(lambda: kern.apply(preps[0], xs, None), 50),
    }


def run_gpu(args: argparse.Namespace) -> list[dict]:  # type: ignore[type-arg]
    import torch

    from easyquant_vllm.kernels import CudaInt4Kernel, LayerSpec
    from easyquant_vllm.kernels.cuda_int4 import GEMV_MAX_M, MMA_MAX_M

    props = torch.cuda.get_device_properties(0)
    peak = peak_copy_gbs()
    print(f"\n# GPU: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB; "
          f"torch {torch.__version__}; measured copy bandwidth {peak:.0f} GB/s (read + write)")  # fmt: skip
    print(f"# g{args.group_size}, {100 * args.outlier_fraction:g} % outliers, {args.dtype}, format versions "
          f"{' and '.join(map(str, args.format_version))}; eq = the dispatch: tensor cores for M <= {MMA_MAX_M} (GEMV "
          f"for M <= {GEMV_MAX_M} where N % 16 or K % 64), then dequantize + cuBLAS; device us per call under a CUDA "
          "graph; fp16 timed once per layer and M")  # fmt: skip
    dtype = getattr(torch, args.dtype)
    rows = []
    hdr = ("| layer | format | M | fp16 us | gemv us | mma us | deq+mm us | eq us | eq GB/s | % peak | speed-up | "
           "eager us |")  # fmt: skip
    print(hdr + "\n|" + "---|" * (hdr.count("|") - 1))
    for name, (n, k) in SHAPES.items():
        if args.shapes and not any(s in name for s in args.shapes):
            continue
        bytes_fp16 = n * k * 2
        bytes_eq = gemv_bytes(n, k, 1, args.group_size, args.outlier_fraction)["weights"]
        copies = max(2, min(64, -(-4 * props.L2_cache_size // int(bytes_eq))))
        copies16 = max(2, min(64, -(-4 * props.L2_cache_size // bytes_fp16)))
        w16 = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies16)]
        fp16_us: dict[int, float] = {}  # per M: the baseline does not depend on the format
        for version in args.format_version:
            qws = [synthetic_weight(n, k, args.group_size, args.outlier_fraction, seed=i, version=version)
                   for i in range(copies)]  # fmt: skip
            err = check_against_reference(qws[0], dtype)
            spec = LayerSpec(n, k, 4, args.group_size, dtype, "cuda", zero_points=version > 1,
                             column_scale=version > 1, compact_steps=version == 3)  # fmt: skip
            kern = CudaInt4Kernel(spec)
            layer = LayerCopies.build(qws, kern)  # regrouped once per shape and format, not once per M
            for m in args.m:
                xs = torch.randn(m, k, device="cuda", dtype=dtype)
                t = time_paths(xs, None if m in fp16_us else w16, layer, kern, args)
                fp16_us.setdefault(m, t["fp16_us"])  # type: ignore[arg-type]
                t["fp16_us"] = fp16_us[m]
                gbs = (bytes_eq + m * k * 2 + m * n * 2) / (t["eq_us"] * 1e-6) / 1e9
                row = {"layer": name, "format": version, "n": n, "k": k, "m": m, **t, "eq_gbs": gbs,
                       "pct_peak": 100 * gbs / peak, "speedup": fp16_us[m] / t["eq_us"], "rel_err_m4": err,
                       "copies": copies}  # fmt: skip
                rows.append(row)
                cells = [row[c] for c in ("fp16_us", "gemv_us", "mma_us", "deq_mm_us", "eq_us", "eq_gbs")]
                tail = f" | {row['pct_peak']:.0f} % | {row['speedup']:.2f}x | {t['eager_us']:.1f} |"
                print(f"| {name} | v{version} | {m} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells)
                      + tail, flush=True)  # fmt: skip
            del qws, layer
        del w16
        torch.cuda.empty_cache()
    print(f"\nGEMV vs fp64 reference, mean relative error (M = 4): max over layers and formats "
          f"{max(r['rel_err_m4'] for r in rows):.2e}")  # fmt: skip
    return [{"device": props.name, "peak_copy_gbs": peak, **r} for r in rows]


def time_moe_shape(name: str, shape: tuple[int, int, int, int], version: int, args: argparse.Namespace,  # type: ignore[type-arg]
                   peak: float) -> list[dict]:  # fmt: skip
    """One expert shape in format ``version`` at every M of ``args.m`` (see the module docstring); prints a table row
    per M."""
    import torch

    from easyquant_vllm.kernels.moe import CudaInt4MoeKernel, MoeSpec

    e, hidden, inter, topk = shape
    dtype, g, frac = getattr(torch, args.dtype), args.group_size, args.outlier_fraction
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    experts = [(synthetic_weight(2 * inter, hidden, g, frac, seed=2 * x, version=version),
                synthetic_weight(hidden, inter, g, frac, seed=2 * x + 1, version=version))
               for x in range(e)]  # fmt: skip
    spec = MoeSpec(e, hidden, inter, 4, g, dtype, "cuda", version > 1, version > 1, version == 3)
    kern = CudaInt4MoeKernel(spec, torch.device("cuda"))
    tensors = kern.prepare(experts)  # on the GPU: the synthetic experts live there
    del experts
    per_expert = gemv_bytes(2 * inter, hidden, 1, g, frac)["weights"] + gemv_bytes(hidden, inter, 1, g, frac)["weights"]
    rows = []
    for m in args.m:
        x = torch.randn(m, hidden, device="cuda", dtype=dtype)
        w = torch.softmax(torch.randn(m, topk, device="cuda"), -1)
        n_routings = max(2, min(64, -(-4 * l2 // int(min(e, m * topk) * per_expert))))
        routings = [torch.stack([torch.randperm(e)[:topk] for _ in range(m)]).to("cuda", torch.int32)
                    for _ in range(n_routings)]  # fmt: skip
        touched = statistics.mean(int(r.unique().numel()) for r in routings)

        def call(r: torch.Tensor, x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
            return kern.apply(tensors, x, r, w)

        t = graph_time_us([lambda r=r: call(r) for r in routings], args.calls, args.reps)
        gbs = touched * per_expert / (t * 1e-6) / 1e9
        eager = eager_time_us(lambda r=routings[0]: call(r), 20)
        print(f"| {name} | v{version} | {m} | {topk} | {touched:.1f} | {t:.1f} | {gbs:.0f} | {100 * gbs / peak:.0f} % "
              f"| {eager:.1f} |", flush=True)  # fmt: skip
        rows.append({"kind": "moe", "layer": name, "format": version, "experts": e, "hidden": hidden, "inter": inter,
                     "topk": topk, "m": m, "us": t, "experts_touched": touched, "gbs": gbs,
                     "pct_peak": 100 * gbs / peak, "eager_us": eager})  # fmt: skip
    return rows


def run_moe_gpu(args: argparse.Namespace, peak: float) -> list[dict]:  # type: ignore[type-arg]
    """Device time of one MoE layer call per shape and M (see the module docstring)."""
    import torch

    print(f"\n# MoE layer (cuda/eq_moe.cu), {args.dtype}, g{args.group_size}: device us per call under a CUDA "
          "graph, routings cycled past L2; GB/s over the experts touched")  # fmt: skip
    hdr = "| experts | format | M | topk | experts touched (mean) | us | GB/s | % peak | eager us |"
    print(hdr + "\n|" + "---|" * (hdr.count("|") - 1))
    rows = []
    for name, shape in MOE_SHAPES.items():
        if not args.shapes or any(s in name for s in args.shapes):
            for version in args.format_version:
                rows += time_moe_shape(name, shape, version, args, peak)
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outlier-fraction", type=float, default=0.005)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument(
        "--format-version",
        type=int,
        nargs="+",
        choices=[1, 2, 3],
        default=[2],
        help="checkpoint formats to time, one pass each: 2 (zero points + column scale, the converter's default), "
        "3 (compact steps, fractional zeros), 1; bench/gpu_session.sh times 2 and 3",
    )
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="batch rows to time")
    p.add_argument("--shapes", nargs="*", help="only layers whose name contains one of these")
    p.add_argument("--calls", type=int, default=200, help="calls captured per CUDA graph")
    p.add_argument("--reps", type=int, default=10, help="graph replays; the median is reported")
    p.add_argument("--json", type=Path, help="write the GPU rows here")
    p.add_argument("--no-compile-stats", action="store_true")
    p.add_argument("--no-moe", action="store_true", help="skip the mixture-of-experts timings")
    args = p.parse_args()
    print_bytes_table(args.group_size, args.outlier_fraction)
    if not args.no_compile_stats:
        print_compile_stats()
        print_issue_model(args.group_size, args.outlier_fraction)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        print("\nNo CUDA GPU here: timings need one (bash bench/gpu_session.sh on a GPU machine; docs/kernels.md).")
        return
    rows = run_gpu(args)
    if not args.no_moe:
        rows += run_moe_gpu(args, rows[0]["peak_copy_gbs"] if rows else peak_copy_gbs())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
