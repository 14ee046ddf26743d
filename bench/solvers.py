"""Reconstruction error and speed of the range optimisers, side by side on the same tensors.

    python bench/solvers.py                      # synthetic Llama-7B-shaped slices (heavy-tailed)
    python bench/solvers.py --model DIR --max-tensors 14   # real weights from a HF directory

Rows: plain RTN (no outliers), outliers + RTN, outliers + the paper's Adam (LLaMA and BLOOM
presets), outliers + our search solver (the default). Errors are relative Frobenius norms
||W - W'|| / ||W|| summed over all tensors; time is the quantization only.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.convert import DEFAULT_QUANTIZE_PATTERN
from easyquant_vllm.quant import AdamParams, QuantSpec, quantize_weight
from easyquant_vllm.safetensors_io import open_checkpoint

ROWS = {
    "outliers + RTN": dict(method="rtn"),
    "outliers + Adam (paper, LLaMA: lr 1e-4, 500 steps)": dict(method="adam", adam=AdamParams(lr=1e-4, steps=500)),
    "outliers + Adam (paper, BLOOM: lr 1e-3, 100 steps)": dict(method="adam", adam=AdamParams(lr=1e-3, steps=100)),
    "outliers + search (ours, format 1 default)": dict(method="search"),
}


def synthetic_tensors(rows: int) -> dict[str, torch.Tensor]:
    """Row slices of Llama-7B shapes, heavy-tailed (Student-t, 5 dof) with per-row scales, float16."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, k in (("q_proj", 4096), ("o_proj", 4096), ("up_proj", 4096), ("down_proj", 11008)):
        t = torch.randn(rows, k, generator=g) / torch.randn(rows, k, 5, generator=g).square().mean(-1).sqrt()
        out[name] = (t * torch.exp(0.3 * torch.randn(rows, 1, generator=g)) * 0.015).half()
    return out


def model_tensors(model_dir: Path, max_tensors: int) -> dict[str, torch.Tensor]:
    pattern = re.compile(DEFAULT_QUANTIZE_PATTERN)
    with open_checkpoint(model_dir) as ckpt:
        names = [n for n in ckpt.names() if pattern.search(n) and len(ckpt.shape(n)) == 2 and "norm" not in n]
        step = max(1, len(names) // max_tensors)  # spread over the depth of the model
        return {n: ckpt.get(n) for n in names[::step][:max_tensors]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model directory to take real weights from")
    p.add_argument("--max-tensors", type=int, default=14)
    p.add_argument("--rows", type=int, default=512, help="rows per synthetic tensor")
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    tensors = model_tensors(args.model, args.max_tensors) if args.model else synthetic_tensors(args.rows)
    params = sum(t.numel() for t in tensors.values())
    g = args.group_size
    src = f"{args.model} ({len(tensors)} tensors)" if args.model else f"synthetic 7B-shaped slices, {args.rows} rows"
    print(f"# {src}: {params / 1e6:.1f} M params, 4-bit, group {g}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")  # fmt: skip
    sq_norm = sum(float(t.float().square().sum()) for t in tensors.values())
    results = []
    rtn_err_sq = 0.0
    for label, kw in ROWS.items():
        spec = QuantSpec.for_version(1, group_size=g, **kw)
        err_sq, seconds = 0.0, 0.0
        for t in tensors.values():
            t0 = time.perf_counter()
            qw = quantize_weight(t, spec)
            seconds += time.perf_counter() - t0
            assert qw.stats is not None
            n2 = float(t.float().square().sum())
            err_sq += qw.stats.rel_err**2 * n2
            if label == "outliers + RTN":
                rtn_err_sq += qw.stats.rel_err_rtn**2 * n2
        results.append((label, (err_sq / sq_norm) ** 0.5, seconds))
    rtn = (rtn_err_sq / sq_norm) ** 0.5
    print("| method | rel. error | vs plain RTN | M params/s |\n|---|---|---|---|")
    print(f"| plain RTN (max-abs, no outliers) | {rtn:.4f} | - | - |")
    for label, err, seconds in results:
        print(f"| {label} | {err:.4f} | {100 * (err / rtn - 1):+.1f} % | {params / seconds / 1e6:.2f} |")


if __name__ == "__main__":
    main()
