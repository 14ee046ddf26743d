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

# Nibble p of a word is (row offset h * 8, column offset 2 * e2 + e) with p = 4 * e + 2 * e2 + h: the
# order of the last three axes of the permuted view below.
_CANONICAL_AXES = "r h g b s t e2 e"  # row = 16 r + 8 h + g, column = 64 b + 16 s + 4 t + 2 e2 + e
_MMA_AXES = "r b g t s e e2 h"  # tile, k-block, lane = 4 g + t, word s, nibble p = 4 e + 2 e2 + h
_TO_MMA = tuple(_CANONICAL_AXES.split().index(a) for a in _MMA_AXES.split())
_FROM_MMA = tuple(_MMA_AXES.split().index(a) for a in _CANONICAL_AXES.split())


def mma_compatible(n: int, k: int) -> bool:
    return n % TILE_N == 0 and k % TILE_K == 0


def _check(n: int, k: int) -> None:
    if not mma_compatible(n, k):
        raise ValueError(f"the tensor-core layout needs N % {TILE_N} == 0 and K % {TILE_K} == 0, got N = {n}, K = {k}")


_BLOCK_CODES = 1 << 24  # codes regrouped per step: bounds the temporaries (~10 bytes per code) to ~160 MB


def to_mma_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical ``[N, K/8] int32`` -> MMA layout ``[N/16, K/64 * 128] int32``.

    A fixed permutation of the nibbles inside each 16 x 64 tile, done as one view + permute of the
    ``[N, K]`` uint8 codes: no index tensors. Tiles of 16 rows are independent, so it runs over blocks of
    rows: the temporaries stay bounded whatever the layer (a 70B fused gate_up has 470 M codes).
    """
    n, k = qweight.shape[0], qweight.shape[1] * 8
    _check(n, k)
    out = torch.empty(n // TILE_N, (k // TILE_K) * 128, dtype=torch.int32, device=qweight.device)
    rows = max(TILE_N, _BLOCK_CODES // k // TILE_N * TILE_N)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        u = unpack_codes(qweight[r0:r1], 4).view((r1 - r0) // TILE_N, 2, 8, k // TILE_K, 4, 4, 2, 2)
        block = pack_codes(u.permute(_TO_MMA).reshape(-1, 8), 4)
        out[r0 // TILE_N : r1 // TILE_N] = block.view((r1 - r0) // TILE_N, (k // TILE_K) * 128)
    return out


def from_mma_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`to_mma_layout`: MMA layout -> canonical ``[N, K/8] int32``."""
    _check(n, k)
    u = unpack_codes(packed.reshape(-1, 1), 4).view(n // TILE_N, k // TILE_K, 8, 4, 4, 2, 2, 2)
    return pack_codes(u.permute(_FROM_MMA).reshape(n, k), 4)
