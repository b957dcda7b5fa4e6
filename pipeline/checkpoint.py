"""Stream a safetensors checkpoint one decoder layer at a time, never the whole model in memory.

The model skeleton is built on the meta device; each layer is filled with its tensors read from the
original shards (``model.safetensors`` or shards listed in ``model.safetensors.index.json``);
``LayerStream`` loads layer ``i + 1`` in a background thread while layer ``i`` computes.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from aquakv.errors import CalibrationError
from aquakv.family import (
    LayerCall,
    LayerSpec,
    cached_kv,
    check_supported,
    decoder_layers,
    describe_layer,
    head_dim,
    kv_heads,
    layer_inputs,
    layer_window,
    probe_positions,
    probing,
    rotary_module,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SKELETON_LOCK = threading.Lock()
_LAYER_KEY = re.compile(r"^(.*?layers\.(\d+)\.)(.+)$")


def weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or the single file; every named shard must exist."""
    index = path / INDEX_FILE
    if index.is_file():
        mapping: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for shard in sorted(set(mapping.values())):
            if not (path / shard).is_file():
                raise CalibrationError(f"checkpoint {path}: shard {shard} named in {INDEX_FILE} is missing; "
                                       "copy the complete checkpoint")
        return mapping
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise CalibrationError(f"checkpoint {path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


class Checkpoint:
    """A local Hugging Face checkpoint (config + safetensors) read lazily, layer by layer.

    The model is a skeleton on the meta device (accelerate's ``init_empty_weights``: parameters on meta, buffers
    such as rotary frequencies real), built by ``AutoModelForCausalLM.from_config`` with the attention implementation
    transformers picks for the family (sdpa where it can, eager where it cannot, e.g. softcapping). Only the base
    model's own tensors outside the decoder layers (embedding, final norm) are loaded whole; layers are loaded one
    at a time. What each layer is called with and what it hands its cache come from the model's own code
    (:mod:`aquakv.family`), so the keys / values collected are exactly those the cache will be given.
    """

    def __init__(self, path: str | Path, attn_implementation: str | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CalibrationError(f"checkpoint {self.path}: no config.json")
        config: PretrainedConfig = AutoConfig.from_pretrained(self.path)
        check_supported(config)
        with _SKELETON_LOCK, init_empty_weights():  # patches nn.Module globally: one skeleton at a time
            self.skeleton = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        self.skeleton.eval()
        self.config = self.skeleton.config
        self.weight_map = weight_map(self.path)
        self.num_layers: int = self.config.num_hidden_layers
        layers = decoder_layers(self.skeleton)
        self.windows: list[int | None] = [layer_window(x, self.config) for x in layers]  # None: global attention
        self.layer_cls = type(layers[0])

        self._layer_keys: dict[int, dict[str, str]] = {}
        for key in self.weight_map:
            if m := _LAYER_KEY.match(key):
                self._layer_keys.setdefault(int(m[2]), {})[m[3]] = key
        if sorted(self._layer_keys) != list(range(self.num_layers)):
            raise CalibrationError(
                f"checkpoint {self.path}: config has {self.num_layers} layers, "
                f"tensors found for layers {sorted(self._layer_keys)}"
            )
        self._base_keys = self._find_base_keys()
        self._placed: tuple[torch.device, torch.dtype] | None = None
        self._head_placed: tuple[torch.device, torch.dtype] | None = None
        self._calls: dict[tuple, list[LayerCall]] = {}
        self._specs: dict[int, LayerSpec] = {}
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}  # load_layer's, one per GPU

    def _find_base_keys(self) -> dict[str, str]:
        """Base-model tensors outside the decoder layers (local name -> checkpoint name), e.g. the embedding."""
        base = self.skeleton.base_model
        found = {}
        for name, _ in base.named_parameters():
            if name.startswith("layers."):
                continue
            keys = [k for k in self.weight_map if (k == name or k.endswith("." + name)) and not _LAYER_KEY.match(k)]
            if len(keys) != 1:
                raise CalibrationError(f"checkpoint {self.path}: expected one tensor named *{name}, found {keys}")
            found[name] = keys[0]
        return found

    @property
    def head_dim(self) -> int:
        return head_dim(self.config)

    @property
    def kv_dim(self) -> int:
        """``D = num_key_value_heads * head_dim``: width of a layer's flattened keys or values."""
        return kv_heads(self.config) * head_dim(self.config)

    def _read(self, keys: dict[str, str]) -> dict[str, torch.Tensor]:
        """Read ``{local name: tensor name}`` from the shards holding them (CPU)."""
        by_file: dict[str, list[tuple[str, str]]] = {}
        for local, key in keys.items():
            by_file.setdefault(self.weight_map[key], []).append((local, key))
        out = {}
        for file, items in by_file.items():
            with safe_open(self.path / file, framework="pt", device="cpu") as f:
                out.update({local: f.get_tensor(key) for local, key in items})
        return out

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors on CPU, named relative to the layer (e.g. ``self_attn.k_proj.weight``)."""
        if i not in self._layer_keys:
            raise IndexError(f"layer {i} out of range [0, {self.num_layers})")
        return self._read(self._layer_keys[i])

    def load_layer(self, i: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """Decoder layer ``i`` (the model's own class) built on meta, weights assigned on ``device``, eval mode.

        On a GPU the bytes go through pinned memory on a side stream (:meth:`_to_gpu`), so that a prefetching thread's
        copies overlap the kernels of the layer in use instead of queueing with them."""
        with torch.device("meta"):  # thread-local, unlike init_empty_weights: layers load in prefetch threads
            layer = self.layer_cls(self.config, layer_idx=i)
        device = torch.device(device)
        tensors = self.layer_tensors(i)
        if device.type == "cuda":
            state = self._to_gpu(tensors, device, dtype)
        else:
            state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                     for k, v in tensors.items()}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CalibrationError(f"layer {i} tensors do not fit {self.layer_cls.__name__}: {e}") from e
        if any(t.is_meta for t in chain(layer.parameters(), layer.buffers())):
            raise CalibrationError(f"{self.layer_cls.__name__} has state not stored in the checkpoint")
        return layer.to(device).requires_grad_(False).eval()

    def _to_gpu(self, tensors: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """CPU tensors onto ``device`` (floating ones in ``dtype``) through pinned memory on this checkpoint's copy
        stream; returns once they have landed. A pageable copy waits in the device's queue behind (and in front of) the
        running kernels: 77% of a 70B validation pass's GPU time was such copies, at ~3.6 GB/s (H100, 2026-11-26). The
        tensors are marked as used by the device's default stream (the layers run there), so that their memory, once
        freed, is not handed to the next load before the kernels reading it are done."""
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        stream = self._copy_streams.setdefault(device, torch.cuda.Stream(device))
        out = {}
        with torch.cuda.stream(stream):
            for k, v in tensors.items():
                t = v.pin_memory().to(device, non_blocking=True)
                out[k] = t.to(dtype) if t.is_floating_point() else t
        stream.synchronize()
        consumer = torch.cuda.default_stream(device)
        for t in out.values():
            t.record_stream(consumer)
        return out

    def base(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The skeleton's base model with its own tensors (embedding, buffers) on ``device`` in ``dtype``."""
        base = self.skeleton.base_model
        if self._placed != (device, dtype):
            state = {k: v.to(device=device, dtype=dtype) for k, v in self._read(self._base_keys).items()}
            base.load_state_dict(state, strict=False, assign=True)
            for name, module in base.named_modules():
                if not name.startswith("layers"):
                    for key, buf in module._buffers.items():
                        if buf is not None:
                            module._buffers[key] = buf.to(device)
            self._placed, self._calls = (device, dtype), {}
        return base

    @torch.no_grad()
    def embed(
        self, input_ids: torch.Tensor, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        batch: int = 4,
    ) -> torch.Tensor:
        """What the model hands its first decoder layer for ``input_ids [B, T]``: ``[B, T, hidden]`` (embedding,
        its scale or multiplier, by the model's own forward), ``batch`` sequences at a time."""
        base = self.base(torch.device(device), dtype)
        return torch.cat([layer_inputs(base, stop=1, input_ids=input_ids[a:a + batch].to(device))[0].to(dtype)
                          for a in range(0, input_ids.shape[0], batch)])

    def layer_call(self, i: int, hidden: torch.Tensor) -> LayerCall:
        """How the model calls layer ``i`` on full sequences ``hidden [B, T, hidden]`` (mask, position embeddings)."""
        key = (hidden.shape[0], hidden.shape[1], hidden.device, hidden.dtype)
        if key not in self._calls:
            base = self.base(hidden.device, hidden.dtype)
            embeds = torch.zeros(hidden.shape, device=hidden.device, dtype=hidden.dtype)
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            self._calls[key] = layer_inputs(base, inputs_embeds=embeds, position_ids=positions)[1]
        return self._calls[key][i]

    def spec(self, i: int, layer: nn.Module) -> LayerSpec:
        """Layer ``i``'s :class:`LayerSpec` (its RoPE as the model applies it), probed once on the loaded ``layer``."""
        if i not in self._specs:
            param = next(layer.parameters())
            base = self.base(param.device, param.dtype)
            positions = probe_positions(param.device)
            embeds = torch.zeros(1, positions.shape[1], self.config.hidden_size, device=param.device, dtype=param.dtype)
            with probing(self.config):
                calls = layer_inputs(base, inputs_embeds=embeds, position_ids=positions)[1]
                self._specs[i] = describe_layer(i, layer, calls[i], rotary_module(base), self.config, positions)
        return self._specs[i]

    def _head(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The whole skeleton with the base tensors and the output head on ``device`` (kept there). The head's tensors
        are the checkpoint's tensors outside the base model and the layers (the saved name may differ from the
        module's: GPT-NeoX saves ``embed_out``), else the embedding where the config ties them."""
        model = self.skeleton
        self.base(device, dtype)
        # placed once per device and dtype: a validation pass asks once per chunk, and a 70B head is 2.1 GB (it was
        # read from disk and copied through pageable memory at every call before, 2026-11-27)
        if self._head_placed == self._placed:
            return model
        head = model.get_output_embeddings()
        outside = [k for k in self.weight_map if not _LAYER_KEY.match(k) and k not in self._base_keys.values()]
        stored = {}
        for name, _ in head.named_parameters():
            keys = [k for k in outside if k.rsplit(".", 1)[-1] == name]
            if len(keys) > 1:
                raise CalibrationError(f"checkpoint {self.path}: cannot tell the output head's {name} among {keys}")
            stored.update({name: keys[0]} if keys else {})
        if stored:
            for name, t in self._read(stored).items():
                if t.shape != getattr(head, name).shape:
                    raise CalibrationError(f"checkpoint {self.path}: {stored[name]} has shape {tuple(t.shape)}, the "
                                           f"output head's {name} {tuple(getattr(head, name).shape)}")
                setattr(head, name, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        elif getattr(self.config, "tie_word_embeddings", False):
            head.weight = model.get_input_embeddings().weight
        else:
            raise CalibrationError(f"checkpoint {self.path}: no output head tensor and the config does not tie it to "
                                   "the embedding")
        self._head_placed = self._placed
        return model

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, tuple_out: bool = False) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for what the last decoder layer returned, ``hidden [B, T, hidden]``: the model's
        own forward from there on (final norm, output head, any logit scale or softcap), its decoder layers
        replaced by replays of ``hidden`` (returned as a 1-tuple where the real layers return tuples)."""
        return self.head_forward(hidden, tuple_out)

    def head_forward(self, hidden: torch.Tensor, tuple_out: bool = False) -> torch.Tensor:
        """:meth:`logits` differentiable in ``hidden`` (the head's own tensors take no gradient)."""
        model = self._head(hidden.device, hidden.dtype).requires_grad_(False)
        base = model.base_model
        layers = base.layers
        base.layers = nn.ModuleList([_Replay(hidden, tuple_out) for _ in layers])
        try:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            return model(inputs_embeds=hidden, position_ids=positions, use_cache=False).logits
        finally:
            base.layers = layers

    @torch.no_grad()
    def forward_layer(self, i: int, layer: nn.Module,
                      hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run layer ``i`` on ``hidden [B, T, hidden]`` with the model's own code; returns its output and the keys and
        values it hands its cache, keys un-rotated to pre-RoPE as the cache will: each ``[B, T, kv_dim]``."""
        out, keys, values = cached_kv(layer, hidden, self.layer_call(i, hidden))
        rope = self.spec(i, layer).rope
        if rope is not None:
            b, _, t, _ = keys.shape
            positions = torch.arange(t, device=keys.device)[None].expand(b, t)
            keys = rope.unrotate(keys.float(), *rope.cos_sin(positions, keys.device)).to(values.dtype)

        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

        return out, flat(keys), flat(values)


class _Replay(nn.Module):
    """A decoder layer's stand-in that returns hidden states computed elsewhere."""

    def __init__(self, hidden: torch.Tensor, tuple_out: bool) -> None:
        super().__init__()
        self.hidden, self.tuple_out = hidden, tuple_out

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor | tuple[torch.Tensor]:
        return (self.hidden,) if self.tuple_out else self.hidden


class LayerStream:
    """Iterate ``(i, layer)`` over ``layers``, loading the next layer in a background thread.

    At most two layers are resident: the one being used and the one being prefetched.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        layers: Iterable[int],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.checkpoint, self.layers, self.device, self.dtype = checkpoint, list(layers), device, dtype

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        if not self.layers:
            return

        def load(i: int) -> nn.Module:
            return self.checkpoint.load_layer(i, self.device, self.dtype)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-prefetch") as pool:
            pending = pool.submit(load, self.layers[0])
            for k, i in enumerate(self.layers):
                layer = pending.result()
                if k + 1 < len(self.layers):
                    pending = pool.submit(load, self.layers[k + 1])
                yield i, layer
                del layer
