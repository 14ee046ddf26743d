"""A group size (and whether to keep outliers) per fused module, within a bit budget: data-free, from the weights' own
error (``easyquant-convert --bits-per-weight``; the converter measures the candidates).

Each fused module (vLLM's ``qkv_proj`` from q/k/v, ``gate_up_proj`` from gate/up, ``o_proj``, ``down_proj``: the
shards of one GEMM share one group size, or the loader runs them as separate GEMMs) has a few candidate layouts:
format version 3 at groups of 32, 64 or 128 columns, with the default outlier rule or with none. A candidate costs
the bits it stores and the relative squared error ``||W - W'||^2 / ||W||^2`` of each layer times its number of
weights: every weight counts alike, the data-free reading of HIGGS's linearity theorem (the model's loss grows with
the sum of per-layer relative errors, each with its own coefficient; without data the coefficients are the layers'
sizes). Counting every layer alike instead (one coefficient each) measured worse on Gemma-3's development split
(docs/results.md, "A group size per module").

The choice is a multiple-choice knapsack. A Lagrange multiplier solves it up to one step of the convex hull: each
module takes the candidate minimizing ``error + lam * bits``, with the smallest ``lam`` that meets the budget; then
the slack left below the budget goes, greedily, to the upgrades that remove the most error per extra bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One layout of one fused module: the bits it stores and its error (relative squared error times weights,
    summed over the module's layers)."""

    bits: float
    error: float


def allocate(costs: Mapping[str, Sequence[Candidate]], budget_bits: float) -> dict[str, int]:
    """The candidate index per module minimizing the total error with total bits at most ``budget_bits``.

    ``costs``: each module's candidates (an infinite error marks one a module cannot take). If even the cheapest
    candidates exceed the budget, those are returned: the caller checks the total (:func:`total_bits`).
    """

    def pick(lam: float) -> dict[str, int]:
        return {u: min(range(len(c)), key=lambda i: (cost(c[i], lam), c[i].bits)) for u, c in costs.items()}

    choice = pick(0.0)
    if total_bits(costs, choice) > budget_bits:  # the least-error choice does not fit: find the multiplier
        lo, hi = 0.0, 1.0
        while total_bits(costs, pick(hi)) > budget_bits and hi < 1e300:
            hi *= 16.0
        for _ in range(200):  # bisection on lam: the smallest multiplier whose choice fits
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if total_bits(costs, pick(mid)) > budget_bits else (lo, mid)
        choice = pick(hi)
    # The multiplier stops at a point of the convex hull and leaves the budget's slack to the next unused: spend
    # it on the upgrades with the most error removed per extra bit that still fit.
    while True:
        left = budget_bits - total_bits(costs, choice)
        best, best_rate = None, 0.0
        for u, i in choice.items():
            now = costs[u][i]
            for j, c in enumerate(costs[u]):
                extra, gain = c.bits - now.bits, now.error - c.error
                if gain > 0 and 0 < extra <= left and gain / extra > best_rate:
                    best, best_rate = (u, j), gain / extra
        if best is None:
            return choice
        choice[best[0]] = best[1]


def cost(c: Candidate, lam: float) -> float:
    """The Lagrangian of one candidate; infinite for one its module cannot take (``inf * 0`` would be NaN)."""
    return math.inf if math.isinf(c.error) or math.isinf(c.bits) else c.error + lam * c.bits


def total_bits(costs: Mapping[str, Sequence[Candidate]], choice: Mapping[str, int]) -> float:
    """The bits stored by ``choice`` (one candidate index per module)."""
    return sum(costs[u][i].bits for u, i in choice.items())
