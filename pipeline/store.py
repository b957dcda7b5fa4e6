"""Where the fit's data live: the activations store (read only), the recon store and the saved codecs.

Activations: ``activations.zarr`` with ``keys/{l}``, ``values/{l}`` ``[num_samples, seq_len, kv_dim]`` (pre-RoPE),
one chunk per sample (float32/float16, or uint16 bit patterns with ``attrs["dtype"] = "bfloat16"``).

Workdir layout::

    recon.zarr/{keys,values}/{l}        K̂_l, V̂_l float32, same shape and chunks as the activations (Zarr shards)
    fit/{l}.safetensors                 layer l's grids, Hadamard signs and predictors (the bundle's tensor names)
    fit/{l}.json                        its bundle manifest entry, predictor ranks, metrics, config digest,
                                        tensor file SHA-256 (written last: the layer is done once it exists)
    fit/solved-{l}.{safetensors,json}   parallel mode: the solved codecs, before the reconstruction pass
    fit/budget.json                     a bit budget's allocation

Every file is written to a temp name and ``os.replace``-d, so a rerun resumes after the last finished layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from zarr.errors import ContainsArrayError

from aquakv.bundle import decode_layer, encode_layer
from aquakv.codec import LayerCodec
from aquakv.config import CalibrationConfig
from aquakv.errors import AquaKVError, CalibrationError
from aquakv.family import predecessors
from pipeline.solve import KINDS, LayerFit

RECON_STORE = "recon.zarr"
FIT_DIR = "fit"


@dataclass(frozen=True)
class StoreInfo:
    """Shape of an activations store."""

    num_layers: int
    num_samples: int
    seq_len: int
    kv_dim: int
    windows: tuple[int | None, ...]  # per layer, its sliding window (None: global), from the store's attrs

    @property
    def predecessors(self) -> list[int | None]:
        return predecessors(list(self.windows))


def store_info(act_path: str | os.PathLike) -> StoreInfo:
    """Validate an activations store and return its shape; :class:`CalibrationError` if it is missing or empty."""
    try:
        group = zarr.open_group(str(act_path), mode="r")
    except FileNotFoundError as e:
        raise CalibrationError(f"no activations store at {act_path}; run the collect stage first") from e
    if "keys" not in group or "values" not in group:
        raise CalibrationError(f"{act_path} holds no keys/ and values/ arrays; run the collect stage first")
    layers = sorted(int(k) for k in group["keys"].array_keys())
    if not layers:
        raise CalibrationError(f"{act_path} holds no layers; run the collect stage first")
    if layers != list(range(len(layers))) or sorted(int(k) for k in group["values"].array_keys()) != layers:
        raise CalibrationError(f"{act_path}: keys/ and values/ must both hold layers 0..L-1, found keys {layers}")
    shape = group["keys/0"].shape
    for kind in KINDS:
        for layer in layers:
            if group[f"{kind}/{layer}"].shape != shape:
                raise CalibrationError(f"{act_path}: {kind}/{layer} has shape {group[f'{kind}/{layer}'].shape}, "
                                       f"keys/0 has {shape}")
    if len(shape) != 3 or 0 in shape:
        raise CalibrationError(f"{act_path} holds no activations (shape {shape}, expected [samples, seq_len, dim])")
    windows = tuple(group.attrs.get("windows") or [None] * len(layers))
    if len(windows) != len(layers):
        raise CalibrationError(f"{act_path}: attrs name {len(windows)} layer windows for {len(layers)} layers")
    return StoreInfo(len(layers), *shape, windows)


def read_rows(group: zarr.Group, kind: str, layer: int, start: int, stop: int, device: str) -> torch.Tensor:
    """Samples ``[start, stop)`` of ``kind/layer`` as float32 ``[(stop-start)*seq_len, D]``."""
    arr = group[f"{kind}/{layer}"]
    data = np.ascontiguousarray(arr[start:stop])
    if arr.attrs.get("dtype") == "bfloat16":  # stored as uint16 bit patterns
        t = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(data)
    return t.to(device=device, dtype=torch.float32).reshape(-1, t.shape[-1])


def open_recon(recon_path: str | os.PathLike, info: StoreInfo) -> None:
    """Make the recon store's groups and drop arrays of another shape than the activations', once, before shard
    tasks run: concurrent tasks then only add arrays (:func:`require_recon`), which is safe."""
    group = zarr.open_group(str(recon_path), mode="a")
    for kind in KINDS:
        arrays = group.require_group(kind)
        for name, array in list(arrays.arrays()):
            if array.shape != (info.num_samples, info.seq_len, info.kv_dim):
                del arrays[name]


def require_recon(recon_path: str | os.PathLike, layer: int, info: StoreInfo) -> None:
    """Make ``layer``'s recon arrays ``[samples, seq_len, D]`` float32 unless they are there (their rows are all
    rewritten by the reconstruction); every shard calls it, the first to create an array wins."""
    group = zarr.open_group(str(recon_path), mode="r+")
    shape = (info.num_samples, info.seq_len, info.kv_dim)
    for kind in KINDS:
        try:
            group.create_array(f"{kind}/{layer}", shape=shape, chunks=(1, *shape[1:]), dtype="float32",
                               compressors=None)
        except ContainsArrayError:
            pass


def has_recon(recon_path: Path, layer: int) -> bool:
    try:
        group = zarr.open_group(str(recon_path), mode="r")
    except FileNotFoundError:
        return False
    return all(f"{kind}/{layer}" in group for kind in KINDS)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_codec(stem: Path, codec: LayerCodec, info: dict[str, Any]) -> None:
    """Write ``stem.safetensors`` (tensors) then ``stem.json`` (``info``, the layer's bundle manifest entry, tensor
    SHA-256), atomically. The format is the bundle's (:func:`aquakv.bundle.encode_layer`: the same entry and tensor
    names, as layer 0 of a bundle), so publishing re-encodes nothing new and loading validates like a bundle."""
    grids: dict[str, torch.Tensor] = {}
    predictors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = dict(info)
    meta["entry"] = encode_layer(0, codec, grids, predictors)
    meta["rank"] = {kind: None if p is None else p.rank for kind, p in (("keys", codec.key_predictor),
                                                                         ("values", codec.value_predictor))}
    blob = save_safetensors({**grids, **predictors})
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(stem.with_name(stem.name + ".safetensors"), blob)
    atomic_write(stem.with_name(stem.name + ".json"), json.dumps(meta, indent=2, sort_keys=True).encode())


def load_codec(stem: Path, digest: str) -> tuple[LayerCodec, dict[str, Any]] | None:
    """The codec and json info saved at ``stem`` if complete, intact and made with config ``digest``; else None."""
    try:
        meta = json.loads(stem.with_name(stem.name + ".json").read_bytes())
        blob = stem.with_name(stem.name + ".safetensors").read_bytes()
    except (OSError, ValueError):
        return None
    if (not isinstance(meta, dict) or meta.get("digest") != digest
            or meta.get("sha256") != hashlib.sha256(blob).hexdigest()):
        return None
    try:
        tensors = load_safetensors(blob)
        codec = decode_layer(0, meta["entry"], tensors, tensors, str(stem))
    except (AquaKVError, ValidationError, SafetensorError, KeyError, TypeError, ValueError):
        return None  # an older format or a damaged file: the layer is fitted again
    ranks = meta.get("rank") if isinstance(meta.get("rank"), dict) else {}
    for p, kind in ((codec.key_predictor, "keys"), (codec.value_predictor, "values")):
        if p is not None and isinstance(ranks.get(kind), int):
            p.rank = ranks[kind]
    return codec, meta


def load_fits(workdir: str | os.PathLike, cfg: CalibrationConfig, num_layers: int) -> list[LayerFit]:
    """The leading layers whose codecs are saved under ``workdir`` with ``cfg`` (where a fit goes on is the shards'
    choice, :meth:`pipeline.chain.ChainShard.resume_point`)."""
    workdir = Path(workdir)
    fits: list[LayerFit] = []
    for layer in range(num_layers):
        loaded = load_codec(workdir / FIT_DIR / str(layer), cfg.fit_digest())
        if loaded is None:
            break
        fits.append(LayerFit(layer, loaded[0], loaded[1]["metrics"]))
    return fits
