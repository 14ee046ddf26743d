"""Mixed group sizes within a bit budget, measured on every row (issue 19's experiment behind ``--bits-per-weight``).

The choice is the converter's (``easyquant_vllm/quant/allocate.py``: a layout per fused module, the least relative
squared error within the budget); the converter measures each candidate on a sample of rows, this bench on all of
them, and ``per_weight=False`` tries the other weighting (every layer alike instead of every weight alike).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from converters.convert import allocation_unit
from easyquant_vllm.quant import QuantizedWeight, QuantSpec, quantize_group
from easyquant_vllm.quant.allocate import Candidate, allocate

__all__ = ["PRIORS", "allocate", "allocation_unit", "measure"]

# Data-free coefficients per layer for the allocation's objective (``--allocate --sweep``), after llama.cpp's
# Q4_K_M recipe, which gives attn_v and ffn_down more bits, and more in the first and last eighth of the layers and
# every third layer between (its ``use_more_bits``). Each maps (layer leaf name, layer index, layer count) to a
# multiplier of the layer's error; the converter's rule is 1 everywhere.
_LAYER = re.compile(r"layers\.(\d+)\.")


_MORE_BITS_LEAVES = ("v_proj", "down_proj")


def _edge(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8


def _more_bits(i: int, n: int) -> bool:
    return _edge(i, n) or (i - n // 8) % 3 == 2


PRIORS: dict[str, Callable[[str, int, int], float]] = {
    "v and down x2": lambda leaf, i, n: 2.0 if leaf in _MORE_BITS_LEAVES else 1.0,
    "v and down x4": lambda leaf, i, n: 4.0 if leaf in _MORE_BITS_LEAVES else 1.0,
    "llama.cpp's layers x2": lambda leaf, i, n: 2.0 if leaf in _MORE_BITS_LEAVES and _more_bits(i, n) else 1.0,
    "first and last eighth x2": lambda leaf, i, n: 2.0 if _edge(i, n) else 1.0,
}


def measure(
    originals: dict[str, torch.Tensor],
    specs: Sequence[QuantSpec],
    groups: Callable[[list[str], QuantSpec], list[list[str]]],
    stored_bits: Callable[[QuantizedWeight, QuantSpec], int],
    per_weight: bool | str = False,
    prior: str | None = None,
) -> dict[str, list[Candidate]]:
    """``{unit: [Candidate per spec]}`` from every row; a spec whose group size does not divide a unit's K costs
    infinite error. ``per_weight``: True, each layer's relative squared error counts times its number of weights
    (the converter's rule); False, once per layer; ``"rows"``, each row's relative squared error times its length;
    ``"abs"``, the absolute squared error ``||W - W'||^2`` (the last two tried by ``--allocate --sweep``). ``prior``:
    a key of :data:`PRIORS`, each layer's error times its multiplier."""
    if per_weight not in (True, False, "rows", "abs"):
        raise ValueError(f"per_weight: True, False, 'rows' or 'abs', got {per_weight!r}")
    depth = 1 + max((int(m.group(1)) for n in originals if (m := _LAYER.search(n))), default=0)

    def coefficient(name: str) -> float:
        if prior is None:
            return 1.0
        m = _LAYER.search(name)
        return PRIORS[prior](name.split(".")[-2], int(m.group(1)) if m else 0, depth)

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
                error[allocation_unit(name)][i] += e * coefficient(name)
                bits[allocation_unit(name)][i] += stored_bits(qw, spec)
    return {u: [Candidate(b, e) for b, e in zip(bits[u], error[u], strict=True)] for u in bits}
