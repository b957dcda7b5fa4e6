"""Stream a safetensors checkpoint one decoder layer at a time, never the whole model in memory.

The layer skeleton is built on the meta device and filled with that layer's tensors read from the
original shards (``model.safetensors`` or shards listed in ``model.safetensors.index.json``);
``LayerStream`` loads layer ``i + 1`` in a background thread while layer ``i`` computes.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from aquakv.compat import causal_mask
from aquakv.errors import CalibrationError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
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


def _find_class(module: ModuleType, suffix: str) -> type[nn.Module]:
    found = [
        obj
        for name, obj in vars(module).items()
        if name.endswith(suffix) and isinstance(obj, type) and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        names = [c.__name__ for c in found]
        raise CalibrationError(f"expected one *{suffix} class in {module.__name__}, found {names}")
    return found[0]


class Checkpoint:
    """A local Hugging Face checkpoint (config + safetensors) read lazily, layer by layer.

    ``attn_implementation`` is set on the config so standalone layers attend causally (``sdpa`` by default).
    """

    def __init__(self, path: str | Path, attn_implementation: str = "sdpa") -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CalibrationError(f"checkpoint {self.path}: no config.json")
        self.config: PretrainedConfig = AutoConfig.from_pretrained(self.path)
        self.config._attn_implementation = attn_implementation
        self.weight_map = weight_map(self.path)
        self.num_layers: int = self.config.num_hidden_layers

        self._layer_keys: dict[int, dict[str, str]] = {}
        for key in self.weight_map:
            if m := _LAYER_KEY.match(key):
                self._layer_keys.setdefault(int(m[2]), {})[m[3]] = key
        if sorted(self._layer_keys) != list(range(self.num_layers)):
            raise CalibrationError(
                f"checkpoint {self.path}: config has {self.num_layers} layers, "
                f"tensors found for layers {sorted(self._layer_keys)}"
            )
        embeds = [k for k in self.weight_map if k.endswith("embed_tokens.weight")]
        if len(embeds) != 1:
            raise CalibrationError(f"checkpoint {self.path}: expected one embed_tokens.weight, found {embeds}")
        self._embed_key = embeds[0]

        model_type = self.config.model_type
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError as e:
            raise CalibrationError(f"no transformers modeling module for model_type {model_type!r}") from e
        self.layer_cls = _find_class(module, "DecoderLayer")
        self._rotary_cls = _find_class(module, "RotaryEmbedding")
        self._rotary: dict[torch.device, nn.Module] = {}

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def kv_dim(self) -> int:
        """``D = num_key_value_heads * head_dim``: width of a layer's flattened keys or values."""
        return self.config.num_key_value_heads * self.head_dim

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
        """Decoder layer ``i`` (e.g. ``LlamaDecoderLayer``) built on meta, weights assigned on ``device``, eval mode."""
        with torch.device("meta"):
            layer = self.layer_cls(self.config, layer_idx=i)
        state = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in self.layer_tensors(i).items()
        }
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CalibrationError(f"layer {i} tensors do not fit {self.layer_cls.__name__}: {e}") from e
        if any(t.is_meta for t in chain(layer.parameters(), layer.buffers())):
            raise CalibrationError(f"{self.layer_cls.__name__} has state not stored in the checkpoint")
        return layer.requires_grad_(False).eval()

    def embed(
        self, input_ids: torch.Tensor, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Token embeddings ``[B, T] -> [B, T, hidden]`` (plain lookup, as Llama-family models do)."""
        weight = self._read({"w": self._embed_key})["w"].to(device=device, dtype=dtype)
        return nn.functional.embedding(input_ids.to(device), weight)

    def rotary(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model's rotary embedding module on ``device``: ``(x, position_ids) -> (cos, sin)``."""
        device = torch.device(device)
        if device not in self._rotary:
            self._rotary[device] = self._rotary_cls(config=self.config).to(device)
        return self._rotary[device]

    def layer_kwargs(self, hidden: torch.Tensor) -> dict[str, object]:
        """Keyword arguments a decoder layer needs for a batch ``hidden [B, T, hidden]`` of full sequences."""
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = causal_mask(self.config, hidden, position_ids)
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden.device)(hidden, position_ids),
        }


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
