"""Packing b-bit codes (b in 2, 3, 4, 8) into uint8 storage along the last axis.

Every 8 codes become `bits` bytes: the codes are laid side by side in a little-endian word (code i
at bit i*b) and the word is cut into bytes. 2- and 4-bit codes therefore share bytes (4 or 2 per
byte, the first code in the low bits) and 3-bit codes straddle bytes. A row of C codes takes
ceil(C / 8) * bits bytes; the padding codes are zero and dropped on unpacking.

Steps (pack; unpack runs them backwards):
1. pad the row to a multiple of 8 codes;
2. combine each run of 8 codes into one word: sum_i code_i << (i * bits);
3. split the word into `bits` bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PACKABLE = (2, 3, 4, 8)


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per row of `cols` b-bit codes."""
    return cols if bits == 8 else -(-cols // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., C] integer in [0, 2^bits) -> packed [..., packed_cols(C, bits)] uint8."""
    if bits not in _PACKABLE:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {', '.join(map(str, _PACKABLE))}")
    if bits == 8:
        return codes.to(torch.uint8)
    if bits in (2, 4):
        return _pack_whole_bytes(codes, bits)
    C = codes.shape[-1]
    # 1. pad to whole runs of 8 codes
    x = F.pad(codes.to(torch.int32), (0, (-C) % 8)).reshape(*codes.shape[:-1], -1, 8)  # [..., C8, 8]
    # 2. one word per run (at most 24 bits, so int32 is enough)
    shifts = torch.arange(8, dtype=torch.int32, device=codes.device) * bits
    word = (x << shifts).sum(-1, dtype=torch.int32)  # [..., C8]
    # 3. its bytes, low byte first
    byte_shifts = torch.arange(bits, dtype=torch.int32, device=codes.device) * 8
    out = (word[..., None] >> byte_shifts) & 0xFF  # [..., C8, bits]
    return out.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def _pack_whole_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Steps 1-3 for 2- and 4-bit codes, whose runs never straddle a byte: byte j of a row holds codes
    j*k .. j*k + k-1 (k = 8 / bits), the first in the low bits: the same bytes, made in uint8 directly."""
    C, k = codes.shape[-1], 8 // bits
    x = codes.to(torch.uint8)
    if C % 8:
        x = F.pad(x, (0, (-C) % 8))
    x = x.reshape(*codes.shape[:-1], -1, k)  # [..., P, k]
    out = x[..., 0].clone()
    for i in range(1, k):
        out |= x[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """packed [..., P] uint8 -> codes [..., cols] uint8 (inverse of `pack`)."""
    return unpack_codes(packed, bits, cols).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """packed [..., P] uint8 -> codes [..., cols] in uint8 or int32 (whichever is cheaper to make)."""
    if bits not in _PACKABLE:
        raise ValueError(f"cannot unpack {bits}-bit codes; supported: {', '.join(map(str, _PACKABLE))}")
    if bits == 8:
        return packed[..., :cols]
    lead, P = packed.shape[:-1], packed.shape[-1]
    mask = (1 << bits) - 1
    if bits in (2, 4) and P % 4 == 0:
        # 3. -> 1. in one go: 4 bytes read as one little-endian int32 hold 32/bits whole codes in order
        words = packed.contiguous().view(torch.int32)  # [..., P/4]
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    else:
        # 3. -> 2. bytes back into words of 8 codes
        b = packed.reshape(*lead, -1, bits).to(torch.int32)  # [..., C8, bits]
        words = b[..., 0]
        for j in range(1, bits):
            words = words | (b[..., j] << (8 * j))
        shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * bits
    # 2. -> 1. words back into codes, then drop the padding
    codes = (words[..., None] >> shifts) & mask  # [..., words, codes per word]
    return codes.reshape(*lead, -1)[..., :cols]
