"""Bit-packing of quantization indices so stored bytes match the nominal bits.

An index of ``b`` bits takes exactly ``b`` bits of storage (rounded up to whole bytes per
packed row), e.g. a 4-bit index of a d=2, n=16 grid costs 2 bits per value.
"""

from __future__ import annotations

import torch


def packed_bytes(count: int, bits: int) -> int:
    """Bytes needed to store ``count`` indices of ``bits`` bits each."""
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[..., m]`` integer codes in ``[0, 2**bits)`` into ``[..., packed_bytes(m, bits)]`` uint8."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    lead, m = codes.shape[:-1], codes.shape[-1]
    c = codes.to(torch.int32)
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        pad = (-m) % per
        c = torch.nn.functional.pad(c, (0, pad)).view(*lead, -1, per)
        shifts = torch.arange(per, device=c.device, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, device=c.device, dtype=torch.int32)
    bitstream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(*lead, m * bits)
    pad = (-bitstream.shape[-1]) % 8
    bitstream = torch.nn.functional.pad(bitstream, (0, pad)).view(*lead, -1, 8)
    weights = torch.arange(8, device=c.device, dtype=torch.int32)
    return (bitstream << weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., bytes]`` uint8 -> ``[..., count]`` int64 codes."""
    lead = packed.shape[:-1]
    p = packed.to(torch.int32)
    mask = (1 << bits) - 1
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
        codes = ((p.unsqueeze(-1) >> shifts) & mask).reshape(*lead, -1)
        return codes[..., :count].long()
    weights = torch.arange(8, device=p.device, dtype=torch.int32)
    bitstream = ((p.unsqueeze(-1) >> weights) & 1).reshape(*lead, -1)[..., : count * bits]
    shifts = torch.arange(bits, device=p.device, dtype=torch.int32)
    return (bitstream.view(*lead, count, bits) << shifts).sum(-1).long()
