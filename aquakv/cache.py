"""The AQUA-KV cache for ``transformers`` generation.

Per layer and sequence::

    [sinks: first `sinks` tokens, exact] [compressed tokens: codes + scales] [recent window: < W tokens, exact]

When the window reaches ``W = recent_window`` tokens they are compressed, layer by layer in the
forward pass that fills them (``update`` runs for layers 0..L-1 in order, so layer ``l`` sees layer
``l-1``'s reconstruction of the same tokens). Reading layer ``l``'s old tokens needs layer ``l-1``'s
reconstruction of them: it is kept for the current forward pass only (one layer's worth, a scratch),
never the whole uncompressed cache. Keys are stored before RoPE and re-rotated at their own positions.

Reading goes through a backend chosen once per cache (:mod:`aquakv.attention`): either ``update`` returns full keys
and values (reconstruct, then the model attends), or, in the fused protocol, only the exact segments tagged so that
the model's ``"aquakv"`` attention function attends straight from the compressed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from aquakv.attention import IMPLEMENTATION, Backend, Segments, install, select_backend
from aquakv.bundle import Bundle, check_fingerprint, fingerprint_of
from aquakv.codec import EncodedBlock, LayerCodec, Projections, stored_factors
from aquakv.config import CacheConfig
from aquakv.errors import ConfigError, ModelMismatchError
from aquakv.family import LayerSpec, Rope, describe_model, kv_heads, llama_specs, predecessors, rotary_module
from aquakv.kernels.settings import KernelSettings
from aquakv.quantize import Quantized
from aquakv.rope import ResidualRotation, residual_rotation, track_positions

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Shared:
    """What all layers of one cache share: positions of the non-sink tokens ``[B, n]`` (int32, appended by layer 0)
    and, during a forward pass, the predecessor's reconstruction of the old tokens and of the block being compressed
    (``prev_old`` / ``prev_new``: the slot the backends read; ``chains`` keeps one pair per attention type, keyed by
    sliding window, and swaps it in for each layer: global layers chain to the previous global layer, local layers
    to the previous local one)."""

    rotary: torch.nn.Module
    settings: KernelSettings
    codecs: list[LayerCodec]
    backend: Backend | None = None  # chosen at the first update (device known), then fixed
    attn_config: object | None = None  # config of the model whose attention function takes the fused protocol
    query_groups: int = 1  # query heads per KV head of that model
    positions: torch.Tensor | None = None
    prev_old: Pair | None = None
    prev_new: Pair | None = None
    chains: dict[int | None, tuple[Pair | None, Pair | None]] = field(default_factory=dict)
    rope_memo: dict[str | None, tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rope_table: object | None = None  # CudaBackend's RoPE table by position (kernels.cuda.RopeTable), reset with them
    scratch: list[torch.Tensor | None] | None = None  # fused path: [B, capacity, 2D] reconstruction buffers
    scratch_src: int = 0  # the buffer holding the previous layer's reconstruction
    # a captured decode step (aquakv.graphs) runs while these are set: the exact-buffer index of its token (int64
    # [1]) and the exact tokens held after it (int32 [1]), on the device
    step_slot: torch.Tensor | None = None
    step_exact: torch.Tensor | None = None
    step_valid: torch.Tensor | None = None  # and for a padded batch, the keys it attends (attention.Segments.valid)
    _inv_freq: dict = field(default_factory=dict)

    @property
    def kernels_fit(self) -> bool:
        """Whether the Triton backend was chosen."""
        return self.backend is not None and self.backend.name == "triton"

    def fused_now(self, q_len: int) -> bool:
        """Whether this pass takes the fused protocol: settings and backend allow it, the model's attention function
        is ``"aquakv"``, and the query rows per KV head fit the kernel."""
        mode = self.settings.attention
        if mode == "full" or (mode == "auto" and not self.backend.fused):
            return False
        if self.attn_config is None or getattr(self.attn_config, "_attn_implementation", None) != IMPLEMENTATION:
            return False
        return self.query_groups * q_len <= self.backend.max_query_rows

    def ensure_scratch(self, batch: int, tokens: int, channels: int, dtype: torch.dtype,
                       device: torch.device) -> None:
        """A reconstruction buffer ``[B, capacity, 2D]`` for ``tokens`` compressed tokens (capacity in steps of 4096
        tokens); the second buffer is made only for layers that need one (:meth:`scratch_buffer`)."""
        s = self.scratch
        if s is not None and s[0].shape[0] == batch and s[0].shape[1] >= tokens and s[0].shape[2] == 2 * channels \
                and s[0].dtype == dtype and s[0].device == device:
            return
        cap = -(-tokens // 4096) * 4096
        self.scratch = [torch.empty(batch, cap, 2 * channels, dtype=dtype, device=device), None]
        self.scratch_src = 0

    def scratch_buffer(self, i: int) -> torch.Tensor:
        """Scratch buffer ``i`` (0 or 1), made like buffer 0 on first use."""
        if self.scratch[i] is None:
            self.scratch[i] = torch.empty_like(self.scratch[1 - i])
        return self.scratch[i]

    def scratch_nbytes(self) -> int:
        """Bytes of the reconstruction buffers (fused path), held between steps."""
        return sum(t.numel() * t.element_size() for t in self.scratch or [] if t is not None)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """The rotary module's inverse frequencies ``[head_dim / 2]`` float32 on ``device``."""
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = self.rotary.inv_freq.to(device, torch.float32).contiguous()
        return self._inv_freq[key]

    def add_positions(self, pos: torch.Tensor, batch: int) -> None:
        """Append the positions ``[B or 1, n]`` of ``n`` new non-sink tokens."""
        pos = pos.expand(batch, -1).to(torch.int32)
        old = self.positions
        self.positions = pos if old is None else torch.cat([old, pos.to(old.device)], 1)

    def rope(self, rope: Rope, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, stop-start, rd]`` (float32) of ``rope`` for non-sink tokens ``start:stop``, memoized per
        pass and rotary layer type."""
        memo = self.rope_memo.get(rope.layer_type)
        if memo is None or memo[0] < stop:
            cos, sin = rope.cos_sin(self.positions[:, :stop], device)
            memo = self.rope_memo[rope.layer_type] = (stop, cos, sin)
        _, cos, sin = memo
        return cos[:, start:stop], sin[:, start:stop]


class _ExactTokens:
    """One layer's exact tokens, the sinks then the recent window, in one buffer per tensor ``[B, H, capacity, hd]``.

    A step's tokens are written in place and the attention reads sinks + window as one view: no ``torch.cat`` of the
    exact segment per layer and step (there were four). Window tokens just compressed stay in the buffer until
    :meth:`settle` (``pending``): on the fused path the view this pass's attention reads must not change before it
    has run, so they go at the next write."""

    def __init__(self, like: torch.Tensor, reserve: int):
        """``like``: a ``[B, H, T, hd]`` tensor of the layer's states; ``reserve``: the capacity decode needs (sinks +
        recent window: the window is compressed when it fills)."""
        self.reserve = reserve
        self.keys = like.new_empty(*like.shape[:2], reserve, like.shape[-1])
        self.values = torch.empty_like(self.keys)
        self.sinks = self.length = self.pending = 0  # sink tokens; tokens held; compressed tokens after the sinks

    def _resize(self, capacity: int) -> None:
        keys, values = self.keys, self.values
        self.keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        self.values = torch.empty_like(self.keys)
        self.keys[:, :, :self.length] = keys[:, :, :self.length]
        self.values[:, :, :self.length] = values[:, :, :self.length]

    def settle(self) -> None:
        """Drop the pending compressed tokens: the window's tail moves down behind the sinks (once per window)."""
        if self.pending:
            s, p, n = self.sinks, self.pending, self.length
            if n - p > s:  # in decode the whole window was compressed: nothing to move
                for buf in (self.keys, self.values):
                    buf[:, :, s:n - p] = buf[:, :, s + p:n].clone()
            self.length, self.pending = n - p, 0
            if self.keys.shape[2] > max(self.length, self.reserve):  # after a prompt or a multi-token step
                self._resize(max(self.length, self.reserve))

    def append(self, keys: torch.Tensor, values: torch.Tensor, sinks: int) -> None:
        """Write ``[B, H, q, hd]`` states after the held tokens; the first ``sinks`` of them are sinks (only while
        the window is empty: sinks are the first tokens of the sequence)."""
        self.settle()
        end = self.length + keys.shape[-2]
        if end > self.keys.shape[2]:  # doubling: without compression the window grows by a token a step
            self._resize(max(end, self.reserve, 2 * self.keys.shape[2]))
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length, self.sinks = end, self.sinks + sinks

    def compressed(self, count: int) -> None:
        """The window's oldest ``count`` tokens were compressed: no longer part of the window."""
        self.pending += count

    def drop(self, sinks: int, window: int) -> None:
        """Drop the oldest ``sinks`` sinks and ``window`` window tokens (sliding layers)."""
        self.settle()
        s = self.sinks
        for buf in (self.keys, self.values):
            keep = torch.cat([buf[:, :, sinks:s], buf[:, :, s + window:self.length]], 2)
            buf[:, :, :keep.shape[2]] = keep
        self.sinks, self.length = s - sinks, self.length - sinks - window

    def views(self) -> tuple[Pair, Pair, Pair]:
        """``(sinks + window, sinks, window)`` as (keys, values) views of the buffers."""
        s, n = self.sinks, self.length
        k, v = self.keys, self.values
        return (k[:, :, :n], v[:, :, :n]), (k[:, :, :s], v[:, :, :s]), (k[:, :, s + self.pending:n],
                                                                        v[:, :, s + self.pending:n])

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def _cat_blocks(a: EncodedBlock | None, b: EncodedBlock) -> EncodedBlock:
    if a is None:
        return b

    def cat(x: Quantized, y: Quantized) -> Quantized:
        return Quantized(torch.cat([x.codes, y.codes], 1), torch.cat([x.scales, y.scales], 1), x.channels)

    projections = None
    if a.projections is not None:
        pa, pb = a.projections, b.projections
        projections = Projections(torch.cat([pa.latents, pb.latents], 1), torch.cat([pa.scales, pb.scales], 1),
                                  pa.key_width)
    return EncodedBlock(cat(a.keys, b.keys), cat(a.values, b.values), projections)


class AquaKVLayer(CacheLayerMixin):
    """One decoder layer's compressed cache (see module docstring)."""

    is_croppable = False
    supports_early_init = False

    def __init__(self, layer_idx: int, codec: LayerCodec, config: CacheConfig, shared: _Shared, spec: LayerSpec):
        """``spec``: what the layer caches (:func:`aquakv.family.describe_layer`): its RoPE (None: keys cached
        without RoPE) and sliding window (None: global attention). A sliding layer holds only what its window can
        still attend to: the last ``window - 1`` tokens, plus at most one block of ``recent_window`` waiting to be
        dropped (dropping copies, so it is done a block at a time)."""
        super().__init__()
        self.layer_idx, self.codec, self.config, self.shared = layer_idx, codec, config, shared
        self.rope, self.window = spec.rope, spec.window
        self.is_sliding = spec.window is not None
        self.exact: _ExactTokens | None = None
        self.sink_keys = self.sink_values = None  # views of ``exact``, as ``keys`` / ``values`` (the window)
        self.compressed: EncodedBlock | None = None
        self.compressed_len = 0  # compressed tokens held
        self.compressed_start = 0  # compressed tokens dropped (sliding layers): index of the first one held
        self.cumulative = 0  # tokens seen
        self.kept: Pair | None = None  # keep_reconstructions: post-RoPE keys, values of the first compressed tokens

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.exact = _ExactTokens(key_states, self.config.sinks + self.config.recent_window)
        self._refresh()
        shared = self.shared
        if shared.backend is None:
            shared.codecs = [c.to(self.device) for c in shared.codecs]
            shared.backend = select_backend(self.device, shared.codecs, key_states.shape[-1], shared.settings,
                                            key_states.shape[1], key_states.dtype, self.rope)
        self.codec = shared.codecs[self.layer_idx]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.cumulative

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the keys ``update`` returns; a sliding layer's are its window's, as
        transformers' ``DynamicSlidingWindowLayer``."""
        if self.window is None:
            return self.cumulative + query_length, 0
        return min(self.cumulative, self.window - 1) + query_length, max(self.cumulative - self.window + 1, 0)

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = self.sink_keys = self.sink_values = self.compressed = self.kept = None
        self.exact = None
        self.compressed_len = self.compressed_start = self.cumulative = 0
        if self.layer_idx == 0:  # (the RoPE table was checked against these positions)
            self.shared.positions = self.shared.rope_table = None

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, hd]`` -> ``[B, T, H*hd]`` float32."""
        b, h, t, hd = x.shape
        return x.float().transpose(1, 2).reshape(b, t, h * hd)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H*hd]`` -> ``[B, H, T, hd]`` in the model dtype."""
        b, h, _, hd = self.keys.shape
        return x.view(b, -1, h, hd).transpose(1, 2).to(self.dtype)

    def _read_compressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values of the compressed tokens; leaves this layer's reconstruction for the next
        layer of its attention type."""
        shared = self.shared
        shared.prev_old = shared.chains.get(self.window, (None, None))[0]
        out = self._read_kept() if shared.settings.keep_reconstructions else shared.backend.read(self)
        shared.chains[self.window] = (shared.prev_old, shared.chains.get(self.window, (None, None))[1])
        return out

    def _read_kept(self) -> Pair:
        """``keep_reconstructions``: only the tokens compressed since the last pass are reconstructed, from the
        previous layer's reconstruction of the same tokens (every layer reads the same range: they compress in
        lockstep, after reading); the rest comes from ``kept``."""
        start = 0 if self.kept is None else self.kept[0].shape[-2]
        if start == self.compressed_len and self.kept is not None:
            self.shared.prev_old = None
            return self.kept
        keys, values = self.shared.backend.read(self, start)
        if self.kept is not None:
            keys, values = torch.cat([self.kept[0], keys], -2), torch.cat([self.kept[1], values], -2)
        self.kept = (keys, values)
        return keys, values

    def _compress_window(self, count: int) -> None:
        """Move the oldest ``count`` window tokens into compressed storage."""
        start = self.compressed_start + self.compressed_len
        keys = self.keys[:, :, :count].float()
        if self.rope is not None:
            keys = self.rope.unrotate(keys, *self.shared.rope(self.rope, start, start + count, self.device))
        old, new = self.shared.chains.get(self.window, (None, None))
        block, recon = self.shared.backend.encode(self._flat(keys), self._flat(self.values[:, :, :count]), new,
                                                  self.codec, self.residual_rotation(start, count))
        self.shared.chains[self.window] = (old, recon)
        self.compressed = _cat_blocks(self.compressed, block)
        self.compressed_len += count
        self.exact.compressed(count)
        self._refresh()

    def residual_rotation(self, start: int, count: int) -> ResidualRotation | None:
        """RoPE at non-sink tokens ``start : start + count`` and its inverse, where the key residual is quantized after
        RoPE (``KernelSettings.key_residual="post_rope"``; None otherwise, for a layer without RoPE, and for a layer
        without a key predictor, whose keys are quantized before RoPE as the Triton kernels read them)."""
        if self.shared.settings.key_residual != "post_rope" or self.rope is None or self.codec.key_predictor is None:
            return None
        return residual_rotation(self.rope, self.keys.shape[1], *self.shared.rope(self.rope, start, start + count,
                                                                                 self.device))

    def _drop_outside_window(self) -> None:
        """Sliding layers: once a block more than ``window - 1`` tokens is held, drop the oldest (sinks, then
        compressed, then exact tokens): they can never be attended again."""
        excess = self.sink_keys.shape[-2] + self.compressed_len + self.keys.shape[-2] - (self.window - 1)
        if excess < self.config.recent_window:
            return
        sinks = min(excess, self.sink_keys.shape[-2])
        excess -= sinks
        n = min(excess, self.compressed_len)
        if n:
            self.compressed = self.compressed.tail(n, copy=True)
            self.compressed_start += n
            self.compressed_len -= n
            excess -= n
        self.exact.drop(sinks, excess)
        self._refresh()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> Pair:
        if self.shared.step_slot is not None:
            return self._update_captured(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kv_length = self.get_mask_sizes(key_states.shape[-2])[0]
        n_sink = min(max(self.config.sinks - self.cumulative, 0), key_states.shape[-2])
        self.cumulative += key_states.shape[-2]
        if self.layer_idx == 0:
            self._track_positions(key_states.shape[0], key_states.shape[-2], n_sink)
        self.exact.append(key_states, value_states, n_sink)
        (keys, values), _, _ = self._refresh()

        fused = self.shared.fused_now(key_states.shape[-2])
        if fused:  # exact segments only (views of the buffers), tagged for the attention function
            keys._aquakv_segments = Segments(self, self.compressed, self.compressed_len, self.sink_keys.shape[-2])
        else:
            old_keys, old_values = self._read_compressed()
            keys = torch.cat([self.sink_keys, old_keys, self.keys], -2)
            values = torch.cat([self.sink_values, old_values, self.values], -2)

        window = self.config.recent_window
        if self.config.compress and self.keys.shape[-2] >= window:
            self._compress_window(self.keys.shape[-2] // window * window)
            if not fused:  # what this pass attends to is a copy: the buffers may move now
                self.exact.settle()
                self._refresh()
        if self.window is not None:
            self._drop_outside_window()
            keys, values = keys[:, :, -kv_length:], values[:, :, -kv_length:]
        return keys, values

    def _update_captured(self, key_states: torch.Tensor, value_states: torch.Tensor) -> Pair:
        """One token of a captured decode step (:mod:`aquakv.graphs`, checked by :meth:`AquaKVCache.capturable`):
        written at the device index ``step_slot`` and attended over the whole exact buffers up to the device length
        ``step_exact``, so one CUDA graph replays it at every window length. The host counters move after the replay
        (:meth:`AquaKVCache.advance`), not here: a replay runs no Python."""
        ex, shared = self.exact, self.shared
        ex.keys.index_copy_(2, shared.step_slot, key_states)
        ex.values.index_copy_(2, shared.step_slot, value_states)
        keys = ex.keys[:]  # a new tensor object for the tag, the same memory
        keys._aquakv_segments = Segments(self, self.compressed, self.compressed_len, ex.sinks, shared.step_exact,
                                         shared.step_valid)
        return keys, ex.values

    def _refresh(self) -> tuple[Pair, Pair, Pair]:
        """Point ``sink_keys`` / ``sink_values`` and ``keys`` / ``values`` (the window) at the exact buffers."""
        views = self.exact.views()
        (self.sink_keys, self.sink_values), (self.keys, self.values) = views[1], views[2]
        return views

    def _track_positions(self, batch: int, new: int, n_sink: int) -> None:
        self.shared.rope_memo = {}
        if not self.config.compress or new == n_sink:
            return
        pos = getattr(self.shared.rotary, "_aquakv_positions", None)
        if pos is None or pos.shape[-1] != new:
            raise RuntimeError("AquaKVCache could not see this forward pass's position_ids; build it with "
                               "AquaKVCache.from_bundle(bundle, model) so it can track RoPE positions")
        self.shared.add_positions(pos[..., n_sink:], batch)

    def nbytes(self) -> int:
        """Bytes this layer holds between steps: codes, scales, the exact sinks and window's buffers."""
        if not self.is_initialized:
            return 0
        return self.exact.nbytes + (self.compressed.nbytes if self.compressed is not None else 0)


class AquaKVCache(Cache):
    """``Cache`` whose layers store AQUA-KV-compressed keys and values. Build with :meth:`from_bundle`."""

    def __init__(self, codecs: list[LayerCodec], config: CacheConfig, rotary: torch.nn.Module,
                 kernels: KernelSettings | None = None, model: torch.nn.Module | None = None,
                 specs: list[LayerSpec] | None = None):
        """``rotary``: the model's rotary module (its calls tell the cache the token positions); ``kernels``: backend
        options (default: :meth:`KernelSettings.from_env`, read now); ``model``: the model whose attention may take
        the fused protocol (:meth:`from_bundle` passes it and installs the ``"aquakv"`` attention function);
        ``specs``: each layer's RoPE as :func:`aquakv.family.describe_model` found it (default: Llama's rotate-half
        from ``rotary`` on every layer). The Triton kernels compute rotate-half RoPE themselves, so a model with
        any other layer RoPE gets the PyTorch backend. The backend is chosen at the first update."""
        specs = specs if specs is not None else llama_specs(rotary, len(codecs))
        if len(specs) != len(codecs):
            raise ValueError(f"{len(codecs)} layer codecs for a model of {len(specs)} layers")
        for spec, prev, codec in zip(specs, predecessors([s.window for s in specs]), codecs, strict=True):
            if prev is None and (codec.key_predictor is not None or codec.value_predictor is not None):
                raise ModelMismatchError(f"layer {spec.index} of the bundle has predictors but no layer of its "
                                         "attention type before it: the bundle was calibrated for another layout")
        track_positions(rotary)
        settings = kernels if kernels is not None else KernelSettings.from_env()
        if any(s.window is not None for s in specs):  # the kernels and the fused protocol assume one chain l-1 -> l
            settings = settings.with_(enabled=False, attention="full", keep_reconstructions=False)  # layers drop
        elif not all(s.rope is not None and s.rope.standard for s in specs):  # the kernels compute rotate-half RoPE
            settings = settings.with_(enabled=False)
        if settings.prediction == "stored":
            for i, codec in enumerate(codecs):
                for kind, p in (("key", codec.key_predictor), ("value", codec.value_predictor)):
                    try:
                        if p is not None:
                            stored_factors(p)
                    except ValueError as e:
                        raise ConfigError(f"layer {i}'s {kind} predictor: {e}") from None
        self.shared = _Shared(rotary, settings, list(codecs))
        if model is not None and settings.attention != "full" and install(model):
            cfg = model.config
            self.shared.attn_config = cfg
            self.shared.query_groups = cfg.num_attention_heads // kv_heads(cfg)
        self.config = config
        super().__init__(layers=[AquaKVLayer(i, c, config, self.shared, spec)
                                 for i, (c, spec) in enumerate(zip(codecs, specs, strict=True))])

    @property
    def backend(self) -> Backend | None:
        """The compute backend (None until the first update)."""
        return self.shared.backend

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str, model: torch.nn.Module, cache: CacheConfig | None = None,
        kernels: KernelSettings | None = None, **overrides: object
    ) -> AquaKVCache:
        """Cache for ``model`` from a bundle (object, local path or URI); refuses a bundle of another model.

        ``cache`` (or keyword ``overrides`` such as ``recent_window=64``, ``compress=False``) replaces the
        bundle's cache layout; ``kernels`` chooses backend options. Switches ``model`` to the ``"aquakv"``
        attention function (stock sdpa for every other cache) unless ``kernels.attention == "full"``.
        """
        if not isinstance(bundle, Bundle):
            from aquakv.registry import load_bundle

            bundle = load_bundle(bundle)
        specs = describe_model(model)
        check_fingerprint(bundle.fingerprint, fingerprint_of(model, specs))
        config = cache or bundle.cache
        if overrides:
            config = config.model_copy(update=overrides)
        return cls(bundle.codecs, config, rotary_module(model), kernels=kernels, model=model, specs=specs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> Pair:
        if layer_idx == 0:
            self.shared.chains = {}
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def capturable(self, batch: int, graphs: bool = True) -> str | None:
        """Why the next one-token step of ``batch`` sequences cannot run as a captured step (:mod:`aquakv.graphs`:
        the token written at a device index, nothing else changed), or None when it can. ``graphs``: it is to be
        replayed from a CUDA graph, so the kernels must read every length on the device (``Backend.captures``: the
        Triton and CUDA backends)."""
        shared, first = self.shared, self.layers[0]
        if not first.is_initialized or shared.backend is None:
            return "the cache holds no tokens yet"
        if not shared.fused_now(1):
            return "the model's attention does not take the fused protocol (attention='full', or not 'aquakv')"
        if graphs and not shared.backend.captures:
            return "the PyTorch backend reads lengths on the host"
        window = self.config.recent_window
        for layer in self.layers:
            ex = layer.exact
            if layer.window is not None:
                return "a sliding-window layer drops tokens"
            if ex.keys.shape[0] != batch:
                return f"the cache holds {ex.keys.shape[0]} sequences, not {batch}"
            if ex.pending or layer.cumulative < self.config.sinks:
                return "the sinks are still filling, or a compressed window is still in the buffers"
            if ex.length != first.exact.length or ex.sinks != first.exact.sinks:
                return "the layers' exact segments differ"
            if ex.length + 1 > ex.keys.shape[2] or (self.config.compress and ex.length - ex.sinks + 1 >= window):
                return "this step fills the recent window (it is compressed)"
        return None

    def advance(self, position_ids: torch.Tensor) -> None:
        """The host side of a captured step that just ran (:meth:`capturable`): one more token seen and held by every
        layer, and its position ``[B or 1, 1]``."""
        for layer in self.layers:
            layer.cumulative += 1
            layer.exact.length += 1
            layer._refresh()
        self.shared.rope_memo = {}
        if self.config.compress:
            self.shared.add_positions(position_ids, self.layers[0].exact.keys.shape[0])

    def step_state(self) -> dict:
        """What the layers of one forward pass hand each other: token positions, each chain's reconstructions, the
        RoPE memo. Saving it after layer ``l`` of every pass and restoring it before layer ``l + 1`` runs many passes
        layer-major, one layer's weights at a time (:func:`pipeline.validate.streamed_nll`). Not on the fused path:
        its scratch buffers are overwritten in place (build the cache with ``attention="full"``)."""
        if self.shared.scratch is not None:
            raise RuntimeError("step_state needs attention='full': the fused path hands layers on in place")
        s = self.shared
        return {"positions": s.positions, "chains": dict(s.chains), "rope_memo": dict(s.rope_memo),
                "prev_old": s.prev_old, "prev_new": s.prev_new}

    def restore_step_state(self, state: dict) -> None:
        """Undo the layers run since ``state`` was saved by :meth:`step_state` (their own tokens stay)."""
        for name, value in state.items():  # the dicts are copied: the layers run next fill them again
            setattr(self.shared, name, dict(value) if isinstance(value, dict) else value)

    def forget_reconstructions(self, layer_idx: int) -> None:
        """Drop what ``keep_reconstructions`` kept for a layer that will not run again (layer-major passes)."""
        self.layers[layer_idx].kept = None

    def nbytes(self) -> int:
        """Bytes held between steps by every layer (codes, scales, exact tokens; not ``keep_reconstructions``'
        copies), plus the shared token positions."""
        return sum(layer.nbytes() for layer in self.layers) + self.positions_nbytes()

    def positions_nbytes(self) -> int:
        """Bytes of the token positions all layers share (int32)."""
        pos = self.shared.positions
        return 0 if pos is None else pos.numel() * pos.element_size()


def dynamic_cache_nbytes(cache: Cache) -> int:
    """Bytes held by the keys and values of a ``DynamicCache``."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)
