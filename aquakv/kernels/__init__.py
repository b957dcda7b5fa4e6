"""Triton kernels for AQUA-KV on CUDA; the PyTorch code in :mod:`aquakv.quantize`, :mod:`aquakv.codec` and
:mod:`aquakv.attention` stays the reference.

Split by role:

- :mod:`aquakv.kernels.settings`: :class:`KernelSettings`, the frozen options a cache hands to its backend.
- :mod:`aquakv.kernels.jit`: the ``@triton.jit`` kernels (imported only where Triton is).
- :mod:`aquakv.kernels.host`: host wrappers of the codec kernels: quantize, dequantize, the predict + dequantize +
  RoPE epilogue, and ``read_compressed`` (reconstruct a layer's compressed tokens, then the model attends).
- :mod:`aquakv.kernels.decode`: the decode path: flash-decoding attention straight from the compressed cache.
- :mod:`aquakv.kernels.cuda` (+ ``cuda_decode.cu``): the CUDA decode kernel for post-RoPE key residuals with stored
  projections, compiled at run time with NVRTC (``CudaBackend``).

The Triton modules work on tensors (codes, scales, grids) and never import :mod:`aquakv.quantize`, which dispatches
to them. :mod:`aquakv.kernels.cuda` is imported only by its backend (never by :mod:`aquakv.quantize`'s dispatch) and
works on the codec's blocks, so it imports :mod:`aquakv.codec`. :mod:`aquakv.attention` chooses a backend once per
cache.
"""

from __future__ import annotations

import torch

from aquakv.config import QuantizerConfig
from aquakv.kernels.settings import ENV_ENABLED, INTERPRET, KernelSettings

try:  # Triton is optional: CPU-only installs import this package and never call a kernel
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised on CPU-only installs
    HAS_TRITON = False


def available(device: torch.device | str | None = None, settings: KernelSettings | None = None) -> bool:
    """Whether the kernels can run on ``device``: Triton importable, CUDA (or CPU under ``TRITON_INTERPRET=1``) and
    not turned off (``settings.enabled``, or ``AQUAKV_KERNELS`` as read at import when no settings are given)."""
    on = settings.enabled if settings is not None else ENV_ENABLED
    if not (HAS_TRITON and on):
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    return (dev.type == "cuda" and torch.cuda.is_available()) or (INTERPRET and dev.type == "cpu")


def supports_head_dim(head_dim: int) -> bool:
    """Head sizes the fused cache read handles (one RoPE tile per head, a multiple of 64)."""
    return head_dim % 64 == 0 and head_dim <= 256


def supports(cfg: QuantizerConfig) -> bool:
    """Quantizer configs the kernels handle: d in {1, 2, 4}, at most 10 index bits (a code spans at most two bytes),
    16 <= g/d, g <= 512."""
    v = cfg.group_size // cfg.dim
    return cfg.dim in (1, 2, 4) and cfg.index_bits <= 10 and v >= 16 and v % 8 == 0 and cfg.group_size <= 512


__all__ = ["HAS_TRITON", "INTERPRET", "KernelSettings", "available", "supports", "supports_head_dim"]
