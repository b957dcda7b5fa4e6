"""Collect the keys (pre-RoPE) and values every decoder layer hands its cache into ``activations.zarr``.

Sequential over layers, data-parallel over samples: each worker owns a contiguous shard of samples
``[offset, offset + n)``, keeps its hidden states, streams one layer at a time and writes only its own
chunks (one chunk per sample), so concurrent workers never share a chunk.

Layout of ``activations.zarr`` (attrs: num_layers, num_samples, seq_len, kv_dim, dtype, plus the caller's: the flow
adds ``windows``, each layer's sliding window or None, which the fit's predecessors follow)::

    keys/{l}, values/{l}     [num_samples, seq_len, kv_dim], chunks (1, seq_len, kv_dim)
    done/{l}/{a}-{b}         empty group: layer l is written for samples [a, b)
    hidden/{a}-{b}/{l}       shard's outputs of layer l, [b - a, seq_len, hidden]; only the latest, removed at the end

Zarr has no bfloat16: such arrays are stored as uint16 bit patterns with ``attrs["dtype"] = "bfloat16"``.

Resume is keyed by content: :func:`content_digest` names the activations by the config's sampling, the data's
SHA-256 and a fingerprint of the model's files (:func:`weights_fingerprint`), so another model or other data behind
the same path is collected again. The store is created whole in a temp dir and renamed into place, so collectors
opening a fresh store at once all see it complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from aquakv.config import CalibrationConfig
from aquakv.errors import CalibrationError, NonFiniteError
from aquakv.registry import sweep_leftovers, temp_name
from pipeline.checkpoint import Checkpoint, LayerStream
from pipeline.data import data_fingerprint, file_sha256

ACTIVATIONS_STORE = "activations.zarr"
KINDS = ("keys", "values")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_FILES = (".safetensors", ".json", ".model", ".txt", ".tiktoken")  # weights, config, tokenizer
COLLECTOR = 2  # what is collected: 2 = K/V as handed to the cache (aquakv.family); 1 was k_proj / v_proj outputs
SAMPLE = 4096  # bytes hashed at the start, middle and end of every tensor
MAX_HEADER = 100 << 20  # safetensors' own header limit


def _safetensors_fingerprint(path: Path) -> bytes:
    """Size, header (names, dtypes, shapes, offsets) and three 4 KiB samples of every tensor: ~12 KiB read per
    tensor (a few MB for a 140 GB checkpoint), so any retrained or swapped tensor changes it."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n) if n <= MAX_HEADER else b""
        try:
            meta = json.loads(header)
            ranges = sorted((k, [8 + n + o for o in v["data_offsets"]]) for k, v in meta.items() if k != "__metadata__")
        except (ValueError, TypeError, KeyError, AttributeError):
            raise CalibrationError(f"{path} is not a safetensors file (unreadable header); re-download it") from None
        digest.update(header)
        for _, (a, b) in ranges:
            for offset in sorted({a, max(a, (a + b) // 2 - SAMPLE // 2), max(a, b - SAMPLE)}):
                f.seek(offset)
                digest.update(f.read(min(SAMPLE, b - offset)))
    return digest.digest()


def weights_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a checkpoint's content: safetensors files sampled (:func:`_safetensors_fingerprint`), config
    and tokenizer files hashed whole. Copies of a model agree; another model of the same shapes does not."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).iterdir() if p.suffix in MODEL_FILES and p.is_file()):
        digest.update(path.name.encode() + b"\0")
        digest.update(_safetensors_fingerprint(path) if path.suffix == ".safetensors"
                      else bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def content_digest(cfg: CalibrationConfig, model_dir: str | Path, data: str | Path) -> str:
    """What collected activations depend on: ``cfg.collect_digest()`` (sampling) plus the content of the model
    (:func:`weights_fingerprint`) and of the data (:func:`pipeline.data.data_fingerprint`)."""
    blob = json.dumps({"config": cfg.collect_digest(), "model": weights_fingerprint(model_dir),
                       "data": data_fingerprint(data), "collector": COLLECTOR}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CalibrationError(f"unsupported dtype {name!r}, expected one of {list(DTYPES)}")
    return name


def _encode(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach().to(DTYPES[dtype]).cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


def _decode(data: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def _create(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: str) -> zarr.Array:
    arr = group.create_array(
        name,
        shape=shape,
        chunks=(1, *shape[1:]),
        dtype="uint16" if dtype == "bfloat16" else dtype,
        fill_value=0,
        compressors=None,  # activations are noise to a compressor: zstd only costs CPU time on the write path
        overwrite=True,
    )
    arr.attrs["dtype"] = dtype
    return arr


def shard_name(offset: int, n: int) -> str:
    """Name of the worker shard holding samples ``[offset, offset + n)``."""
    return f"{offset}-{offset + n}"


def open_activations(
    path: str | Path,
    num_layers: int,
    num_samples: int,
    seq_len: int,
    kv_dim: int,
    dtype: str = "float32",
    attrs: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create (or reopen, if its layout matches) the activations group; safe to call from concurrent collectors.

    A new store is built in a temp dir next to ``path`` and renamed into place: a collector that loses the race
    opens the winner's complete store.
    """
    layout = {
        "num_layers": num_layers,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "kv_dim": kv_dim,
        "dtype": _dtype_name(dtype),
    }
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r+")
    except FileNotFoundError:
        prefix = f".{path.name}.tmp-"
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(path.parent, (prefix,))
        tmp = path.parent / temp_name(prefix)
        try:
            fresh = zarr.open_group(tmp, mode="w")
            for kind in KINDS:
                for layer in range(num_layers):
                    _create(fresh, f"{kind}/{layer}", (num_samples, seq_len, kv_dim), layout["dtype"])
            fresh.attrs.update({**layout, **(attrs or {})})
            with contextlib.suppress(OSError):  # another collector's store is already there: use it
                os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            group = zarr.open_group(path, mode="r+")
        except FileNotFoundError:
            raise CalibrationError(f"{path} exists but is not a Zarr store (a foreign or partial directory): "
                                   "remove it") from None
    found = {k: group.attrs.get(k) for k in layout}
    if found != layout:
        raise CalibrationError(f"{path} holds activations of another layout {found}, expected {layout}: remove it")
    return group


def is_done(group: zarr.Group, layer: int, shard: str) -> bool:
    """Whether ``layer`` has been written for ``shard``."""
    return f"done/{layer}/{shard}" in group


def layer_complete(group: zarr.Group, layer: int) -> bool:
    """Whether the finished shards of ``layer`` cover every sample."""
    if f"done/{layer}" not in group:
        return False
    covered = np.zeros(group.attrs["num_samples"], dtype=bool)
    for shard in group[f"done/{layer}"].group_keys():
        a, b = map(int, shard.split("-"))
        covered[a:b] = True
    return bool(covered.all())


def read_activations(group: zarr.Group, kind: str, layer: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Samples ``[start, stop)`` of ``kind`` ("keys" or "values") at ``layer``: ``[n, seq_len, kv_dim]``."""
    arr = group[f"{kind}/{layer}"]
    return _decode(arr[start:stop], arr.attrs["dtype"])


def _check_finite(t: torch.Tensor, layer: int, what: str, rows: tuple[int, int]) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"layer {layer}: non-finite {what} for samples [{rows[0]}, {rows[1]})")


def _resume_point(group: zarr.Group, shard: str, stop: int) -> int:
    """First layer to compute for ``shard``: after the last done layer whose output hidden states were saved."""
    done = 0
    while done < stop and is_done(group, done, shard):
        done += 1
    if done in (0, stop):
        return done
    for layer in range(done - 1, -1, -1):
        if f"hidden/{shard}/{layer}" in group:
            return layer + 1
    return 0


@torch.inference_mode()
def collect_shard(
    checkpoint: Checkpoint,
    tokens: np.ndarray | torch.Tensor,
    sample_offset: int,
    store_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    layers: int | None = None,
    micro_batch: int = 1,
    progress: bool = True,
    hidden_every: int = 1,
) -> list[int]:
    """Run layers ``0..layers-1`` (all by default) over ``tokens [n, seq_len]``, writing their K/V to rows
    ``[sample_offset, sample_offset + n)`` of the activations store. Returns the layers computed by this call.

    Keys and values are what the layer hands its cache, keys un-rotated to pre-RoPE
    (:meth:`Checkpoint.forward_layer`), ``[n, seq_len, kv_dim]``.
    Resumes after the last layer marked done for this shard whose hidden states were saved (every
    ``hidden_every`` layers: at 70B scale a shard's hidden states are GBs, so saving them less often trades
    recomputation after a crash for I/O). With
    ``micro_batch=1`` the result is bitwise independent of how samples are split into shards.
    """
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n, seq_len = tokens.shape
    group = zarr.open_group(store_path, mode="r+")
    attrs = group.attrs
    if seq_len != attrs["seq_len"] or sample_offset + n > attrs["num_samples"]:
        raise CalibrationError(
            f"shard of {n} x {seq_len} tokens at offset {sample_offset} does not fit {store_path} "
            f"({attrs['num_samples']} x {attrs['seq_len']})"
        )
    dtype = _dtype_name(dtype)
    shard = shard_name(sample_offset, n)
    stop = checkpoint.num_layers if layers is None else layers
    start = _resume_point(group, shard, stop)
    if start == stop:
        return []
    if start == 0:
        hidden = checkpoint.embed(tokens, device, DTYPES[dtype])
    else:
        saved = group[f"hidden/{shard}/{start - 1}"]
        hidden = _decode(saved[:], saved.attrs["dtype"]).to(device=device, dtype=DTYPES[dtype])

    done = []
    writer = ThreadPoolExecutor(max_workers=4)  # Zarr writes overlap the next micro-batch's compute
    for layer_idx, layer in LayerStream(checkpoint, range(start, stop), device, DTYPES[dtype]):
        pending: list[Future] = []
        arrays = {kind: group[f"{kind}/{layer_idx}"] for kind in KINDS}
        try:
            for b0 in tqdm(range(0, n, micro_batch), desc=f"layer {layer_idx}", disable=not progress, leave=False):
                b1 = min(b0 + micro_batch, n)
                rows = (sample_offset + b0, sample_offset + b1)
                out, *kv = checkpoint.forward_layer(layer_idx, layer, hidden[b0:b1])
                _check_finite(out, layer_idx, "hidden states", rows)
                for kind, x in zip(KINDS, kv, strict=True):
                    _check_finite(x, layer_idx, kind, rows)
                    pending.append(writer.submit(arrays[kind].__setitem__, slice(*rows), _encode(x, attrs["dtype"])))
                hidden[b0:b1] = out
        finally:
            for f in pending:
                f.result()  # every K/V chunk is on disk before the layer is marked done
        last = layer_idx + 1 == checkpoint.num_layers
        saved = not last and (layer_idx + 1) % hidden_every == 0
        if saved:
            _create(group, f"hidden/{shard}/{layer_idx}", tuple(hidden.shape), dtype)[:] = _encode(hidden, dtype)
        group.require_group(f"done/{layer_idx}/{shard}")  # the commit point of this (layer, shard)
        if last and f"hidden/{shard}" in group:
            del group[f"hidden/{shard}"]
        elif saved:
            for older in [k for k in group[f"hidden/{shard}"].keys() if int(k) < layer_idx]:
                del group[f"hidden/{shard}/{older}"]
        done.append(layer_idx)
    writer.shutdown()
    return done
