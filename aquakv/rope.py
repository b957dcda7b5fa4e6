"""Rotary position embedding helpers: the cache compresses keys before RoPE and re-rotates them on read.

``cos, sin [B, T, head_dim]`` as produced by a transformers rotary module; keys ``[B, H, T, head_dim]``. The rotation
a cache uses is the model's own (:class:`aquakv.family.Rope`); :func:`apply_rotary_pos_emb` is the rotate-half form
the Triton kernels compute, for caches built without a model (benchmarks, kernel tests). :func:`residual_rotation`
turns a layer's RoPE into the pair a post-RoPE key residual is quantized after and un-rotated by.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from aquakv.family import Rope


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1).to(keys), sin.unsqueeze(1).to(keys)
    return keys * cos + rotate_half(keys) * sin


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's ``apply_rotary_pos_emb`` (rotate-half over whole heads)."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def remember_positions(rotary: torch.nn.Module, position_ids: torch.Tensor) -> None:
    """What the hook of :func:`track_positions` does on each call; for a caller that runs the layers of a pass
    itself (``pipeline.validate.streamed_nll``) and replays the pass's positions before its first layer."""
    rotary._aquakv_positions = position_ids


def track_positions(rotary: torch.nn.Module) -> None:
    """Make ``rotary`` remember the ``position_ids`` of its last call (once per module), so a cache can
    re-apply RoPE to the tokens it decompresses at their own positions, left padding included."""
    if getattr(rotary, "_aquakv_tracked", False):
        return

    def remember(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        remember_positions(module, kwargs["position_ids"] if "position_ids" in kwargs else args[1])

    rotary.register_forward_pre_hook(remember, with_kwargs=True)
    rotary._aquakv_tracked = True


class ResidualRotation(NamedTuple):
    """RoPE at a run of tokens' positions and its inverse, on ``[B, T, D]`` float32 (all heads of a token in a row):
    what a post-RoPE key residual is quantized after and un-rotated by (``KernelSettings.key_residual``)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def residual_rotation(rope: Rope, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> ResidualRotation:
    """The model's own RoPE of ``heads`` heads at ``cos, sin [B, T, hd]`` (:meth:`aquakv.family.Rope.rotate`), as a
    :class:`ResidualRotation`."""

    def apply(x: torch.Tensor, inverse: bool) -> torch.Tensor:
        b, t, d = x.shape
        h = x.view(b, t, heads, d // heads).transpose(1, 2)
        h = rope.unrotate(h, cos, sin) if inverse else rope.rotate(h, cos, sin)
        return h.transpose(1, 2).reshape(b, t, d)

    return ResidualRotation(lambda x: apply(x, False), lambda x: apply(x, True))
