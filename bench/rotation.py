"""Incoherence processing (issue 19): does a randomized Hadamard rotation before format version 3 lower the weight
error, on real layers and on synthetic heavy-tailed ones? The fast, weight-only half of the experiment; the model
half (KL divergence) is ``bench/fidelity.py --rotation``.

    python bench/rotation.py                                   # the three models' layers + Student-t weights
    python bench/rotation.py --layers 3 9 --groups 64 128

Rows per tensor and group size G: version 3 as the converter writes it ("plain"), the same after rotating the
columns in blocks of G (``bench/quality.py: rotate``; outliers picked by version 3 in the rotated domain), and
rotated with the n-sigma outliers taken from the original weights first ("outliers first", kept in the original
domain). Each cell: relative Frobenius error ||W - W'|| / ||W|| and the bits per weight a checkpoint would store.
Real layers: the published GGUFs of the three models, dequantized (their builders under ``converters/``), so
their weights already lie on 4- to 6-bit grids; synthetic: Student-t weights with per-row scales, the shape of a
bf16 model's heavy tails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import MODELS, build_model, eq_spec, rotated_dequant, stored_bits  # noqa: E402

from easyquant_vllm.quant import quantize_group  # noqa: E402
from easyquant_vllm.safetensors_io import open_checkpoint  # noqa: E402

PROJ = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")


def student_t(df: int, n: int = 1024, k: int = 1024, seed: int = 0) -> torch.Tensor:
    """``[n, k]`` float32 Student-t weights (``df`` degrees of freedom) with log-normal per-row scales, std ~0.02:
    ``tests/conftest.py: heavy_tailed`` with the tail as a parameter."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, k, generator=g) / torch.randn(n, k, df, generator=g).square().mean(-1).sqrt()
    return t * torch.exp(0.3 * torch.randn(n, 1, generator=g)) * 0.015


def cells(w: torch.Tensor, group: int) -> list[tuple[float, float]]:
    """(relative error, bits per weight) of plain, rotated and rotated-with-outliers-first version 3."""
    spec = eq_spec(3, group)
    qw = quantize_group([w], spec, with_stats=False)[0]
    out = [(float((qw.dequantize() - w).norm() / w.norm()), stored_bits(qw) / w.numel())]
    for first in (False, True):
        (wq,), bits, _ = rotated_dequant([w], spec, first)
        out.append((float((wq - w).norm() / w.norm()), bits / w.numel()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--layers", type=int, nargs="+", default=[9])
    p.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--df", type=int, nargs="*", default=[3, 5, 30], help="Student-t degrees of freedom")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    tensors: list[tuple[str, torch.Tensor]] = []
    for key in args.models:
        src = build_model(MODELS[key], args.cache)
        with open_checkpoint(src) as ckpt:
            for layer in args.layers:
                for proj in PROJ:
                    name = f"model.layers.{layer}.{proj}.weight"
                    tensors.append((f"{MODELS[key].title} {layer}.{proj}", ckpt.get(name).float()))
    tensors += [(f"Student-t, {df} dof", student_t(df)) for df in args.df]

    print("| tensor | shape | G | plain | rotated | rotated, outliers first |\n|---|---|---|---|---|---|")
    for name, w in tensors:
        for g in (g for g in args.groups if w.shape[1] % g == 0):
            row = " | ".join(f"{e:.4f} ({b:.3f} b)" for e, b in cells(w, g))
            print(f"| {name} | {list(w.shape)} | {g} | {row} |", flush=True)


if __name__ == "__main__":
    main()
