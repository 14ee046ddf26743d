"""The CUDA kernels by the numbers that do not need a GPU: bytes per call, roofline, compile stats.

    python bench/kernels.py [--outlier-fraction 0.005] [--group-size 128]

For Llama-7B/70B linear shapes and M = 1..64 it prints the bytes the fused GEMV (cuda/eq_gemv.cu)
moves per call: int4 codes, fp16 steps, CSR outliers (16-bit value + 32-bit index each), row
pointers, activations in and out. It compares them with an fp16 GEMV's bytes. Decode GEMV is
memory-bound, so the ratio is the ideal speed-up (16 / bits per weight for the weights alone). It then
compiles every kernel with NVRTC, exactly as at run time, and prints registers and spills per
architecture.

Timings (latency, achieved GB/s against peak bandwidth) need a GPU and the CuPy launcher, which is
not written yet (issue "CUDA kernels via CuPy"). This script says so instead of printing numbers it
cannot measure.
"""

from __future__ import annotations

import argparse
import re
import sys
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outlier-fraction", type=float, default=0.005)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    g, f = args.group_size, args.outlier_fraction
    bits = 4 + 16 / g + f * 48
    print(f"# fused GEMV bytes per call, int4 g{g}, {100 * f:g} % outliers ({bits:.3f} bits/weight); "
          f"ideal weight-only speed-up over fp16: {16 / bits:.2f}x")  # fmt: skip
    print("| layer | N x K | M | EasyQuant MB | fp16 MB | ideal speed-up |\n|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        for m in (1, 4, 8, 16, 64):
            b = gemv_bytes(n, k, m, g, f)
            ours = b["weights"] + b["io"]
            path = "" if m <= 8 else " (dequant + cuBLAS path)"
            print(f"| {name}{path} | {n} x {k} | {m} | {ours / 1e6:.2f} | {b['fp16'] / 1e6:.2f} | "
                  f"{b['fp16'] / ours:.2f}x |")  # fmt: skip
    print("\nFor M > 8 the linear method dequantizes into a workspace (2 bytes/weight written and read back)"
          " and runs cuBLAS; the GEMV rows above 8 show what the GEMV alone would move.")  # fmt: skip
    try:
        from easyquant_vllm.kernels.cuda_build import ARCHS, KERNEL_NAMES, nvrtc_compile
    except ImportError as e:
        print(f"\n(no compile stats: {e})")
        return
    print("\n| kernel source | arch | registers | spills / stack |\n|---|---|---|---|")
    for source in KERNEL_NAMES:
        for arch in ARCHS:
            try:
                log = nvrtc_compile(source, arch).log
            except (ImportError, RuntimeError) as e:
                print(f"| {source} | {arch} | compile failed: {e} | |")
                continue
            regs = sorted({int(r) for r in re.findall(r"Used (\d+) registers", log)})
            spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
            clean = all(s == ("0", "0") for s in spills)
            print(f"| {source} | {arch} | {'/'.join(map(str, regs))} | {'none' if clean else spills} |")
    print("\nTimings need a GPU and the CuPy launcher (not written yet); none are printed here.")


if __name__ == "__main__":
    main()
