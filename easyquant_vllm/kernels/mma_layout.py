"""The tensor-core weight layout of cuda/eq_mma.cu: the canonical int4 codes regrouped at load time so
that each lane's 128-bit load holds exactly its ``mma.m16n8k16`` A fragments for 4 k-steps.

Canonical (checkpoint): ``qweight [N, K/8] int32``, column k = nibble k % 8 of word k / 8.
MMA layout: ``[N/16, K/64, 32, 4] int32`` (stored flat as ``[N/16, K/64 * 128]``). Tile (r, b) covers
weight rows 16r..16r+15 and columns 64b..64b+63; lane l = 4g + t (g = l >> 2, t = l & 3) holds 4 words,
word s for k-step s (columns 64b + 16s .. + 15). Inside the step the columns are permuted (the same
permutation is applied to the activations, so the product is unchanged): mma column 2t + e is
physical column 4t + e and mma column 2t + 8 + e is 4t + 2 + e (e = 0, 1). With that, lane (g, t)
needs physical columns 16s + 4t .. + 3 of rows g and g + 8, and its word holds them as

    nibble 0 / 4: row g,     columns 4t, 4t + 1   -> A register 0 (a0, a1)
    nibble 1 / 5: row g + 8, columns 4t, 4t + 1   -> A register 1 (a2, a3)
    nibble 2 / 6: row g,     columns 4t + 2, + 3  -> A register 2 (a4, a5)
    nibble 3 / 7: row g + 8, columns 4t + 2, + 3  -> A register 3 (a6, a7)

so one ``lop3`` per register turns nibbles p and p + 4 into the two halves of an f16x2 register
(the magic-number conversion of cuda/eq_int4.cuh), with no shuffles. Requires N % 16 == 0, K % 64 == 0.
"""

from __future__ import annotations

import torch

from ..quant.packing import pack_codes, unpack_codes

TILE_N = 16
TILE_K = 64

# [word nibble] -> (row offset within the 16-row tile: 0 or 8, column offset within the lane's 4 columns)
_NIBBLE_SOURCE = ((0, 0), (8, 0), (0, 2), (8, 2), (0, 1), (8, 1), (0, 3), (8, 3))


def mma_compatible(n: int, k: int) -> bool:
    return n % TILE_N == 0 and k % TILE_K == 0


def _check(n: int, k: int) -> None:
    if not mma_compatible(n, k):
        raise ValueError(f"the tensor-core layout needs N % {TILE_N} == 0 and K % {TILE_K} == 0, got N = {n}, K = {k}")


def _index(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every nibble of the MMA layout: two ``[N/16, K/64, 32 lanes, 4 words, 8 nibbles]``."""
    r = torch.arange(n // TILE_N, device=device).view(-1, 1, 1, 1, 1)
    b = torch.arange(k // TILE_K, device=device).view(1, -1, 1, 1, 1)
    lane = torch.arange(32, device=device).view(1, 1, -1, 1, 1)
    s = torch.arange(4, device=device).view(1, 1, 1, -1, 1)
    src = torch.tensor(_NIBBLE_SOURCE, device=device)
    row_off, col_off = src[:, 0].view(1, 1, 1, 1, 8), src[:, 1].view(1, 1, 1, 1, 8)
    g, t = lane // 4, lane % 4
    rows = TILE_N * r + g + row_off
    cols = TILE_K * b + 16 * s + 4 * t + col_off
    return rows, cols


def to_mma_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical ``[N, K/8] int32`` -> MMA layout ``[N/16, K/64 * 128] int32`` (a gather: no arithmetic)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    _check(n, k)
    u = unpack_codes(qweight, 4)
    rows, cols = _index(n, k, qweight.device)
    nibbles = u[rows, cols]  # [N/16, K/64, 32, 4, 8]
    return pack_codes(nibbles.reshape(-1, 8), 4).view(n // TILE_N, (k // TILE_K) * 128)


def from_mma_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`to_mma_layout`: MMA layout -> canonical ``[N, K/8] int32``."""
    _check(n, k)
    nibbles = unpack_codes(packed.reshape(-1, 1), 4).view(n // TILE_N, k // TILE_K, 32, 4, 8)
    rows, cols = _index(n, k, packed.device)
    u = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    u[rows, cols] = nibbles
    return pack_codes(u, 4)
