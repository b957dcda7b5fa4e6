"""How a decode step attends to an AQUA-KV cache: the backend seam, the fused protocol and its PyTorch reference.

A layer's keys and values are three segments: exact **sinks**, compressed tokens, and the exact **recent window**
(which holds this step's new tokens). Two ways to attend:

- *reconstruct, then attend* (the reference and CPU path): ``Cache.update`` returns full keys / values (compressed
  tokens reconstructed and RoPE'd) and the model's own attention runs.
- *fused*: ``update`` returns only the exact segments, tagged with :class:`Segments`; the model's attention function
  (``"aquakv"``, registered here, installed by :func:`install`) finds the tag and asks the cache's backend for
  flash-decoding partials (normalized output + log-sum-exp) over tiles of compressed tokens, then merges them with
  the exact segments' partial: one softmax over all tokens, no concatenation of the whole cache. Untagged inputs go
  to the stock ``sdpa`` function, so other caches on the same model get the same numbers as before.

The backend (:class:`TorchBackend`, :class:`TritonBackend` or :class:`CudaBackend`, see :func:`select_backend`) is
chosen once per cache, at its first update, from the device, the model's shape, the quantizers and
:class:`~aquakv.kernels.KernelSettings`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from aquakv import kernels
from aquakv.codec import EncodedBlock, LayerCodec, Residual, decode, encode
from aquakv.kernels.settings import KernelSettings
from aquakv.quantize import Quantized, dequantize_reference, quantize_reference
from aquakv.rope import ResidualRotation

if TYPE_CHECKING:
    from aquakv.cache import AquaKVLayer
    from aquakv.family import Rope

log = logging.getLogger(__name__)
Pair = tuple[torch.Tensor, torch.Tensor]
IMPLEMENTATION = "aquakv"
MAX_QUERY_ROWS = 64  # query heads per KV head x query tokens the fused path takes (the decode kernel's limit)


@dataclass(frozen=True)
class Segments:
    """Tag on the exact keys ``update`` returns in the fused protocol: the layer, its compressed tokens at that
    step (``block``, ``length``) and the number of sinks (the mask's columns are ``[sinks | compressed | window]``).
    ``exact_len``: in a captured decode step (:mod:`aquakv.graphs`) the keys are the whole exact buffers and this
    device int32 ``[1]`` says how many of their tokens are held; ``valid``: there, for a padded batch, which keys it
    attends, ``[B, 1, 1, length + buffer]`` bool over ``[sinks | compressed | exact buffer]`` (else None)."""

    layer: AquaKVLayer
    block: EncodedBlock | None
    length: int
    sinks: int
    exact_len: torch.Tensor | None = None
    valid: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- reference math


def key_validity(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                 device: torch.device) -> torch.Tensor | None:
    """``[B, Q, kv_len]`` bool (True = attend) from a transformers attention mask (bool or additive float
    ``[B or 1, 1, Q, kv_len]``), or None when every key is visible. A missing mask with ``Q > 1`` means causal."""
    if mask is None:
        if q_len == 1:
            return None
        col = torch.arange(kv_len, device=device)
        row = torch.arange(q_len, device=device) + (kv_len - q_len)
        return (col[None, :] <= row[:, None]).expand(batch, -1, -1)
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[:, 0, :, -kv_len:].expand(batch, -1, -1)


def partial_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                      scaling: float) -> Pair:
    """Attention of ``query [B, Hq, Q, hd]`` to one segment ``keys, values [B, Hkv, T, hd]`` (GQA: query head
    ``h*G + g`` uses KV head ``h``), ``valid [B, Q, T]`` or None -> ``(o [B, Hq, Q, hd], lse [B, Hq, Q])`` float32:
    the segment's normalized output and log-sum-exp of its scores (``-inf`` where no key is valid)."""
    b, hq, q_len, hd = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = hq // hkv
    s = (query.float().reshape(b, hkv, g * q_len, hd) @ keys.float().transpose(-1, -2)) * scaling
    s = s.view(b, hkv, g, q_len, t)
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    o = p.view(b, hkv, g * q_len, t) @ values.float()
    return o.view(b, hq, q_len, hd), lse.reshape(b, hq, q_len)


def merge_partials(outputs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """One softmax over segments: ``outputs [..., N, hd]``, ``lses [..., N]`` -> ``[..., hd]`` float32."""
    total = torch.logsumexp(lses, -1, keepdim=True)
    weights = torch.exp(lses - torch.where(torch.isinf(total), 0.0, total))
    return (weights.unsqueeze(-1) * outputs).sum(-2)


def tiled_partials(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
                   scaling: float, tile: int) -> Pair:
    """:func:`partial_attention` per tile of ``tile`` tokens: ``o [B, Hq, Q, tiles, hd]``, ``lse [B, Hq, Q, tiles]``
    (what the decode kernel returns)."""
    parts = [partial_attention(query, keys[:, :, s : s + tile], values[:, :, s : s + tile],
                               None if valid is None else valid[..., s : s + tile], scaling)
             for s in range(0, keys.shape[2], tile)]
    return torch.stack([p[0] for p in parts], 3), torch.stack([p[1] for p in parts], 3)


def attend_segments(query: torch.Tensor, seg: Segments, exact_keys: torch.Tensor, exact_values: torch.Tensor,
                    mask: torch.Tensor | None, scaling: float,
                    compressed: Pair | None) -> torch.Tensor:
    """Merge the compressed tokens' partials (``compressed``: ``o [B, Hq, Q, N, hd]``, ``lse [B, Hq, Q, N]`` or None)
    with the exact segments ``[sinks | window]`` -> ``[B, Q, Hq, hd]`` in the query's dtype (as sdpa returns it)."""
    b, _, q_len, _ = query.shape
    kv_len = exact_keys.shape[2] + seg.length
    valid = key_validity(mask, b, q_len, kv_len, query.device)
    if valid is not None:
        valid = torch.cat([valid[..., : seg.sinks], valid[..., seg.sinks + seg.length :]], -1)
    o, lse = partial_attention(query, exact_keys, exact_values, valid, scaling)
    if compressed is not None:
        o = torch.cat([compressed[0], o.unsqueeze(3)], 3)
        lse = torch.cat([compressed[1], lse.unsqueeze(3)], 3)
        o = merge_partials(o, lse)
    return o.transpose(1, 2).to(query.dtype).contiguous()


def compressed_validity(seg: Segments, mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                        device: torch.device) -> torch.Tensor | None:
    """``[B, length]`` bool validity of the compressed tokens (the last query row's: padding masks are per key and
    every compressed token precedes every query), or None when all are visible."""
    if mask is None:
        return None
    valid = key_validity(mask, batch, q_len, kv_len, device)
    return valid[:, -1, seg.sinks : seg.sinks + seg.length]


def captured_mask(mask: torch.Tensor | None) -> None:
    """A captured decode step (:mod:`aquakv.graphs`: one query token) gets no attention mask from its caller, and its
    backends read none from the model: the causal mask some transformers versions still build for it has the host's
    length, frozen into a CUDA graph. A padded batch's keys are masked by the cache's own ``Segments.valid``. Checked
    to be all True wherever it can be read (not while a graph is captured)."""
    if mask is None or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    valid = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if not bool(valid.all()):
        raise ValueError("a captured decode step takes no masked keys from the model: give a padded batch's prompt "
                         "mask to CapturedDecode(attention_mask=) or generate(attention_mask=)")


# ---------------------------------------------------------------------------------------------------- backends


class Backend(Protocol):
    """What a cache needs from a compute backend, chosen once per cache."""

    name: str
    settings: KernelSettings
    fused: bool  # whether ``attention="auto"`` takes the fused protocol on this backend
    max_query_rows: int  # query heads per KV head x query tokens its fused protocol takes
    captures: bool  # whether its fused steps read every length on the device (replayable from a CUDA graph)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, prev: Pair | None, codec: LayerCodec,
               rotation: ResidualRotation | None = None) -> tuple[EncodedBlock, Pair]:
        """Quantize a block of pre-RoPE ``keys, values [B, T, D]`` given the previous layer's reconstruction
        (``rotation``: the key residual after RoPE, ``KernelSettings.key_residual="post_rope"``)."""

    def read(self, layer: AquaKVLayer, start: int = 0) -> Pair:
        """Post-RoPE keys and values ``[B, H, T, hd]`` of ``layer``'s compressed tokens ``start:``
        (reconstruct-then-attend) from the previous layer's reconstruction of the same tokens (``prev_old``); leaves
        this layer's for the next layer."""

    def attend(self, seg: Segments, query: torch.Tensor, exact_keys: torch.Tensor, exact_values: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Fused protocol: attention of ``query [B, Hq, Q, hd]`` to all of ``seg``'s tokens -> ``[B, Q, Hq, hd]``."""


class _ReferenceResidual(Residual):
    """A residual quantizer that always runs the PyTorch reference (no kernel dispatch)."""

    def quantize(self, x: torch.Tensor) -> Quantized:
        return quantize_reference(x, self.grid, self.signs, self.config)

    def dequantize(self, q: Quantized) -> torch.Tensor:
        return dequantize_reference(q, self.grid, self.signs, self.config)


def _reference_codec(codec: LayerCodec) -> LayerCodec:
    def ref(r: Residual) -> Residual:
        return _ReferenceResidual(r.config, r.grid, r.signs)

    return LayerCodec(ref(codec.keys), ref(codec.values), codec.key_predictor, codec.value_predictor)


def _rope_keys(layer: AquaKVLayer, keys_hat: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """``K̂ [B, T, D]`` float32 of compressed tokens ``offset : offset + length`` -> ``[B, H, T, hd]`` in the model
    dtype (rounded to it before the layer's RoPE)."""
    keys = layer.heads(keys_hat)
    if layer.rope is None:
        return keys
    start = layer.compressed_start + offset  # compressed tokens a sliding layer dropped
    cos, sin = layer.shared.rope(layer.rope, start, start + length, layer.device)
    return layer.rope.rotate(keys.float(), cos, sin).to(layer.dtype)


def _decode_read(layer: AquaKVLayer, block: EncodedBlock | None, length: int, offset: int,
                 codec: LayerCodec) -> Pair:
    """Reconstruct ``length`` compressed tokens with :func:`aquakv.codec.decode` (from ``prev_old``, or from the
    block's stored projections), then RoPE: post-RoPE keys and values ``[B, H, T, hd]``; leaves ``(K̂, V̂)`` in
    ``prev_old`` for the next layer."""
    if length == 0:
        layer.shared.prev_old = None
        empty = layer.sink_keys[:, :, :0]
        return empty, empty
    rotation = layer.residual_rotation(layer.compressed_start + offset, length)
    keys_hat, values_hat = decode(block, layer.shared.prev_old, codec, rotation)
    layer.shared.prev_old = (keys_hat, values_hat)
    return _rope_keys(layer, keys_hat, length, offset), layer.heads(values_hat)


class TorchBackend:
    """The PyTorch reference on any device: fp32 reconstruction, then attention (or its tiled partials)."""

    name = "torch"
    fused = False
    max_query_rows = MAX_QUERY_ROWS
    captures = False

    def __init__(self, settings: KernelSettings, tile: int = 64):
        self.settings, self.tile = settings, tile

    def encode(self, keys: torch.Tensor, values: torch.Tensor, prev: Pair | None, codec: LayerCodec,
               rotation: ResidualRotation | None = None) -> tuple[EncodedBlock, Pair]:
        return encode(keys, values, prev, _reference_codec(codec), self.settings.prediction == "stored", rotation)

    def _reconstruct(self, layer: AquaKVLayer, block: EncodedBlock | None, length: int, offset: int = 0) -> Pair:
        return _decode_read(layer, block, length, offset, _reference_codec(layer.codec))

    def read(self, layer: AquaKVLayer, start: int = 0) -> Pair:
        block = layer.compressed.tail(start) if layer.compressed is not None else None
        return self._reconstruct(layer, block, layer.compressed_len - start, start)

    def attend(self, seg: Segments, query: torch.Tensor, exact_keys: torch.Tensor, exact_values: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """The fused protocol's math in PyTorch: reconstruct, tiled partials, merge with the exact segments."""
        if seg.exact_len is not None:  # a captured step's whole buffers (the reference reads the length back)
            n = int(seg.exact_len)
            exact_keys, exact_values = exact_keys[:, :, :n], exact_values[:, :, :n]
            mask = mask[..., : seg.length + n] if mask is not None else None
        keys, values = self._reconstruct(seg.layer, seg.block, seg.length)
        compressed = None
        if seg.length:
            b, _, q_len, _ = query.shape
            valid = compressed_validity(seg, mask, b, q_len, exact_keys.shape[2] + seg.length, query.device)
            if valid is not None:
                valid = valid[:, None].expand(-1, q_len, -1)
            compressed = tiled_partials(query, keys, values, valid, scaling, self.tile)
        return attend_segments(query, seg, exact_keys, exact_values, mask, scaling, compressed)


class TritonBackend:
    """Triton kernels on CUDA: codec kernels for encode; for :meth:`attend`, the fused decode-attention kernel over
    the compressed tokens and one kernel for the exact segments and the merge (:func:`attend_segments` in Triton)."""

    name = "triton"
    fused = True
    max_query_rows = MAX_QUERY_ROWS
    captures = True

    def __init__(self, settings: KernelSettings):
        self.settings = settings
        self.handoff: tuple[bool, int] | None = None  # the scratch layout, fixed at the first fused read

    def encode(self, keys: torch.Tensor, values: torch.Tensor, prev: Pair | None, codec: LayerCodec,
               rotation: ResidualRotation | None = None) -> tuple[EncodedBlock, Pair]:
        if rotation is not None:  # select_backend never gives it a layer whose residual is post-RoPE
            raise ValueError("the Triton kernels read pre-RoPE key residuals only")
        return encode(keys, values, prev, codec, self.settings.prediction == "stored")  # quantize dispatches

    def read(self, layer: AquaKVLayer, start: int = 0) -> Pair:
        if self.settings.prediction == "stored":  # each layer on its own: the codec kernels, then RoPE
            block = layer.compressed.tail(start) if layer.compressed is not None else None
            return _decode_read(layer, block, layer.compressed_len - start, start, layer.codec)
        from aquakv.kernels.host import read_compressed

        return read_compressed(layer, self.settings, start)

    def attend(self, seg: Segments, query: torch.Tensor, exact_keys: torch.Tensor, exact_values: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        from aquakv.kernels.decode import attend_exact, decode_attention, handoff, needs_own_buffer, scratch_dtype

        layer, shared = seg.layer, seg.layer.shared
        compressed = None
        if seg.length and self.settings.prediction == "stored":
            compressed = self._attend_stored(seg, query, exact_keys, mask, scaling)
        elif seg.length:
            b, _, q_len, hd = query.shape
            if self.handoff is None:
                self.handoff = handoff(shared.codecs, self.settings, exact_keys.shape[1] * hd)
            projected, columns = self.handoff
            if layer.layer_idx == 0 or shared.scratch is None:
                shared.ensure_scratch(b, seg.length, columns // 2, scratch_dtype(self.settings), query.device)
            src = shared.scratch_src
            dst = 1 - src if needs_own_buffer(layer.codec, self.settings) else src
            valid = compressed_validity(seg, mask, b, q_len, exact_keys.shape[2] + seg.length, query.device)
            rotary = shared.rotary
            compressed = decode_attention(
                query, seg.block.keys, seg.block.values, seg.length, layer.codec,
                shared.scratch_buffer(src), shared.scratch_buffer(dst), shared.positions, shared.inv_freq(query.device),
                float(getattr(rotary, "attention_scaling", 1.0)), valid, scaling, self.settings, projected,
                shared.codecs[layer.layer_idx + 1] if layer.layer_idx + 1 < len(shared.codecs) else None)
            shared.scratch_src = dst
        return attend_exact(query, exact_keys, exact_values, seg.sinks, seg.length, mask, scaling, compressed,
                            exact_len=seg.exact_len)

    def _attend_stored(self, seg: Segments, query: torch.Tensor, exact_keys: torch.Tensor, mask: torch.Tensor | None,
                       scaling: float) -> Pair:
        """The compressed tokens' partials from their stored projections: no scratch, no other layer."""
        from aquakv.kernels.decode import decode_attention

        layer, shared = seg.layer, seg.layer.shared
        b, _, q_len, _ = query.shape
        proj = seg.block.projections
        if proj is None:  # a layer without predictors: nothing is read from the projections
            latents = scales = query.new_zeros(b, seg.length, 2)
        else:
            latents, scales = proj.latents, proj.scales.contiguous()
        valid = compressed_validity(seg, mask, b, q_len, exact_keys.shape[2] + seg.length, query.device)
        return decode_attention(
            query, seg.block.keys, seg.block.values, seg.length, layer.codec, latents, latents, shared.positions,
            shared.inv_freq(query.device), float(getattr(shared.rotary, "attention_scaling", 1.0)), valid, scaling,
            self.settings, stored=scales)


class CudaBackend:
    """The CUDA decode kernel (:mod:`aquakv.kernels.cuda`) for stored projections with the key residual after RoPE:
    each layer with predictors is attended straight from its codes in the kernel's order (permuted at encode, back
    for a reconstructing read); a layer without predictors (layer 0: its keys are quantized before RoPE, as the
    Triton kernels read them) goes to :class:`TritonBackend`. The exact segments and the merge are the Triton
    kernel's (:func:`~aquakv.kernels.decode.attend_exact`)."""

    name = "cuda"
    fused = True
    max_query_rows = 8  # one tensor-core fragment's columns (aquakv.kernels.cuda.MAX_ROWS)
    captures = True  # the compressed length is fixed within a captured layout; the exact length is Triton's

    def __init__(self, settings: KernelSettings):
        self.settings = settings
        self.triton = TritonBackend(settings)

    @staticmethod
    def _kernel_layer(codec: LayerCodec) -> bool:
        return codec.key_predictor is not None

    def encode(self, keys: torch.Tensor, values: torch.Tensor, prev: Pair | None, codec: LayerCodec,
               rotation: ResidualRotation | None = None) -> tuple[EncodedBlock, Pair]:
        from aquakv.kernels.cuda import kernel_order

        if not self._kernel_layer(codec):
            return self.triton.encode(keys, values, prev, codec, rotation)
        block, recon = encode(keys, values, prev, codec, True, rotation)
        return kernel_order(block), recon

    def read(self, layer: AquaKVLayer, start: int = 0) -> Pair:
        from aquakv.kernels.cuda import natural_order

        block = layer.compressed.tail(start) if layer.compressed is not None else None
        if block is not None and self._kernel_layer(layer.codec):
            block = natural_order(block)
        return _decode_read(layer, block, layer.compressed_len - start, start, layer.codec)

    def attend(self, seg: Segments, query: torch.Tensor, exact_keys: torch.Tensor, exact_values: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        from aquakv.kernels import cuda
        from aquakv.kernels.decode import attend_exact

        layer, shared = seg.layer, seg.layer.shared
        if not seg.length or not self._kernel_layer(layer.codec):
            return self.triton.attend(seg, query, exact_keys, exact_values, mask, scaling)
        ops = layer.codec.derived("cuda operands", lambda: cuda.layer_operands(layer.codec))  # once per process
        if shared.rope_table is None:
            shared.rope_table = cuda.RopeTable(layer.rope, query.device)
        start = layer.compressed_start
        positions = shared.positions[:, start : start + seg.length]
        b, _, q_len, _ = query.shape
        valid = compressed_validity(seg, mask, b, q_len, exact_keys.shape[2] + seg.length, query.device)
        compressed = cuda.partials(query, seg.block, seg.length, ops, positions, valid, scaling,
                                   shared.rope_table.ensure(positions, seg.length))
        return attend_exact(query, exact_keys, exact_values, seg.sinks, seg.length, mask, scaling, compressed,
                            exact_len=seg.exact_len)


def select_backend(device: torch.device, codecs: list[LayerCodec], head_dim: int, settings: KernelSettings,
                   heads: int | None = None, dtype: torch.dtype | None = None,
                   rope: Rope | None = None) -> Backend:
    """With pre-RoPE key residuals, :class:`TritonBackend` where the kernels run on ``device`` and handle every
    layer's quantizers and the head size. With post-RoPE ones, :class:`CudaBackend` where its kernel reads every
    layer with predictors (stored projections, the model's ``heads`` KV heads, bf16 ``dtype``, a standard
    rotate-half ``rope``: :func:`aquakv.kernels.cuda.fits`) and Triton the others. Else :class:`TorchBackend`."""
    from aquakv.kernels.decode import supports_fused

    def triton_reads(c: LayerCodec) -> bool:
        return (kernels.supports(c.keys.config) and kernels.supports(c.values.config)
                and supports_fused(c, head_dim))

    triton_runs = kernels.available(device, settings) and kernels.supports_head_dim(head_dim)
    if settings.key_residual == "pre_rope":
        fit = triton_runs and all(triton_reads(c) for c in codecs)
        return TritonBackend(settings) if fit else TorchBackend(settings)
    from aquakv.kernels import cuda

    if (triton_runs and settings.prediction == "stored" and dtype == torch.bfloat16 and heads is not None
            and rope is not None and rope.standard and not rope.split and cuda.device_fits(device)
            and all(cuda.fits(c, heads, head_dim) if c.key_predictor is not None
                    else c.value_predictor is None and triton_reads(c) for c in codecs)):
        return CudaBackend(settings)
    if triton_runs:  # a GPU, but this cache is not the CUDA kernel's: say so, decode will be slow
        log.warning("key_residual='post_rope': the CUDA decode kernel does not read this cache (it needs "
                    "prediction='stored', a bf16 model with 4 or 8 KV heads of 128, rotate-half RoPE, predictors of "
                    "rank <= 128, 2-bit d=2 grids of 64, and compute capability >= 8.9 with NVRTC); the PyTorch "
                    "backend reads it")
    return TorchBackend(settings)


# ------------------------------------------------------------------------------------- the transformers hook


def aquakv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers attention function: the fused path for keys an AQUA-KV layer tagged, stock sdpa otherwise."""
    seg: Segments | None = getattr(key, "_aquakv_segments", None)
    if seg is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    if seg.exact_len is not None:  # a captured step: the model's mask dropped, the padding's own taken
        captured_mask(attention_mask)
        attention_mask = seg.valid
    backend = seg.layer.shared.backend
    return backend.attend(seg, query, key, value, attention_mask, scaling), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, aquakv_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


_register()


def fused_capable(config: object) -> bool:
    """Whether a model config's attention is plain softmax attention the fused path reproduces (sdpa, no
    sliding window, no logit soft-capping)."""
    impl = getattr(config, "_attn_implementation", None)
    plain = (getattr(config, "sliding_window", None) is None
             and getattr(config, "attn_logit_softcapping", None) is None)
    return impl in ("sdpa", IMPLEMENTATION) and plain


def install(model: torch.nn.Module) -> bool:
    """Switch ``model`` to the ``"aquakv"`` attention function (sdpa for everything but tagged AQUA-KV segments).
    Returns False, leaving the model alone, when its attention is not plain sdpa."""
    config = model.config
    if not fused_capable(config):
        return False
    if config._attn_implementation != IMPLEMENTATION:
        try:
            model.set_attn_implementation(IMPLEMENTATION)
        except Exception:  # noqa: BLE001 - older transformers: set the config directly
            config._attn_implementation = IMPLEMENTATION
    return config._attn_implementation == IMPLEMENTATION
