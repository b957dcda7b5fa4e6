"""Caches aquakv is compared against: exact, HIGGS without predictors, KIVI-style 2/3-bit, quanto.

All are built by :func:`make_cache` from a method name, so evaluation and benchmarks share one switch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import Cache, DynamicLayer

from aquakv.bundle import Bundle
from aquakv.cache import AquaKVCache
from aquakv.codec import Residual
from aquakv.config import CacheConfig
from aquakv.grids import gaussian_grid
from aquakv.kernels.settings import KernelSettings
from aquakv.packing import pack, unpack

METHODS = ("exact", "aquakv", "no-predictors", "kivi-2bit", "kivi-2bit-g32", "kivi-3bit", "quanto-int2",
           "quanto-int4")
_KIVI = re.compile(r"kivi-(\d)bit(?:-g(\d+))?")  # bits; the values' channel group (default 64)


def without_predictors(bundle: Bundle) -> Bundle:
    """HIGGS as published: each layer's quantizer config and Hadamard signs, the data-free Gaussian grid of its size
    (not a grid fitted to the predictors' residuals), no inter-layer predictors."""
    def plain(r: Residual) -> Residual:
        return replace(r, grid=gaussian_grid(r.config.dim, r.config.size).to(r.grid))

    codecs = [replace(c, keys=plain(c.keys), values=plain(c.values), key_predictor=None, value_predictor=None)
              for c in bundle.codecs]
    return Bundle(codecs, bundle.cache, bundle.manifest)


def kivi_bits(method: str, residual: int) -> float:
    """Stored bits per compressed value of a ``kivi-<b>bit[-g<group>]`` method: keys carry an fp16 scale and zero per
    channel per ``residual`` tokens, values per token per channel group; half the values are each."""
    bits, group = _kivi_params(method)
    return bits + 0.5 * (32 / residual) + 0.5 * (32 / group)


def _kivi_params(method: str) -> tuple[int, int]:
    m = _KIVI.fullmatch(method)
    if m is None:
        raise ValueError(f"unknown cache method {method!r}; choose from {', '.join(METHODS)}")
    bits, group = int(m[1]), int(m[2] or 64)
    if not 1 <= bits <= 8 or group < 2 or group & (group - 1):
        raise ValueError(f"{method}: KIVI needs 1 to 8 bits and a power-of-two channel group >= 2")
    return bits, group


def _quantize_minmax(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization along ``dim``: codes (packed on the last dim), fp16 scale and zero."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    codes = torch.round((x - lo) / scale).clamp(0, 2**bits - 1).to(torch.int32)
    return pack(codes, bits), scale.half(), lo.half()


def _dequantize_minmax(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack(codes, bits, n).float() * scale.float() + zero.float()


class KIVILayer(DynamicLayer):
    """KIVI-style cache layer: keys per channel over blocks of ``residual`` tokens, values per token in channel
    groups of ``group``, asymmetric ``bits``-bit, the last < ``residual`` tokens exact."""

    is_croppable = False

    def __init__(self, bits: int = 2, residual: int = 128, group: int = 64):
        super().__init__()
        self.bits, self.residual, self.group = bits, residual, group
        self.blocks: list[tuple] = []
        self.quantized_len = 0
        # each block's dequantized keys and values, concatenated (a block never changes once compressed, so it is
        # dequantized once, not at every step: the same tensors; the concatenation is the only per-block cost left);
        # a simulation's scratch, not counted by held_bytes
        self._old: tuple[torch.Tensor, torch.Tensor] | None = None

    def _compress(self, keys: torch.Tensor, values: torch.Tensor) -> tuple:
        b, h, t, hd = values.shape
        self.group = min(self.group, hd)
        kq = _quantize_minmax(keys.float().transpose(-1, -2), self.bits, dim=-1)  # [B,H,hd,t]: per channel
        vg = values.float().reshape(b, h, t, hd // self.group, self.group)
        vq = _quantize_minmax(vg, self.bits, dim=-1)  # per token, per channel group
        return kq, vq, t

    def _decompress(self, block: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        (kc, ks, kz), (vc, vs, vz), t = block
        keys = _dequantize_minmax(kc, ks, kz, self.bits, t).transpose(-1, -2)
        values = _dequantize_minmax(vc, vs, vz, self.bits, self.group).flatten(-2)
        return keys.to(self.dtype), values.to(self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.dtype = key_states.dtype  # transformers >= 5.24 no longer sets it in lazy_initialization
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        old = [] if self._old is None else [self._old]
        keys = torch.cat([k for k, _ in old] + [self.keys], -2)
        values = torch.cat([v for _, v in old] + [self.values], -2)
        while self.keys.shape[-2] >= self.residual:
            r = self.residual
            self.blocks.append(self._compress(self.keys[:, :, :r], self.values[:, :, :r]))
            k, v = self._decompress(self.blocks[-1])
            self._old = (k, v) if self._old is None else (torch.cat([self._old[0], k], -2),
                                                         torch.cat([self._old[1], v], -2))
            self.quantized_len += r
            self.keys, self.values = self.keys[:, :, r:], self.values[:, :, r:]
        return keys, values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.quantized_len + self.keys.shape[-2]


def held_bytes(cache: Cache) -> int:
    """Bytes a cache holds between steps, for any of :data:`METHODS` (quantized tensors counted by their storage)."""
    if isinstance(cache, AquaKVCache):
        return cache.nbytes()

    def size(t: object) -> int:
        if t is None:
            return 0
        if isinstance(t, (list, tuple)):
            return sum(size(x) for x in t)
        if hasattr(t, "__tensor_flatten__"):  # quanto tensors: count their inner storage
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    total = 0
    for layer in cache.layers:
        total += size(layer.keys) + size(layer.values)
        total += size(getattr(layer, "_quantized_keys", None)) + size(getattr(layer, "_quantized_values", None))
        total += size(getattr(layer, "blocks", None))
    return total


def make_cache(method: str, model: torch.nn.Module, bundle: Bundle | None = None,
               cache: CacheConfig | None = None, kernels: KernelSettings | None = None) -> Callable[[], Cache]:
    """A factory of fresh caches for ``method`` (see :data:`METHODS`); ``kernels``: the AQUA-KV caches' backend
    options (default :meth:`KernelSettings.from_env`), e.g. ``keep_reconstructions`` for evaluation on a CPU."""
    cfg = cache or (bundle.cache if bundle is not None else CacheConfig())
    if method == "exact":
        return lambda: DynamicCache(config=model.config)
    if method in ("aquakv", "no-predictors"):
        if bundle is None:
            raise ValueError(f"method {method!r} needs a bundle")
        b = bundle if method == "aquakv" else without_predictors(bundle)
        return lambda: AquaKVCache.from_bundle(b, model, cfg, kernels=kernels)
    if method.startswith("kivi-"):
        bits, group = _kivi_params(method)
        n = model.config.num_hidden_layers
        return lambda: Cache(layers=[KIVILayer(bits, cfg.recent_window, group) for _ in range(n)])
    if method.startswith("quanto-int"):
        try:
            import optimum.quanto  # noqa: F401
        except ImportError as e:
            raise ValueError(f"{method} needs optimum-quanto: pip install optimum-quanto") from e
        bits = int(method.removeprefix("quanto-int"))
        return lambda: QuantizedCache(backend="quanto", config=model.config, nbits=bits,
                                      residual_length=cfg.recent_window, q_group_size=64)
    raise ValueError(f"unknown cache method {method!r}; choose from {', '.join(METHODS)}")
