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


# --- format version 3's group metadata at 6 bits (``group_meta_bits: 6``) ---

META_BITS = (6, 8)
"""Widths of a version-3 group's step multiplier ``a`` and zero ``zq`` (config.json's ``group_meta_bits``): 8, one
byte each, as version 3 began; 6, four values in three bytes (:func:`pack_meta6`)."""


def group_meta_bits(bits: int, meta_bits: int) -> int:
    """The metadata width a version-3 layer with ``bits``-bit codes has in a checkpoint of ``meta_bits``: narrow
    metadata applies to 4-bit layers, where it is an eighth of the layer's bytes at groups of 32; 8-bit layers (a
    quantized lm_head) keep one byte each."""
    if meta_bits not in META_BITS:
        raise ValueError(f"unsupported group_meta_bits = {meta_bits}; supported: {list(META_BITS)}")
    return meta_bits if bits == 4 else 8


def meta6_bytes(groups: int) -> int:
    """Bytes per row of :func:`pack_meta6`: three per four groups, the last four padded."""
    return 3 * ((groups + 3) // 4)


def pack_meta6(v: torch.Tensor) -> torch.Tensor:
    """``[N, groups]`` values in ``[0, 63]`` -> ``[N, meta6_bytes(groups)]`` uint8: each run of four groups is one
    24-bit little-endian word ``v0 | v1 << 6 | v2 << 12 | v3 << 18`` in three bytes (missing groups are 0)."""
    n, groups = v.shape
    if v.numel() and (int(v.max()) > 63 or int(v.min()) < 0):
        raise ValueError(f"6-bit group metadata must lie in [0, 63], got [{int(v.min())}, {int(v.max())}]")
    pad = (-groups) % 4
    v = torch.nn.functional.pad(v.to(torch.int32), (0, pad)).view(n, -1, 4)
    word = v[..., 0] | (v[..., 1] << 6) | (v[..., 2] << 12) | (v[..., 3] << 18)  # [N, groups/4] int32, 24 bits
    out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], dim=-1)
    return out.reshape(n, -1).to(torch.uint8).contiguous()


def unpack_meta6(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_meta6`: ``[N, groups]`` uint8 in ``[0, 63]``."""
    n = packed.shape[0]
    b = packed.to(torch.int32).view(n, -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    v = torch.stack([(word >> (6 * j)) & 0x3F for j in range(4)], dim=-1)
    return v.reshape(n, -1)[:, :groups].to(torch.uint8).contiguous()
