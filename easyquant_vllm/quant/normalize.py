"""Column scales (format version 2): balance the spread of rows and columns before quantizing, data-free.

The idea is SINQ's (Sinkhorn-normalized quantization, 2025): rescale a weight so that the standard
deviations of its rows and of its columns even out, alternating the two as Sinkhorn's algorithm does,
then quantize. A row's factor is constant over a group, so it folds into the group's step; a column's
factor ``c[k]`` is stored (``P.col_scale``) and multiplies the activations at run time. Our version works
on the weight with its outliers removed (they stay exact, in the original domain), per tile of ``G``
columns (a group's columns share row factors, as the quantizer's groups do), on all rows of the layers that
share a column scale (see ``converters/convert.py``).

Every quantity is a sum over a tile's columns or over all rows, so each iteration is four batched
matrix-vector products over ``x`` and ``x**2`` laid out tile-major (one pass each, at memory speed) instead
of re-scaling the matrix: with ``y = x / c / r``, ``var_row(y)[n, t] = var_tile(x / c)[n, t] / r[n, t]**2``
and ``var_col(y)[k] = var_n(x[:, k] / r[:, t(k)]) / c[k]**2``.
"""

from __future__ import annotations

import torch

_STEP_CLAMP = (0.7, 2.0)  # per-iteration factor bounds: move in small, stable steps (SINQ's)
_LOG_BOUNDS = (-0.3, 10.0)  # bounds of the accumulated log factors (SINQ's)
_STD_CLAMP = (1e-3, 1e3)


def sinkhorn_column_scale(w: torch.Tensor, group: int, iters: int = 4) -> torch.Tensor:
    """Column factors ``c [K]`` float32 (> 0) that balance row and column spreads of ``w``.

    Args:
        w: ``[N, K]`` float weights (outliers already set to 0): all rows that will share the scale.
        group: tile width ``G`` (the quantization group; ``K`` for per-channel steps); ``K % G == 0``.
        iters: Sinkhorn iterations (4 measured as good as 16 on SmolLM2 and Gemma-3; docs/results.md). Per
            tile the factors with the lowest imbalance seen are kept (``max/min`` over its row and column
            spreads), and a tile stops once its imbalance rises (SINQ's early exit).

    Returns:
        ``c`` such that ``w / c`` has balanced spreads; the row factors are left to the group steps.
    """
    n, k = w.shape
    g = group
    tiles = k // g
    x = w.float().view(n, tiles, g).permute(1, 0, 2).contiguous()  # [T, N, G]: a tile's rows contiguous
    x2 = x.square()
    inv_c = torch.ones(tiles, g, 1, dtype=torch.float32)  # 1 / column factor, [T, G, 1]
    inv_r = torch.ones(tiles, 1, n, dtype=torch.float32)  # 1 / row factor per tile, [T, 1, N]

    def spreads() -> tuple[torch.Tensor, torch.Tensor]:
        """Standard deviations of the rows ``[T, N]`` and columns ``[T, G]`` of ``x / c / r``, per tile."""
        s1 = torch.bmm(x, inv_c).squeeze(2)  # [T, N]: sum over the tile's columns of x / c
        s2 = torch.bmm(x2, inv_c.square()).squeeze(2)
        row = ((s2 - s1.square() / g) / (g - 1)).clamp_min(0).sqrt() * inv_r.squeeze(1)
        c1 = torch.bmm(inv_r, x).squeeze(1)  # [T, G]: sum over rows of x / r
        c2 = torch.bmm(inv_r.square(), x2).squeeze(1)
        col = ((c2 - c1.square() / n) / max(n - 1, 1)).clamp_min(0).sqrt() * inv_c.squeeze(2)
        return row, col

    def imbalance(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:  # [T]
        lo = torch.minimum(row.amin(1), col.amin(1)).clamp_min(1e-12)
        hi = torch.maximum(row.amax(1), col.amax(1))
        return hi / lo

    row, col = spreads()
    target = torch.minimum(row.clamp(*_STD_CLAMP).amin(1), col.clamp(*_STD_CLAMP).amin(1)) + 1e-6  # [T]
    log_c = torch.zeros(tiles, g, dtype=torch.float32)
    log_r = torch.zeros(tiles, n, dtype=torch.float32)
    best = imbalance(row, col)
    best_c = log_c.clone()
    running = torch.ones(tiles, dtype=torch.bool)
    for _ in range(iters):
        step_c = (col.clamp(*_STD_CLAMP) / target[:, None]).clamp(*_STEP_CLAMP).log()
        step_r = (row.clamp(*_STD_CLAMP) / target[:, None]).clamp(*_STEP_CLAMP).log()
        log_c = torch.where(running[:, None], (log_c + step_c).clamp(*_LOG_BOUNDS), log_c)
        log_r = torch.where(running[:, None], (log_r + step_r).clamp(*_LOG_BOUNDS), log_r)
        inv_c = (-log_c).exp().unsqueeze(2)
        inv_r = (-log_r).exp().unsqueeze(1)
        row, col = spreads()
        imb = imbalance(row, col)
        better = (imb <= best) & running
        best = torch.where(better, imb, best)
        best_c = torch.where(better[:, None], log_c, best_c)
        running &= imb <= best  # a tile whose imbalance rose stops
        if not bool(running.any()):
            break
    return best_c.exp().reshape(k)
