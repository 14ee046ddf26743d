"""CPU kernels layer by layer: EasyQuant's int4 paths against the dense GEMM vLLM gives an unquantized layer.

    python bench/cpu_kernels.py --model DST_DIR [--m 1 16] [--json out.json]
    python bench/cpu_kernels.py --shapes 2048x1536 1536x8960 [--group 128] [--format-version 2] [--copies 2]
                                [--bits 4] [--m 1 16] [--threads 1]

For every distinct linear shape of the converted model (SmolLM2: fused qkv 960x576, o 576x576, fused
gate_up 3072x576, down 576x1536) and each batch size M, microseconds per call, side by side in one run:

* ``dense``: vLLM's unquantized CPU GEMM on W' in bf16 (oneDNN with a prepacked weight; AMX where present);
* ``native``: our C++ op with its default plan (``native-int4-cpu``), and the breakdown of that call:
  ``int4`` (the same call with the outliers removed), ``outliers`` (the difference) and ``fixed`` (a call
  on a 16 x 32 layer: dispatch, preparing x, threads);
* ``tinygemm``/``wna16``: the previous kernels (PyTorch's and vLLM's int4 GEMM plus the outlier product).

These are cache-hot (one layer called again and again), run in turns (the fastest of 5 interleaved rounds each,
so that ``native`` and ``int4`` see the same load). The last table is closer to decoding: one pass
through every quantized layer of the model in order, so each layer's weights come from memory as in a
forward pass; dense against native, per path of the plan. Shared cores swing: compare columns of one run.

``--shapes N x K ...`` measures random weights of those shapes instead of a checkpoint (heavy-tailed, as
``easyquant-tiny-model`` makes them; quantized with ``--format-version``'s defaults, 2 unless given: zero points,
column scale, 0.25 % outliers (3: compact steps, 0.1 %), ``--group``, ``--bits``: 8 for a quantized lm_head,
``--shapes 151936x1536 --bits 8`` on Qwen2.5-1.5B, whose paths are i16, vnni and amx): per shape and M, the dense
GEMM against each native path this CPU has, run in turns (the fastest of 5 interleaved rounds each: on shared
cores, the least disturbed), then the pass through the shapes repeated ``--copies`` times (choose enough copies
that the int4 weights exceed the last-level cache: the line above the tables gives their size). With
``--threads 1`` the clock is the thread's CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.cpu_isa import cpu_isa
from easyquant_vllm.format import quantized_layers, read_quantization_config
from easyquant_vllm.kernels import CpuWna16Kernel, LayerSpec, NativeCpuKernel, TorchInt4CpuKernel
from easyquant_vllm.kernels import cpu_native as native
from easyquant_vllm.quant import QuantizedWeight, QuantSpec, quantize_group
from easyquant_vllm.quant.outliers import OutlierCSR
from easyquant_vllm.safetensors_io import open_checkpoint


def dense_linear(w: torch.Tensor):  # type: ignore[no-untyped-def]
    """``x -> x @ w^T`` on the GEMM vLLM uses for an unquantized CPU layer (F.linear without vLLM)."""
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(w, requires_grad=False)
        holder.bias = None
        dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
        # As vLLM calls it: the layer's weight is passed (empty where a packed copy replaced it); where oneDNN's
        # bf16 matmul is unavailable (AVX2-only CPUs) vLLM falls back to F.linear on that weight.
        return lambda x: holder.cpu_linear(x, holder.weight, None)
    except ImportError:
        return lambda x: torch.nn.functional.linear(x, w)


def without_outliers(qw: QuantizedWeight) -> QuantizedWeight:
    """The same layer (any format version and code width) with an empty CSR."""
    n, k = qw.qweight.shape[0], qw.qweight.shape[1] * 32 // qw.bits
    empty = OutlierCSR(torch.zeros(n + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                       torch.zeros(0, dtype=torch.float16), (n, k))  # fmt: skip
    return dataclasses.replace(qw, outliers=empty)


def layer_table(layers: dict[tuple[int, int], QuantizedWeight], ms: list[int], dtype: torch.dtype,
                clock: Callable[[], float] = time.perf_counter) -> list[dict]:  # fmt: skip
    rows = []
    codes, steps = torch.zeros(16, 4, dtype=torch.int32), torch.ones(16, 1, dtype=torch.float16)
    tiny = without_outliers(QuantizedWeight(codes, steps, next(iter(layers.values())).outliers, 4, 32))  # 16 x 32
    print(f"\n# per layer, cache-hot, {dtype}; microseconds per call")
    print("| layer N x K | M | dense | native | int4 | outliers | fixed | native path | tinygemm | wna16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (n, k), qw in layers.items():
        spec = LayerSpec.of(qw, dtype, "cpu")
        nat = NativeCpuKernel(spec)
        t_full, t_bare = nat.prepare(qw), nat.prepare(without_outliers(qw))
        small = NativeCpuKernel(LayerSpec(16, 32, 4, 32, dtype, "cpu"))
        t_small = small.prepare(tiny)
        dense = dense_linear(qw.dequantize(dtype))
        others = {}
        for cls in (TorchInt4CpuKernel, CpuWna16Kernel):
            if cls.can_implement(spec)[0]:
                kern = cls(spec)
                others[cls.name] = (kern, kern.prepare(qw))
        for m in ms:
            x = torch.randn(m, k).to(dtype)
            xs = torch.randn(m, 32).to(dtype)
            # in turns (the call with and without its outliers side by side: their difference is the outliers')
            fns = {"dense": lambda x=x, f=dense: f(x),
                   "native": lambda x=x, k=nat, t=t_full: k.apply(t, x, None),
                   "int4": lambda x=x, k=nat, t=t_bare: k.apply(t, x, None),
                   "fixed": lambda xs=xs, k=small, t=t_small: k.apply(t, xs, None)}  # fmt: skip
            for name, (kern, t) in others.items():
                fns[name] = lambda x=x, kern=kern, t=t: kern.apply(t, x, None)
            r = {"n": n, "k": k, "m": m} | {f"{c}_us": us for c, us in timed_in_turns(fns, clock=clock).items()}
            r["outliers_us"] = r["native_us"] - r["int4_us"]
            r["path"] = native.PATHS[native_path(nat.plan, m)]
            rows.append(r)
            cells = [f"{r[c]:.1f}" for c in ("dense_us", "native_us", "int4_us", "outliers_us", "fixed_us")]
            extra = [f"{r[c]:.1f}" if c in r else "-" for c in ("torch-int4-cpu_us", "cpu-wna16_us")]
            print(f"| {n} x {k} | {m} | " + " | ".join(cells) + f" | {r['path']} | " + " | ".join(extra) + " |",
                  flush=True)  # fmt: skip
    return rows


def native_path(plan: list[int], m: int) -> int:
    for i in range(0, len(plan) - 2, 2):
        if m <= plan[i]:
            return plan[i + 1]
    return plan[-1]


def model_pass(all_layers: list[QuantizedWeight], ms: list[int], dtype: torch.dtype,
               clock: Callable[[], float] = time.perf_counter) -> list[dict]:  # fmt: skip
    """ms per pass through every quantized layer, dense vs native (default plan and each single path), in turns."""
    dense = [(dense_linear(qw.dequantize(dtype)), qw.shape[1]) for qw in all_layers]
    layers = []
    for qw in all_layers:
        spec = LayerSpec.of(qw, dtype, "cpu")
        layers.append((spec, NativeCpuKernel(spec).prepare(qw), qw.shape[1]))
    bits = all_layers[0].bits
    plans = {"native (plan)": native.default_plan(dtype, native.available_paths(dtype), bits)} | {
        f"native {p} only": native.parse_plan(p, native.PATHS) for p in paths_for(bits, dtype)}  # fmt: skip
    rows = []
    print(f"\n# one pass through all {len(all_layers)} quantized layers in order ({dtype}): ms per pass")
    print("| M | dense | " + " | ".join(plans) + " |\n|---|---|" + "---|" * len(plans))
    for m in ms:
        xs = {k: torch.randn(m, k).to(dtype) for k in {k for _, k in dense}}

        def run_dense(xs: dict[int, torch.Tensor] = xs) -> None:
            for fn, k in dense:
                fn(xs[k])

        fns: dict[str, Callable[[], object]] = {"dense_ms": run_dense}
        for name, plan in plans.items():
            kernels = [(NativeCpuKernel(spec, plan=plan), t, k) for spec, t, k in layers]  # the tensors are shared

            def run_native(xs: dict[int, torch.Tensor] = xs, kernels: list = kernels) -> None:
                for kern, t, k in kernels:
                    kern.apply(t, xs[k], None)

            fns[name] = run_native
        r = {"m": m} | {name: us / 1e3 for name, us in timed_in_turns(fns, 1.0, clock).items()}
        rows.append(r)
        print(f"| {m} | {r['dense_ms']:.2f} | " + " | ".join(f"{r[p]:.2f}" for p in plans) + " |", flush=True)
    return rows


def paths_for(bits: int, dtype: torch.dtype) -> list[str]:
    """The native paths this CPU has for ``bits``-bit codes, dequant left out (the dense GEMM plus dequantizing)."""
    return [p for p in native.available_paths(dtype) if p != "dequant" and (bits == 4 or p in native.PATHS_8BIT)]


def timed_in_turns(fns: dict[str, Callable[[], object]], min_time: float = 0.3,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:  # fmt: skip
    """Microseconds per call of each function: 5 rounds, each running every function for ~min_time / 5 s in
    turn; the fastest round of each. Interleaving exposes all columns to the same load on shared cores."""
    reps = {}
    for name, fn in fns.items():
        fn()
        t0 = clock()
        fn()
        reps[name] = max(1, int(min_time / 5 / max(clock() - t0, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(5):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (clock() - t0) / reps[name] * 1e6)
    return best


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """``[n, k]`` fp32 shaped like a trained weight: Student-t (5 dof) noise, per-row scales, std ~0.02."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, k, generator=g) / (torch.randn(n, k, 5, generator=g).square().mean(-1)).sqrt()
    return t * (3 / 5) ** 0.5 * torch.exp(0.3 * torch.randn(n, 1, generator=g)) * 0.02


def path_table(layers: dict[tuple[int, int], QuantizedWeight], ms: list[int], dtype: torch.dtype,
               clock: Callable[[], float] = time.perf_counter) -> list[dict]:  # fmt: skip
    """Per shape and M: the dense GEMM and every native path this CPU has (dequant is the dense GEMM plus
    dequantizing: left out), microseconds per call, in turns; with i16's speed-up over fma and over dense."""
    paths = paths_for(next(iter(layers.values())).bits, dtype)
    ratios = [(f"{p}/i16", p) for p in ("fma", "dense") if "i16" in paths and (p == "dense" or p in paths)]
    print(f"\n# per path, cache-hot, {dtype}; microseconds per call (x / i16: how much faster i16 is)")
    print("| layer N x K | M | dense | " + " | ".join(paths) + " | " + " | ".join(r for r, _ in ratios) + " |")
    print("|---|---|---|" + "---|" * (len(paths) + len(ratios)))
    rows = []
    for (n, k), qw in layers.items():
        spec = LayerSpec.of(qw, dtype, "cpu")
        kernels = {p: NativeCpuKernel(spec, plan=native.parse_plan(p, native.PATHS)) for p in paths}
        tensors = kernels[paths[0]].prepare(qw)  # one layout for every path
        dense = dense_linear(qw.dequantize(dtype))
        for m in ms:
            x = torch.randn(m, k).to(dtype)
            fns = {"dense": lambda x=x, f=dense: f(x)}
            for p, kern in kernels.items():
                fns[p] = lambda x=x, kern=kern, t=tensors: kern.apply(t, x, None)
            r: dict = {"n": n, "k": k, "m": m} | {f"{c}_us": t for c, t in timed_in_turns(fns, clock=clock).items()}
            r |= {name: r[f"{p}_us"] / r["i16_us"] for name, p in ratios}
            rows.append(r)
            cells = [f"{r[f'{c}_us']:.0f}" for c in ("dense", *paths)] + [f"{r[name]:.2f}" for name, _ in ratios]
            print(f"| {n} x {k} | {m} | " + " | ".join(cells) + " |", flush=True)
    return rows


def shape_layers(shapes: list[str], group: int, copies: int, version: int = 2, bits: int = 4) -> tuple[
        dict[tuple[int, int], QuantizedWeight], list[QuantizedWeight]]:  # fmt: skip
    """Random weights of the ``NxK`` shapes in format ``version`` with ``bits``-bit codes; and the list of them
    repeated ``copies`` times (each copy prepared into memory of its own by the kernels: a pass reads copies x
    the bytes)."""
    spec = QuantSpec.for_version(version, group_size=group, bits=bits)
    by_shape = {}
    for i, text in enumerate(shapes):
        n, _, k = text.lower().partition("x")
        if not (n.isdigit() and k.isdigit()):
            sys.exit(f"--shapes: {text!r} is not NxK (e.g. 2048x1536)")
        w = random_weight(int(n), int(k), seed=i)
        by_shape[(int(n), int(k))] = quantize_group([w], spec, with_stats=False)[0]
    return by_shape, list(by_shape.values()) * copies


def dense_bytes(qw: QuantizedWeight) -> int:
    """Bytes of the dense part a call reads: codes, steps (or multipliers), zero points, row units."""
    parts = (qw.qweight, qw.scales, qw.zeros, qw.row_steps)
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="an EasyQuant checkpoint (e.g. the converted SmolLM2)")
    source.add_argument("--shapes", nargs="+", metavar="NxK", help="random weights of these shapes instead")
    p.add_argument("--group", type=int, default=128, help="--shapes: group size (-1: per channel)")
    p.add_argument("--copies", type=int, default=2, help="--shapes: copies of the shapes in the pass")
    p.add_argument("--format-version", type=int, choices=[1, 2, 3], default=2,
                   help="--shapes: quantize with this format version's defaults")  # fmt: skip
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="--shapes: code width (8: a quantized lm_head)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16], help="batch rows")
    p.add_argument(
        "--threads",
        type=int,
        help="torch's threads (default: its own choice); with 1, the clock is "
        "the thread's CPU time, so that time the shared cores gave to other processes is not counted",
    )
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = native.build_problem()
    if problem:
        sys.exit(f"the native CPU kernel is not available: {problem}")
    paths = native.available_paths(dtype)
    print(f"# CPU {cpu_isa()}, {torch.get_num_threads()} threads; native paths for {args.dtype}: {paths}; "
          f"default plan {native.plan_text(native.default_plan(dtype, paths))}")  # fmt: skip
    if args.shapes:
        by_shape, pass_layers = shape_layers(args.shapes, args.group, args.copies, args.format_version, args.bits)
        mib = sum(dense_bytes(qw) for qw in pass_layers) / 2**20
        print(f"# format version {args.format_version}, group {args.group}, {args.bits}-bit codes; {len(pass_layers)} "
              f"layers in the pass: "
              f"{mib:.0f} MiB of codes and group metadata, "
              f"{sum(qw.shape[0] * qw.shape[1] * 2 for qw in pass_layers) / 2**20:.0f} MiB in bf16")  # fmt: skip
        # One thread runs every call inline: its CPU time is the call's time on a core of its own.
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        print(f"# clock: {'CPU time of the one thread' if clock is time.thread_time else 'wall'}")
        rows = {"isa": cpu_isa(), "paths": path_table(by_shape, args.m, dtype, clock),
                "model_pass": model_pass(pass_layers, args.m, dtype, clock)}  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    cfg = read_quantization_config(args.model)
    all_layers: list[QuantizedWeight] = []
    by_shape: dict[tuple[int, int], QuantizedWeight] = {}
    with open_checkpoint(args.model) as ckpt:
        for _, qw in quantized_layers(ckpt, cfg):
            all_layers.append(qw)
            by_shape.setdefault(qw.shape, qw)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    print(f"# clock: {'CPU time of the one thread' if clock is time.thread_time else 'wall'}")
    rows = {"isa": cpu_isa(), "layers": layer_table(by_shape, args.m, dtype, clock),
            "model_pass": model_pass(all_layers, args.m, dtype, clock)}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
