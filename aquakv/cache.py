"""The AQUA-KV cache for ``transformers`` generation.

Per layer and sequence::

    [sinks: first `sinks` tokens, exact] [compressed tokens: codes + scales] [recent window: < W tokens, exact]

When the window reaches ``W = recent_window`` tokens they are compressed, layer by layer in the
forward pass that fills them (``update`` runs for layers 0..L-1 in order, so layer ``l`` sees layer
``l-1``'s reconstruction of the same tokens). Reading layer ``l``'s old tokens needs layer ``l-1``'s
reconstruction of them: it is kept for the current forward pass only (one layer's worth, a scratch),
never the whole uncompressed cache. Keys are stored before RoPE and re-rotated at their own positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from aquakv import kernels
from aquakv.bundle import Bundle, check_fingerprint, fingerprint_of
from aquakv.codec import EncodedBlock, LayerCodec, decode, encode
from aquakv.config import CacheConfig
from aquakv.quantize import Quantized
from aquakv.rope import apply_rope, invert_rope, track_positions

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Shared:
    """What all layers of one cache share: positions of the non-sink tokens ``[B, n]`` (int32, appended by layer 0)
    and, during a forward pass, the previous layer's reconstruction of the old tokens and of the block being compressed.
    """

    rotary: torch.nn.Module
    kernels_fit: bool = False  # every layer's quantizers are handled by the Triton kernels
    positions: torch.Tensor | None = None
    prev_old: Pair | None = None
    prev_new: Pair | None = None
    rope_memo: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def rope(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, stop-start, head_dim]`` (float32) of non-sink tokens ``start:stop``, memoized per pass."""
        if self.rope_memo is None or self.rope_memo[0] < stop:
            pos = self.positions[:, :stop].to(device)
            cos, sin = self.rotary(torch.zeros(1, device=device, dtype=torch.float32), pos.long())
            self.rope_memo = (stop, cos, sin)
        _, cos, sin = self.rope_memo
        return cos[:, start:stop], sin[:, start:stop]


def _cat_blocks(a: EncodedBlock | None, b: EncodedBlock) -> EncodedBlock:
    if a is None:
        return b

    def cat(x: Quantized, y: Quantized) -> Quantized:
        return Quantized(torch.cat([x.codes, y.codes], 1), torch.cat([x.scales, y.scales], 1), x.channels)

    return EncodedBlock(cat(a.keys, b.keys), cat(a.values, b.values))


class AquaKVLayer(CacheLayerMixin):
    """One decoder layer's compressed cache (see module docstring)."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, layer_idx: int, codec: LayerCodec, config: CacheConfig, shared: _Shared):
        super().__init__()
        self.layer_idx, self.codec, self.config, self.shared = layer_idx, codec, config, shared
        self.sink_keys = self.sink_values = None
        self.compressed: EncodedBlock | None = None
        self.compressed_len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[:, :, :0]
        self.sink_keys, self.sink_values = empty, value_states[:, :, :0]
        self.keys, self.values = empty, value_states[:, :, :0]  # the exact recent window
        self.shared.kernels_fit &= kernels.supports_head_dim(key_states.shape[-1])
        self.codec = self.codec.to(self.device)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.compressed_len + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = self.sink_keys = self.sink_values = self.compressed = None
        self.compressed_len = 0
        if self.layer_idx == 0:
            self.shared.positions = None

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, hd]`` -> ``[B, T, H*hd]`` float32."""
        b, h, t, hd = x.shape
        return x.float().transpose(1, 2).reshape(b, t, h * hd)

    def _heads(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[B, T, H*hd]`` -> ``[B, H, T, hd]`` in ``like``'s dtype."""
        b, h, _, hd = like.shape
        return x.view(b, -1, h, hd).transpose(1, 2).to(like.dtype)

    def _read_compressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values of the compressed tokens; leaves this layer's reconstruction for the next."""
        if self.shared.kernels_fit and self.device.type == "cuda" and kernels.enabled(self.device):  # fused, all layers
            return kernels.read_compressed(self)
        if self.compressed_len == 0:
            self.shared.prev_old = None
            return self.sink_keys[:, :, :0], self.sink_values[:, :, :0]
        keys_hat, values_hat = decode(self.compressed, self.shared.prev_old, self.codec)
        self.shared.prev_old = (keys_hat, values_hat)
        cos, sin = self.shared.rope(0, self.compressed_len, self.device)
        keys = apply_rope(self._heads(keys_hat, self.keys).float(), cos, sin).to(self.dtype)
        return keys, self._heads(values_hat, self.values)

    def _compress_window(self, count: int) -> None:
        """Move the oldest ``count`` window tokens into compressed storage."""
        start = self.compressed_len
        cos, sin = self.shared.rope(start, start + count, self.device)
        keys = invert_rope(self.keys[:, :, :count].float(), cos, sin)
        block, recon = encode(self._flat(keys), self._flat(self.values[:, :, :count]),
                              self.shared.prev_new, self.codec)
        self.shared.prev_new = recon
        self.compressed = _cat_blocks(self.compressed, block)
        self.compressed_len += count
        self.keys, self.values = self.keys[:, :, count:], self.values[:, :, count:]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> Pair:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_sink = min(max(self.config.sinks - self.sink_keys.shape[-2], 0), key_states.shape[-2])
        if n_sink:
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :n_sink]], -2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :n_sink]], -2)
        if self.layer_idx == 0:
            self._track_positions(key_states.shape[0], key_states.shape[-2], n_sink)
        self.keys = torch.cat([self.keys, key_states[:, :, n_sink:]], -2)
        self.values = torch.cat([self.values, value_states[:, :, n_sink:]], -2)

        old_keys, old_values = self._read_compressed()
        keys = torch.cat([self.sink_keys, old_keys, self.keys], -2)
        values = torch.cat([self.sink_values, old_values, self.values], -2)

        window = self.config.recent_window
        if self.config.compress and self.keys.shape[-2] >= window:
            self._compress_window(self.keys.shape[-2] // window * window)
        return keys, values

    def _track_positions(self, batch: int, new: int, n_sink: int) -> None:
        self.shared.rope_memo = None
        if not self.config.compress or new == n_sink:
            return
        pos = getattr(self.shared.rotary, "_aquakv_positions", None)
        if pos is None or pos.shape[-1] != new:
            raise RuntimeError("AquaKVCache could not see this forward pass's position_ids; build it with "
                               "AquaKVCache.from_bundle(bundle, model) so it can track RoPE positions")
        pos = pos[..., n_sink:].expand(batch, -1).to(torch.int32)
        old = self.shared.positions
        self.shared.positions = pos if old is None else torch.cat([old, pos.to(old.device)], 1)

    def nbytes(self) -> int:
        """Bytes this layer holds between steps: codes, scales, exact sinks and exact window."""
        if not self.is_initialized:
            return 0
        exact = sum(t.numel() * t.element_size() for t in (self.sink_keys, self.sink_values, self.keys, self.values))
        return exact + (self.compressed.nbytes if self.compressed is not None else 0)


class AquaKVCache(Cache):
    """``Cache`` whose layers store AQUA-KV-compressed keys and values. Build with :meth:`from_bundle`."""

    def __init__(self, codecs: list[LayerCodec], config: CacheConfig, rotary: torch.nn.Module):
        track_positions(rotary)
        fits = all(kernels.supports(c.keys.config) and kernels.supports(c.values.config) for c in codecs)
        self.shared = _Shared(rotary, kernels_fit=fits)
        self.config = config
        super().__init__(layers=[AquaKVLayer(i, c, config, self.shared) for i, c in enumerate(codecs)])

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str, model: torch.nn.Module, cache: CacheConfig | None = None, **overrides: object
    ) -> AquaKVCache:
        """Cache for ``model`` from a bundle (object, local path or URI); refuses a bundle of another model.

        ``cache`` (or keyword ``overrides`` such as ``recent_window=64``, ``compress=False``) replaces the
        bundle's cache layout.
        """
        if not isinstance(bundle, Bundle):
            from aquakv.registry import load_bundle

            bundle = load_bundle(bundle)
        check_fingerprint(bundle.fingerprint, fingerprint_of(model))
        config = cache or bundle.cache
        if overrides:
            config = config.model_copy(update=overrides)
        return cls(bundle.codecs, config, model.model.rotary_emb)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> Pair:
        if layer_idx == 0:
            self.shared.prev_new = None
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes held between steps by every layer, plus the shared token positions."""
        pos = self.shared.positions
        return sum(layer.nbytes() for layer in self.layers) + (0 if pos is None else pos.numel() * 4)


def dynamic_cache_nbytes(cache: Cache) -> int:
    """Bytes held by the keys and values of a ``DynamicCache``."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)
