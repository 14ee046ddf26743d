"""Mixed group sizes within a bit budget, measured on every row (issue 19's experiment behind ``--bits-per-weight``).

The choice is the converter's (``easyquant_vllm/quant/allocate.py``: a layout per fused module, the least relative
squared error within the budget); the converter measures each candidate on a sample of rows, this bench on all of
them, and ``per_weight=False`` tries the other weighting (every layer alike instead of every weight alike).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from converters.convert import allocation_unit
from easyquant_vllm.quant import QuantizedWeight, QuantSpec, quantize_group
from easyquant_vllm.quant.allocate import Candidate, allocate

__all__ = ["allocate", "allocation_unit", "measure"]


def measure(
    originals: dict[str, torch.Tensor],
    specs: Sequence[QuantSpec],
    groups: Callable[[list[str], QuantSpec], list[list[str]]],
    stored_bits: Callable[[QuantizedWeight], int],
    per_weight: bool | str = False,
) -> dict[str, list[Candidate]]:
    """``{unit: [Candidate per spec]}`` from every row; a spec whose group size does not divide a unit's K costs
    infinite error. ``per_weight``: True, each layer's relative squared error counts times its number of weights
    (the converter's rule); False, once per layer; ``"rows"``, each row's relative squared error times its length;
    ``"abs"``, the absolute squared error ``||W - W'||^2`` (the last two tried by ``--allocate --sweep``)."""
    if per_weight not in (True, False, "rows", "abs"):
        raise ValueError(f"per_weight: True, False, 'rows' or 'abs', got {per_weight!r}")
    bits: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(specs))
    error: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(specs))
    for i, spec in enumerate(specs):
        for group in groups(list(originals), spec):
            ws = [originals[n] for n in group]
            if ws[0].shape[1] % spec.group_size:
                for n in group:
                    error[allocation_unit(n)][i] = bits[allocation_unit(n)][i] = float("inf")
                continue
            for name, w, qw in zip(group, ws, quantize_group(ws, spec, with_stats=False), strict=True):
                w = w.float()
                d2 = (w - qw.dequantize()).square()
                rel = float(d2.sum() / w.square().sum())
                if per_weight == "abs":
                    e = float(d2.sum())
                elif per_weight == "rows":
                    e = float((d2.sum(1) / w.square().sum(1).clamp_min(1e-30)).sum()) * w.shape[1]
                else:
                    e = rel * w.numel() if per_weight else rel
                error[allocation_unit(name)][i] += e
                bits[allocation_unit(name)][i] += stored_bits(qw)
    return {u: [Candidate(b, e) for b, e in zip(bits[u], error[u], strict=True)] for u in bits}
