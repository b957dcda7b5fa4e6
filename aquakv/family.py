"""What each decoder layer hands its cache, learned from the model's own code (never a re-implementation).

AQUA-KV stores keys before RoPE. Families differ in how keys reach the cache: rotate-half or interleaved RoPE,
partial rotary, no RoPE on some layers, QK-norm, multipliers, per-layer-type rotary (Gemma 3's local/global). So:

- :func:`layer_inputs` runs the model's own forward up to its decoder layers (embedding scale, multipliers, masks
  per layer type, position embeddings per layer type) and returns exactly what each layer is called with.
- :func:`cached_kv` runs one decoder layer with a capturing cache: the keys / values it hands ``Cache.update``.
- :class:`Rope` rotates and un-rotates with the model's own ``apply_rotary_pos_emb`` (the inverse is the same
  function with the sine negated) and cos/sin from the model's own rotary module.
- :func:`describe_layer` checks, per layer, that the cached keys are the layer's pre-RoPE keys rotated by that
  function (or not rotated at all), and that un-rotating them returns the pre-RoPE keys to float precision; any
  other relation refuses the model with :class:`UnsupportedModelError`. Calibration and the cache both use it, so
  they agree on what "pre-RoPE keys" are by construction.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from aquakv.errors import UnsupportedModelError
from aquakv.rope import apply_rope, apply_rotary_pos_emb

Pair = tuple[torch.Tensor, torch.Tensor]

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "cohere",
             "smollm3", "stablelm", "gpt_neox")
_REFUSED = {
    "deepseek_v2": "multi-head latent attention caches one compressed latent per token, not per-layer keys/values",
    "deepseek_v3": "multi-head latent attention caches one compressed latent per token, not per-layer keys/values",
    "kimi_k2": "multi-head latent attention caches one compressed latent per token, not per-layer keys/values",
    "qwen3_next": "a linear-attention hybrid: most layers keep a recurrent state, not keys/values",
    "falcon_h1": "a Mamba hybrid: layers keep a recurrent state, not keys/values",
    "jamba": "a Mamba hybrid: layers keep a recurrent state, not keys/values",
    "bamba": "a Mamba hybrid: layers keep a recurrent state, not keys/values",
    "granitemoehybrid": "a Mamba hybrid: layers keep a recurrent state, not keys/values",
    "lfm2": "a convolution hybrid: layers keep a convolution state, not keys/values",
    "zamba2": "a Mamba hybrid with shared attention blocks",
    "gemma3n": "layers share keys/values across layers (KV sharing)",
    "gemma3": "the multimodal Gemma 3 wrapper; load the text model (model_type gemma3_text)",
}
PROBE_TOKENS = 8
PROBE_OFFSET = 5  # probe positions start here: at position 0 every RoPE is the identity
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def check_supported(config: object) -> None:
    """Refuse, up front, a model whose cache is not per-layer keys/values or whose family is untested."""
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported: {_REFUSED[model_type]}")
    if getattr(config, "kv_lora_rank", None) or getattr(config, "num_kv_shared_layers", 0):
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported: its layers do not each cache "
                                    "their own keys/values (latent or shared KV)")
    other = sorted(set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
    if other:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported: layers of type {other} do not "
                                    "cache keys/values")
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")


def kv_heads(config: object) -> int:
    """Key/value heads per layer (models without grouped-query attention have as many as query heads)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config: object) -> int:
    """Channels per head."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _base_part(model: nn.Module, name: str, kind: type[nn.Module]) -> nn.Module:
    base = getattr(model, "base_model", model)
    part = getattr(base, name, None)
    if not isinstance(part, kind):
        raise UnsupportedModelError(f"{type(model).__name__} has no {kind.__name__} at base_model.{name}")
    return part


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM or of its base model."""
    return _base_part(model, "layers", nn.ModuleList)


def attention_of(layer: nn.Module) -> nn.Module:
    """A decoder layer's attention module."""
    for name in ("self_attn", "attention"):
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise UnsupportedModelError(f"{type(layer).__name__} has no self_attn / attention module")


def layer_window(layer: nn.Module, config: object) -> int | None:
    """Tokens a layer attends back to (None: all): the attention module's own ``sliding_window`` where it has one
    (per-layer types), else the config's (models that slide on every layer)."""
    attn = attention_of(layer)
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
    return int(window) if window else None


def predecessors(windows: list[int | None]) -> list[int | None]:
    """Per layer, the layer its predictors read: the previous layer of the same attention type (same window), or
    None (a chain start: no predictor). All-global models chain ``l - 1 -> l``; in Gemma 2 / 3 global layers predict
    from the previous global layer and local layers from the previous local one, which holds the same tokens."""
    last: dict[int | None, int] = {}
    out: list[int | None] = []
    for i, window in enumerate(windows):
        out.append(last.get(window))
        last[window] = i
    return out


# ----------------------------------------------------------------------------------- what each layer is called with


class _Stop(Exception):
    """Raised by the last catcher: the model's forward need not go past its decoder layers."""


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states through unchanged."""

    def __init__(self, inner: nn.Module, calls: list, last: bool):
        super().__init__()
        self.inner, self.calls, self.last = inner, calls, last

    def __getattr__(self, name: str) -> object:  # the model's forward may read layer attributes (attention_type...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class LayerCall:
    """How the model calls one decoder layer: positional ``args`` after the hidden states, ``kwargs``."""

    args: tuple
    kwargs: dict

    @property
    def position_embeddings(self) -> Pair | None:
        return self.kwargs.get("position_embeddings")


@torch.no_grad()
def layer_inputs(model: nn.Module, stop: int | None = None, **inputs: object) -> tuple[torch.Tensor, list[LayerCall]]:
    """Run the model's base forward on ``inputs`` (``input_ids=`` or ``inputs_embeds=``, optional ``position_ids=``)
    with its decoder layers replaced by catchers; returns the hidden states layer 0 receives ``[B, T, hidden]`` and
    the call of layers ``0..stop-1`` (all by default). Nothing of the layers runs; the model is left unchanged.
    A cache (:func:`aquakv.compat.cache_kwargs`) with ``use_cache=True`` records the calls of a pass that
    continues that cache's tokens."""
    base = getattr(model, "base_model", model)
    layers = decoder_layers(model)
    stop = len(layers) if stop is None else stop
    calls: list = []
    base.layers = nn.ModuleList([_Catcher(layer, calls, i == stop - 1) for i, layer in enumerate(layers)])
    try:
        base(**{"use_cache": False, **inputs})
    except _Stop:
        pass
    finally:
        base.layers = layers
    if len(calls) != stop:
        raise UnsupportedModelError(f"{type(base).__name__}.forward called {len(calls)} of {stop} decoder layers")
    return calls[0][0], [LayerCall(args, kwargs) for _, args, kwargs in calls]


class _Capture(DynamicCache):
    """A cache that records what a layer hands ``update`` and gives it back unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: list[Pair] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> Pair:
        self.captured.append((key_states, value_states))
        return key_states, value_states


def cache_kwarg(call: LayerCall) -> str:
    """The name of the argument a decoder layer takes its cache by (``past_key_values`` / ``past_key_value``)."""
    found = [k for k in _CACHE_KWARGS if k in call.kwargs]
    if len(found) != 1:
        raise UnsupportedModelError(f"cannot tell which argument of a decoder layer is its cache (found {found})")
    return found[0]


def cached_kv(layer: nn.Module, hidden: torch.Tensor, call: LayerCall,
              position_embeddings: Pair | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``layer`` on ``hidden [B, T, hidden]`` as the model would; returns its output hidden states and the keys
    and values ``[B, H, T, hd]`` it hands its cache (``position_embeddings`` replaces the call's, for probes)."""
    capture = _Capture()
    kwargs = {**call.kwargs, cache_kwarg(call): capture}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = True
    if position_embeddings is not None:
        kwargs["position_embeddings"] = position_embeddings
    out = layer(hidden, *call.args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    if len(capture.captured) != 1:
        raise UnsupportedModelError(f"{type(layer).__name__} handed its cache {len(capture.captured)} updates "
                                    "in one call, expected 1")
    keys, values = capture.captured[0]
    return out, keys, values


# ------------------------------------------------------------------------------------------------------ RoPE


@dataclass
class Rope:
    """The model's RoPE for one layer: cos/sin from its rotary module, rotation by its ``apply_rotary_pos_emb``.

    ``split``: the layer rotates the first ``cos.shape[-1]`` channels itself and passes the rest (StableLM's partial
    rotary); otherwise ``apply`` takes whole heads (rotate-half, interleaved, or partial inside ``apply``).
    """

    rotary: nn.Module
    apply: Callable
    layer_type: str | None = None  # for rotary modules serving several layer types (Gemma 3)
    split: bool = False
    standard: bool = False  # rotate-half over whole heads from ``rotary.inv_freq``: what the Triton kernels compute

    def cos_sin(self, positions: torch.Tensor, device: torch.device) -> Pair:
        """cos, sin ``[B, T, rd]`` float32 at ``positions [B, T]``."""
        x = torch.zeros(1, device=device, dtype=torch.float32)
        pos = positions.to(device=device, dtype=torch.long)
        if self.layer_type is not None:
            return self.rotary(x, pos, self.layer_type)
        return self.rotary(x, pos)

    def rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of ``keys [B, H, T, hd]`` as the model applies it."""
        cos, sin = cos.to(keys.dtype), sin.to(keys.dtype)
        if self.split:
            rd = cos.shape[-1]
            return torch.cat([self.apply(keys[:, :1, :, :rd], keys[..., :rd], cos, sin)[1], keys[..., rd:]], -1)
        return self.apply(keys[:, :1], keys, cos, sin)[1]

    def unrotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate` (also when cos/sin carry an attention scaling factor ``a``: rotate multiplies by
        ``a``, so the inverse is the rotation by ``-theta`` divided by ``a``)."""
        scale2 = cos * cos + sin * sin
        return self.rotate(keys, cos / scale2, -sin / scale2)


def _model_apply(attn: nn.Module) -> Callable:
    apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise UnsupportedModelError(f"{type(attn).__module__} has no apply_rotary_pos_emb")
    return apply


def rotary_module(model: nn.Module) -> nn.Module:
    """The base model's rotary embedding module."""
    return _base_part(model, "rotary_emb", nn.Module)


def _layer_type(rotary: nn.Module, config: object, index: int) -> str | None:
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return None
    return config.layer_types[index]


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 8 * torch.finfo(dtype).eps
    return a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= tol * max(float(b.abs().max()), 1.0)


@dataclass(frozen=True)
class LayerSpec:
    """What a layer caches: ``rope`` (None: keys are cached as projected, no RoPE), ``window`` (None: all tokens)."""

    index: int
    rope: Rope | None
    window: int | None

    @property
    def kind(self) -> str:
        """``"full"`` / ``"sliding-<window>"`` plus ``"+rope"``: what a bundle's fingerprint records per layer."""
        return ("full" if self.window is None else f"sliding-{self.window}") + ("+rope" if self.rope else "")


@torch.no_grad()
def describe_layer(index: int, layer: nn.Module, call: LayerCall, rotary: nn.Module, config: object,
                   positions: torch.Tensor) -> LayerSpec:
    """Probe ``layer`` (called as ``call``, for tokens at ``positions [B, T]``): are its cached keys its pre-RoPE keys
    rotated by the model's function, or not rotated? Refuses anything else (see module docstring)."""
    model_type = getattr(config, "model_type", "?")
    pe = call.position_embeddings
    param = next(layer.parameters())
    hidden = torch.randn(*positions.shape, config.hidden_size, generator=torch.Generator().manual_seed(index))
    hidden = hidden.to(param.device, param.dtype)
    window = layer_window(layer, config)
    if pe is None:
        raise UnsupportedModelError(f"{model_type}: layer {index} is not given position_embeddings (cos, sin)")
    _, keys, _ = cached_kv(layer, hidden, call)
    _, plain, _ = cached_kv(layer, hidden, call, (torch.ones_like(pe[0]), torch.zeros_like(pe[1])))
    if torch.equal(keys, plain):
        return LayerSpec(index, None, window)
    rope = Rope(rotary, _model_apply(attention_of(layer)), _layer_type(rotary, config, index))
    cos, sin = rope.cos_sin(positions, keys.device)
    if not (_close(cos, pe[0], pe[0].dtype) and _close(sin, pe[1], pe[1].dtype)):
        raise UnsupportedModelError(f"{model_type}: layer {index}'s position embeddings are not its rotary module's "
                                    "cos/sin at the token positions")
    for split in (False, True):
        rope.split = split
        try:
            ok = _close(rope.rotate(plain, pe[0], pe[1]), keys, keys.dtype)
        except RuntimeError:  # apply_rotary_pos_emb wants only the rotary channels
            ok = False
        if ok:
            break
    else:
        raise UnsupportedModelError(f"{model_type}: layer {index} hands its cache keys that are not its pre-RoPE keys "
                                    "rotated by the model's apply_rotary_pos_emb (RoPE after a norm, or another "
                                    "position encoding)")
    back = rope.unrotate(keys.float(), cos, sin)
    if not _close(back, plain, keys.dtype):
        raise UnsupportedModelError(f"{model_type}: layer {index}: un-rotating the cached keys does not give the "
                                    "pre-RoPE keys back to float precision")
    rope.standard = _is_standard(rope, keys.float(), cos, sin, positions)
    return LayerSpec(index, rope, window)


def llama_specs(rotary: nn.Module, num_layers: int) -> list[LayerSpec]:
    """Rotate-half RoPE from ``rotary`` on every layer, no sliding window: Llama's layout, for caches built
    without a model to probe (benchmarks, kernel tests)."""
    rope = Rope(rotary, apply_rotary_pos_emb, standard=True)
    return [LayerSpec(i, rope, None) for i in range(num_layers)]


def _is_standard(rope: Rope, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor) -> bool:
    """Whether ``rope`` equals rotate-half RoPE with ``cos(pos * inv_freq)`` (times ``attention_scaling``)."""
    inv_freq = getattr(rope.rotary, "inv_freq", None)
    if rope.split or rope.layer_type is not None or inv_freq is None or 2 * inv_freq.numel() != keys.shape[-1]:
        return False
    angle = positions.to(keys.device).float()[..., None] * inv_freq.to(keys.device).float()
    scale = float(getattr(rope.rotary, "attention_scaling", 1.0))
    emb = torch.cat([angle, angle], -1)
    ref = apply_rope(keys, emb.cos() * scale, emb.sin() * scale)
    return _close(rope.rotate(keys, cos, sin), ref, torch.float32)


def probe_positions(device: torch.device | str = "cpu") -> torch.Tensor:
    """Token positions ``[1, PROBE_TOKENS]`` the probes use."""
    return torch.arange(PROBE_OFFSET, PROBE_OFFSET + PROBE_TOKENS, device=device)[None]


@torch.no_grad()
def describe_model(model: nn.Module) -> list[LayerSpec]:
    """:class:`LayerSpec` of every decoder layer of a loaded model (a few tokens through each layer, twice)."""
    check_supported(model.config)
    with probing(model.config):
        param = next(model.parameters())
        positions = probe_positions(param.device)
        embeds = torch.zeros(1, PROBE_TOKENS, model.config.hidden_size, device=param.device, dtype=param.dtype)
        _, calls = layer_inputs(model, inputs_embeds=embeds, position_ids=positions)
        rotary = rotary_module(model)
        return [describe_layer(i, layer, calls[i], rotary, model.config, positions)
                for i, layer in enumerate(decoder_layers(model))]


@contextmanager
def probing(config: object) -> Iterator[None]:
    """Turn what a model's own code raises while being probed (a layout these probes do not know) into
    :class:`UnsupportedModelError` naming the model type, never a raw ``AttributeError`` / ``TypeError``."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, IndexError, ValueError, RuntimeError) as e:
        if isinstance(e, UnsupportedModelError):
            raise
        raise UnsupportedModelError(f"model_type {getattr(config, 'model_type', '?')!r} could not be probed "
                                    f"({type(e).__name__}: {e})") from e
