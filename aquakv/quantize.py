"""HIGGS quantization of a residual: rotate, scale, nearest grid point, bit-pack; and the exact inverse.

``x [..., C]`` -> per ``g``-channel group: randomized Hadamard rotation, the group's L2 norm
as its scale, the normalized group (coordinates ~ N(0, 1)) cut into ``d``-dim vectors, each
replaced by the index of its nearest grid point; indices bit-packed per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aquakv import kernels
from aquakv.config import QuantizerConfig
from aquakv.errors import NonFiniteError
from aquakv.grids import nearest
from aquakv.hadamard import rotate, unrotate
from aquakv.packing import pack, unpack


@dataclass
class Quantized:
    """Packed codes ``[..., row_bytes]`` uint8 and scales ``[..., n_groups]`` for ``channels`` channels."""

    codes: torch.Tensor
    scales: torch.Tensor
    channels: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


def quantize(x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, cfg: QuantizerConfig) -> Quantized:
    """Quantize ``x [..., C]`` with ``grid [n, d]`` and Hadamard ``signs [g]``: the Triton kernel on CUDA where it
    applies (same codes but for near-ties, same byte layout; ``AQUAKV_KERNELS=0`` at import turns it off), else
    :func:`quantize_reference`."""
    if x.is_cuda and kernels.available(x.device) and kernels.supports(cfg):
        from aquakv.kernels import host

        _check_finite(x)
        codes, scales = host.quantize(x, grid, signs, cfg)
        return Quantized(codes, scales, x.shape[-1])
    return quantize_reference(x, grid, signs, cfg)


def dequantize(q: Quantized, grid: torch.Tensor, signs: torch.Tensor, cfg: QuantizerConfig) -> torch.Tensor:
    """Inverse of :func:`quantize` -> ``[..., C]`` float32 (the Triton kernel on CUDA where it applies)."""
    if q.codes.is_cuda and kernels.available(q.codes.device) and kernels.supports(cfg):
        from aquakv.kernels import host

        return host.dequantize(q.codes, q.scales, q.channels, grid, signs, cfg)
    return dequantize_reference(q, grid, signs, cfg)


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(
            f"quantizer input of shape {tuple(x.shape)} holds NaN or Inf; check the model's activations "
            "(dtype overflow?) before compressing them"
        )


def unit_vectors(x: torch.Tensor, signs: torch.Tensor, cfg: QuantizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """What the grid quantizes: ``x [..., C]`` rotated per group, each group scaled to norm ``sqrt(g)`` (coordinates
    ~ N(0, 1) for Gaussian data), cut into ``d``-dim vectors ``[..., G*g/d, d]``; and the group norms ``[..., G]``."""
    g, d = cfg.group_size, cfg.dim
    groups = rotate(x.float(), signs.float())  # [..., G, g]
    norms = groups.norm(dim=-1, keepdim=True)
    unit = groups * (g**0.5) / norms.clamp_min(1e-12)
    return unit.reshape(*unit.shape[:-2], -1, d), norms.squeeze(-1)


def quantize_reference(x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, cfg: QuantizerConfig) -> Quantized:
    """The PyTorch reference of :func:`quantize`, on any device."""
    _check_finite(x)
    unit, norms = unit_vectors(x, signs, cfg)
    idx = nearest(unit, grid.to(unit))  # [..., G*g/d]
    return Quantized(pack(idx, cfg.index_bits), norms.clamp(max=cfg.scale_max).to(cfg.torch_scale_dtype), x.shape[-1])


def dequantize_reference(q: Quantized, grid: torch.Tensor, signs: torch.Tensor, cfg: QuantizerConfig) -> torch.Tensor:
    """The PyTorch reference of :func:`dequantize`, on any device."""
    g, d = cfg.group_size, cfg.dim
    n_groups = q.scales.shape[-1]
    idx = unpack(q.codes, cfg.index_bits, n_groups * g // d)
    unit = grid.to(q.scales.device, torch.float32)[idx].reshape(*idx.shape[:-1], n_groups, g)
    groups = unit * (q.scales.float().unsqueeze(-1) * g**-0.5)
    return unrotate(groups, signs.float().to(groups.device), q.channels)
