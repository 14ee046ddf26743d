"""What the outliers cost and buy (issue 18's bits target): weight error against bits per weight for version 3's
outlier rule at other thresholds and caps, on MoE experts and on real dense layers.

    python bench/outlier_budget.py                                       # the two random MoEs + Qwen2.5-1.5B
    python bench/outlier_budget.py --sources .cache/moe-1b --sample 16 --groups 32

Version 3 keeps a candidate outlier (3 sigma, at most ``max_outlier_fraction`` of the entries) only where leaving it
out of its group's fit removes more than ``outlier_min_gain`` times an entry's mean squared error
(``easyquant_vllm/quant/quantize.py``). Rows: that rule at the default gain (16) and stricter ones, lower caps, and no
outliers at all; per row the bits per weight as the checkpoint stores them (counted from the bytes), the same with
two storage refinements the format does not have (16-bit outlier columns; 16-bit per-row outlier counts instead of
32-bit row pointers), the outlier share and the relative Frobenius error ||W - W'|| / ||W||, all over the sampled
tensors together. Sources are model directories (``converters/``, ``easyquant-tiny-model``); ``--sample`` takes every
n-th quantizable 2-D weight, sorted by name, so the experts of several layers are covered.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import stored_bits  # noqa: E402

from easyquant_vllm.quant import QuantizedWeight, QuantSpec, quantize_group  # noqa: E402
from easyquant_vllm.safetensors_io import open_checkpoint  # noqa: E402

DEFAULT_SOURCES = [".cache/moe-1b", ".cache/moe-mixtral-1.6b", ".cache/Qwen2.5-Coder-1.5B-Instruct"]
LAYER = re.compile(r"\.layers\.\d+\..+_proj\.weight$|\.experts\.\d+\.w[123]\.weight$")
ROWS: list[tuple[str, dict[str, float]]] = [
    ("default (gain 16, cap 0.25 %)", {}),
    ("gain 32", {"outlier_min_gain": 32.0}),
    ("gain 64", {"outlier_min_gain": 64.0}),
    ("gain 128", {"outlier_min_gain": 128.0}),
    ("cap 0.10 %", {"max_outlier_fraction": 0.001}),
    ("cap 0.05 %", {"max_outlier_fraction": 0.0005}),
    ("no outliers", {"max_outlier_fraction": 0.0}),
]


def tensor_bits(qw: QuantizedWeight) -> tuple[int, int, int]:
    """(stored bits, bits saved by 16-bit outlier columns, bits saved by 16-bit per-row counts) of one layer."""
    nnz, n = qw.outliers.nnz, qw.shape[0]
    return stored_bits(qw), 16 * nnz, 16 * (n + 1) if nnz else 0


def measure(ws: list[torch.Tensor], spec: QuantSpec) -> dict[str, float]:
    """Bits per weight (stored, and with the two refinements) and the relative error over all of ``ws``."""
    stored = cols16 = counts16 = nnz = numel = 0
    sq_err = sq_norm = 0.0
    for w in ws:
        (qw,) = quantize_group([w], spec, with_stats=False)
        b, c16, n16 = tensor_bits(qw)
        stored, cols16, counts16 = stored + b, cols16 + c16, counts16 + n16
        nnz, numel = nnz + qw.outliers.nnz, numel + w.numel()
        sq_err += float((qw.dequantize() - w).square().sum())
        sq_norm += float(w.square().sum())
    return {
        "bits": stored / numel,
        "bits_cols16": (stored - cols16) / numel,
        "bits_cols16_counts16": (stored - cols16 - counts16) / numel,
        "outlier_pct": 100 * nnz / numel,
        "rel_err": (sq_err / sq_norm) ** 0.5,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES, help="model directories (safetensors)")
    p.add_argument("--sample", type=int, default=64, help="every n-th quantizable 2-D weight (default 64)")
    p.add_argument("--groups", type=int, nargs="+", default=[32, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for src in args.sources:
        with open_checkpoint(Path(src)) as ckpt:
            names = sorted(n for n in ckpt.names() if LAYER.search(n) and len(ckpt.shape(n)) == 2)[:: args.sample]
            if not names:
                sys.exit(f"{src}: no layer weights match {LAYER.pattern}")
            ws = [ckpt.get(n).float() for n in names]
        params = sum(w.numel() for w in ws)
        print(f"\n{src}: {len(ws)} tensors ({params / 1e6:.1f} M weights), e.g. {names[0]} {list(ws[0].shape)}")
        print("| G | row | bits/weight | + 16-bit columns | + 16-bit row counts | outliers | rel. error |")
        print("|---|---|---|---|---|---|---|")
        for g in args.groups:
            base = QuantSpec.for_version(3, group_size=g)
            for label, override in ROWS:
                r = measure(ws, replace(base, **override))
                results.append({"source": src, "group_size": g, "row": label, "tensors": len(ws), **r})
                print(f"| {g} | {label} | {r['bits']:.3f} | {r['bits_cols16']:.3f} | {r['bits_cols16_counts16']:.3f} "
                      f"| {r['outlier_pct']:.3f} % | {r['rel_err']:.4f} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
