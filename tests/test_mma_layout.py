"""The tensor-core weight layout (easyquant_vllm/kernels/mma_layout.py): exact inverse, and the nibble map."""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.kernels.mma_layout import from_mma_layout, mma_compatible, to_mma_layout
from easyquant_vllm.quant.packing import pack_codes, unpack_codes


@pytest.mark.parametrize(("n", "k"), [(16, 64), (48, 576), (32, 1024)])
def test_mma_layout_round_trips(n: int, k: int) -> None:
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n + k), dtype=torch.uint8)
    canonical = pack_codes(u, 4)
    packed = to_mma_layout(canonical)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (n // 16, k // 64 * 128)
    assert torch.equal(from_mma_layout(packed, n, k), canonical)


def test_mma_layout_puts_each_lanes_fragment_in_its_word() -> None:
    # Every nibble checked against the documented map: tile (r, b), lane 4g + t, word s, nibble p holds
    # row 16r + g (+8 for odd p % 4) and column 64b + 16s + 4t + (0, 2 for p % 4 < 2 / >= 2) (+1 for p >= 4).
    n, k = 32, 128
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    nibbles = unpack_codes(to_mma_layout(pack_codes(u, 4)).reshape(-1, 1), 4).view(2, 2, 32, 4, 8)
    for r in range(2):
        for b in range(2):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for s in range(4):
                    for p in range(8):
                        row = 16 * r + g + 8 * (p % 2)
                        col = 64 * b + 16 * s + 4 * t + 2 * ((p % 4) // 2) + p // 4
                        assert nibbles[r, b, lane, s, p] == u[row, col]


def test_mma_layout_names_the_shape_it_cannot_take() -> None:
    assert mma_compatible(576, 1536) and not mma_compatible(40, 256) and not mma_compatible(32, 96)
    with pytest.raises(ValueError, match="N % 16 == 0 and K % 64 == 0, got N = 40, K = 256"):
        to_mma_layout(torch.zeros(40, 32, dtype=torch.int32))


def test_mma_layout_in_row_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    # Large layers are regrouped a block of rows at a time (bounded temporaries); the blocks must join up.
    from easyquant_vllm.kernels import mma_layout

    u = torch.randint(0, 16, (80, 256), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    whole = to_mma_layout(pack_codes(u, 4))
    monkeypatch.setattr(mma_layout, "_BLOCK_CODES", 32 * 256)  # 32 rows per block: 3 blocks, the last short
    assert torch.equal(to_mma_layout(pack_codes(u, 4)), whole)
