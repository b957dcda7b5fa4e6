"""Randomized Hadamard transform over channel groups (HIGGS rotation).

After multiplying a group of ``g`` channels by fixed random signs and applying the
normalized Walsh-Hadamard transform, every coordinate is close to Gaussian whatever the
input's outliers were, which is what makes one Gaussian-optimal grid fit all layers.
"""

from __future__ import annotations

import torch


def random_signs(group_size: int, seed: int) -> torch.Tensor:
    """Fixed +-1 signs ``[group_size]`` (float32) drawn from ``seed``."""
    if group_size <= 0 or group_size & (group_size - 1):
        raise ValueError(f"Hadamard group size must be a power of two, got {group_size}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (group_size,), generator=gen).float() * 2 - 1


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalized (orthonormal, self-inverse) Walsh-Hadamard transform over the last dim."""
    g = x.shape[-1]
    if g & (g - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {g}")
    lead = x.shape[:-1]
    y = x.reshape(-1, g)
    h = 1
    while h < g:
        y = y.view(-1, g // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*lead, g) * (g**-0.5)


def pad_channels(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero-pad the last dim up to a multiple of ``group_size``."""
    pad = (-x.shape[-1]) % group_size
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` -> ``[..., C_pad / g, g]``: pad, split into groups, sign-flip, Hadamard."""
    g = signs.numel()
    xp = pad_channels(x, g)
    groups = xp.reshape(*xp.shape[:-1], -1, g)
    return walsh_hadamard(groups * signs.to(groups))


def unrotate(groups: torch.Tensor, signs: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``[..., n_groups, g]`` -> ``[..., channels]``."""
    x = walsh_hadamard(groups) * signs.to(groups)
    return x.reshape(*x.shape[:-2], -1)[..., :channels]
