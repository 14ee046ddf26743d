"""Integer codes <-> packed int32 words: the one definition of the checkpoint's bit layout.

Codes are stored unsigned, ``u`` in ``[0, 2**bits - 1]``: ``u = q + z`` with the group's zero point ``z``
(format version 2, the default, :func:`pack_zeros`), or ``z = 2**(bits-1)`` (format version 1's symmetric
codes, vLLM's ``uint4b8`` / ``uint8b128``). They are packed along the input dimension K, little end first: for
4 bit, column ``k`` is nibble ``k % 8`` (bits ``4*(k%8) .. 4*(k%8)+3``) of word ``k // 8``; for 8 bit, byte
``k % 4`` of word ``k // 4``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is a supported code width."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits = {bits}; supported: {list(SUPPORTED_BITS)}")


def pack_factor(bits: int) -> int:
    """Codes per int32 word: 8 for 4 bit, 4 for 8 bit."""
    check_bits(bits)
    return 32 // bits


def code_range(bits: int) -> tuple[int, int]:
    """Signed code range ``(q_min, q_max)``: ``(-8, 7)`` for 4 bit, ``(-128, 127)`` for 8 bit."""
    check_bits(bits)
    half = 1 << (bits - 1)
    return -half, half - 1


def code_offset(bits: int) -> int:
    """The bias between signed and stored codes, ``u = q + offset`` (8 or 128)."""
    check_bits(bits)
    return 1 << (bits - 1)


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)  # (pack_factor,)


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes into int32 words along the last dimension.

    Args:
        u: ``[N, K]`` integer tensor with values in ``[0, 2**bits - 1]``; ``K % pack_factor == 0``.
        bits: 4 or 8.

    Returns:
        ``[N, K // pack_factor]`` int32; code ``k`` sits at bits ``bits*(k % pf)`` of word ``k // pf``.
    """
    pf = pack_factor(bits)
    n, k = u.shape
    if k % pf:
        raise ValueError(f"cannot pack {k} columns into {bits}-bit words: K must be a multiple of {pf}")
    u = u.to(torch.int32).view(n, k // pf, pf)
    # Multiply-add instead of shifts so nothing overflows int32: the low pf-1 codes sum to less
    # than 2**(32-bits); the top code is taken as signed (u - 2**bits when its high bit is set),
    # which puts exactly its bit pattern into bits 32-bits..31 of a two's-complement word.
    top = u[..., pf - 1]
    top = torch.where(top >= 1 << (bits - 1), top - (1 << bits), top)
    words = top * (1 << (32 - bits))
    for j in range(pf - 1):
        words += u[..., j] * (1 << (bits * j))
    return words


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        words: ``[N, K // pack_factor]`` int32.
        bits: 4 or 8.

    Returns:
        ``[N, K]`` uint8 unsigned codes.
    """
    pf = pack_factor(bits)
    n, kw = words.shape
    mask = (1 << bits) - 1
    # Arithmetic right shift sign-extends negative words; the mask drops those bits again. int32 all the
    # way (4 bytes of temporaries per code, not the 8 of int64): load-time repacks of 70B layers stay small.
    u = (words.to(torch.int32).unsqueeze(-1) >> _shifts(bits, words.device)) & mask  # (N, K/pf, pf)
    return u.reshape(n, kw * pf).to(torch.uint8)


def pack_zeros(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-group zero points ``[N, groups]`` (values in ``[0, 2**bits - 1]``) -> ``[N, ceil(groups * bits / 8)]``
    uint8: 4 bit, group ``g`` in bits ``4*(g % 2)`` of byte ``g // 2`` (low nibble first); 8 bit, one per byte."""
    check_bits(bits)
    z = z.to(torch.uint8)
    if bits == 8:
        return z.contiguous()
    n, groups = z.shape
    if groups % 2:
        z = torch.cat([z, torch.zeros(n, 1, dtype=torch.uint8, device=z.device)], dim=1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).contiguous()


def unpack_zeros(packed: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_zeros`: ``[N, groups]`` uint8."""
    check_bits(bits)
    if bits == 8:
        return packed[:, :groups]
    z = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], 2 * packed.shape[1])
    return z[:, :groups].contiguous()


def zeros_bytes(groups: int, bits: int) -> int:
    """Bytes per row of packed zero points."""
    return (groups * bits + 7) // 8
