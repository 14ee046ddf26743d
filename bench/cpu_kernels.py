"""CPU kernels layer by layer: EasyQuant's int4 paths against the dense GEMM vLLM gives an unquantized layer.

    python bench/cpu_kernels.py --model DST_DIR [--m 1 16] [--json out.json]

For every distinct linear shape of the converted model (SmolLM2: fused qkv 960x576, o 576x576, fused
gate_up 3072x576, down 576x1536) and each batch size M, microseconds per call, side by side in one run:

* ``dense``: vLLM's unquantized CPU GEMM on W' in bf16 (oneDNN with a prepacked weight; AMX where present);
* ``native``: our C++ op with its default plan (``native-int4-cpu``), and the breakdown of that call:
  ``int4`` (the same call with the outliers removed), ``outliers`` (the difference) and ``fixed`` (a call
  on a 16 x 32 layer: dispatch, preparing x, threads);
* ``tinygemm``/``wna16``: the previous kernels (PyTorch's and vLLM's int4 GEMM plus the outlier product).

These are cache-hot (one layer called again and again). The last table is closer to decoding: one pass
through every quantized layer of the model in order, so each layer's weights come from memory as in a
forward pass; dense against native, per path of the plan. Shared cores swing: compare columns of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.cpu_isa import cpu_isa
from easyquant_vllm.format import quantized_layers, read_quantization_config
from easyquant_vllm.kernels import CpuWna16Kernel, LayerSpec, NativeCpuKernel, TorchInt4CpuKernel
from easyquant_vllm.kernels import cpu_native as native
from easyquant_vllm.quant import QuantizedWeight
from easyquant_vllm.quant.outliers import OutlierCSR
from easyquant_vllm.safetensors_io import open_checkpoint


def timed_us(fn, min_time: float = 0.2) -> float:  # type: ignore[no-untyped-def]
    """Median of 5 timings of a loop that runs ``fn`` for about ``min_time`` / 5 seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    reps = max(1, int(min_time / 5 / max(time.perf_counter() - t0, 1e-6)))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps * 1e6)
    return sorted(samples)[2]


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
        return lambda x: holder.cpu_linear(x, None, None)
    except ImportError:
        return lambda x: torch.nn.functional.linear(x, w)


def without_outliers(qw: QuantizedWeight) -> QuantizedWeight:
    n, k = qw.qweight.shape[0], qw.qweight.shape[1] * 8
    empty = OutlierCSR(torch.zeros(n + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                       torch.zeros(0, dtype=torch.float16), (n, k))  # fmt: skip
    return QuantizedWeight(qw.qweight, qw.scales, empty, qw.bits, qw.group_size)


def layer_table(layers: dict[tuple[int, int], QuantizedWeight], ms: list[int], dtype: torch.dtype) -> list[dict]:
    rows = []
    codes, steps = torch.zeros(16, 4, dtype=torch.int32), torch.ones(16, 1, dtype=torch.float16)
    tiny = without_outliers(QuantizedWeight(codes, steps, next(iter(layers.values())).outliers, 4, 32))  # 16 x 32
    print(f"\n# per layer, cache-hot, {dtype}; microseconds per call")
    print("| layer N x K | M | dense | native | int4 | outliers | fixed | native path | tinygemm | wna16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (n, k), qw in layers.items():
        spec = LayerSpec(n, k, 4, qw.group_size, dtype, "cpu")
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
            r = {"n": n, "k": k, "m": m, "dense_us": timed_us(lambda x=x, f=dense: f(x)),
                 "native_us": timed_us(lambda x=x, k=nat, t=t_full: k.apply(t, x, None)),
                 "int4_us": timed_us(lambda x=x, k=nat, t=t_bare: k.apply(t, x, None)),
                 "fixed_us": timed_us(lambda xs=xs, k=small, t=t_small: k.apply(t, xs, None))}  # fmt: skip
            r["outliers_us"] = r["native_us"] - r["int4_us"]
            r["path"] = native.PATHS[native_path(nat.plan, m)]
            for name, (kern, t) in others.items():
                r[f"{name}_us"] = timed_us(lambda x=x, kern=kern, t=t: kern.apply(t, x, None))
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


def model_pass(all_layers: list[QuantizedWeight], ms: list[int], dtype: torch.dtype) -> list[dict]:
    """ms per pass through every quantized layer, dense vs native (default plan and each single path)."""
    dense = [(dense_linear(qw.dequantize(dtype)), qw.shape[1]) for qw in all_layers]
    kernels = []
    for qw in all_layers:
        n, k = qw.shape
        kern = NativeCpuKernel(LayerSpec(n, k, 4, qw.group_size, dtype, "cpu"))
        kernels.append((kern, kern.prepare(qw), k))
    plans = {"native (plan)": kernels[0][0].plan} | {
        f"native {p} only": native.parse_plan(p, native.PATHS) for p in native.available_paths(dtype)
        if p != "dequant"}  # fmt: skip
    rows = []
    print(f"\n# one pass through all {len(all_layers)} quantized layers in order ({dtype}): ms per pass")
    print("| M | dense | " + " | ".join(plans) + " |\n|---|---|" + "---|" * len(plans))
    for m in ms:
        xs = {k: torch.randn(m, k).to(dtype) for k in {k for _, k in dense}}

        def run_dense(xs: dict[int, torch.Tensor] = xs) -> None:
            for fn, k in dense:
                fn(xs[k])

        r = {"m": m, "dense_ms": timed_us(run_dense, 1.0) / 1e3}
        for name, plan in plans.items():
            for kern, _, _ in kernels:
                kern.plan = plan

            def run_native(xs: dict[int, torch.Tensor] = xs) -> None:
                for kern, t, k in kernels:
                    kern.apply(t, xs[k], None)

            r[name] = timed_us(run_native, 1.0) / 1e3
        rows.append(r)
        print(f"| {m} | {r['dense_ms']:.2f} | " + " | ".join(f"{r[p]:.2f}" for p in plans) + " |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="an EasyQuant checkpoint (e.g. the converted SmolLM2)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16], help="batch rows")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    problem = native.build_problem()
    if problem:
        sys.exit(f"the native CPU kernel is not available: {problem}")
    paths = native.available_paths(dtype)
    print(f"# CPU {cpu_isa()}, {torch.get_num_threads()} threads; native paths for {args.dtype}: {paths}; "
          f"default plan {native.plan_text(native.default_plan(dtype, paths))}")  # fmt: skip
    cfg = read_quantization_config(args.model)
    all_layers: list[QuantizedWeight] = []
    by_shape: dict[tuple[int, int], QuantizedWeight] = {}
    with open_checkpoint(args.model) as ckpt:
        for _, qw in quantized_layers(ckpt, cfg):
            all_layers.append(qw)
            by_shape.setdefault(qw.shape, qw)
    rows = {"isa": cpu_isa(), "layers": layer_table(by_shape, args.m, dtype),
            "model_pass": model_pass(all_layers, args.m, dtype)}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
