"""Bit layout of the packed codes: round trips and the documented nibble/byte order."""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.quant import code_offset, code_range, pack_codes, pack_factor, unpack_codes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 8 * 40)])  # (N, K): odd N, K not a power of 2
def test_pack_roundtrip(bits: int, shape: tuple[int, int]) -> None:
    u = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    words = pack_codes(u, bits)
    assert words.dtype == torch.int32
    assert words.shape == (shape[0], shape[1] // pack_factor(bits))
    assert torch.equal(unpack_codes(words, bits), u)


def test_pack_nibble_order_documented() -> None:
    # Column k is nibble k % 8 of word k // 8, lowest nibble first.
    u = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 0, 0, 0, 0, 0, 0, 0, 9]], dtype=torch.uint8)
    words = pack_codes(u, 4)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0xF7654321
    assert int(words[0, 1]) & 0xFFFFFFFF == 0x90000000


def test_pack_byte_order_documented() -> None:
    u = torch.tensor([[0x01, 0x80, 0xFF, 0x7F]], dtype=torch.uint8)
    assert int(pack_codes(u, 8)[0, 0]) & 0xFFFFFFFF == 0x7FFF8001


def test_code_ranges() -> None:
    assert code_range(4) == (-8, 7) and code_offset(4) == 8
    assert code_range(8) == (-128, 127) and code_offset(8) == 128
    with pytest.raises(ValueError, match="unsupported bits = 3"):
        pack_factor(3)


def test_pack_rejects_ragged_k() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(2, 12, dtype=torch.uint8), 4)
