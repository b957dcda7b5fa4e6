"""Per-layer fitting of AQUA-KV predictors and residual quantizers from collected activations.

Input: ``activations.zarr`` with ``keys/{l}``, ``values/{l}`` ``[num_samples, seq_len, kv_dim]`` (pre-RoPE), one
chunk per sample (float32/float16, or uint16 bit patterns with ``attrs["dtype"] = "bfloat16"``).

Chain mode (the paper): layer by layer, predictors are fitted on the reconstructions inference will have,
``K_l ≈ P^K_l(K̂_p)`` and ``V_l ≈ P^V_l([K̂_l, V̂_p])`` where ``p`` is the layer's predecessor (``l - 1``, or the
previous layer of the same attention type in models with sliding-window layers, see
:func:`aquakv.family.predecessors`; none: no predictors); statistics are summed over sample shards, each shard being
one call of a top-level function (``map_fn`` can spread them over Ray workers).

Parallel mode: every layer is fitted from exact inputs at once, the expected quantization noise of the inputs
entering the ridge term (errors-in-variables, see :func:`solve_parallel`); a final pass quantizes in chain order.

Workdir layout::

    recon.zarr/{keys,values}/{l}        K̂_l, V̂_l float32, same shape and chunks as the activations
    fit/{l}.safetensors                 layer l's grids, Hadamard signs and predictors
    fit/{l}.json                        quantizer configs, metrics, config digest, tensor file SHA-256
                                        (written last: the layer is done once it exists)
    fit/solved-{l}.{safetensors,json}   parallel mode: the solved codecs, before the reconstruction pass

Every file is written to a temp name and ``os.replace``-d, so a rerun resumes after the last finished layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from zarr.errors import ContainsArrayError

from aquakv.bundle import bits_per_value
from aquakv.codec import LayerCodec, Residual, encode, gaussian_residual, value_inputs
from aquakv.config import CalibrationConfig, QuantizerConfig
from aquakv.errors import CalibrationError, NonFiniteError
from aquakv.family import predecessors
from aquakv.grids import expected_distortion, fit_grid, gaussian_grid
from aquakv.predictors import Predictor, RidgeStats, fit_ridge, ridge_stats
from aquakv.quantize import unit_vectors
from pipeline import budget
from pipeline.collect import layer_complete

if TYPE_CHECKING:
    from pipeline.chain import ShardShape

KINDS = ("keys", "values")
RECON_STORE = "recon.zarr"
FIT_DIR = "fit"
SIGN_SEED = 0xA0A0
ROWS_PER_READ = 1 << 16  # tokens read at once within a shard (bounds memory, keeps whole-sample reads)

MapFn = Callable[..., Iterable[Any]]
Allocation = dict[tuple[int, str], QuantizerConfig]  # (layer, "keys" | "values") -> quantizer of a bit budget


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


@dataclass
class LayerFit:
    """A fitted layer: its codec and metrics.

    ``metrics``: ``keys_rel_mse``, ``values_rel_mse`` (reconstruction vs original), ``keys_pred_rel_mse``,
    ``values_pred_rel_mse`` (predictor alone, 1.0 without predictor), ``bits_per_value``, ``tokens``.
    """

    layer: int
    codec: LayerCodec
    metrics: dict[str, float]


@dataclass
class ExactStats:
    """Parallel-mode statistics of one layer from exact inputs.

    ``keys``: X = K_p, Y = K_l; ``values``: X = [K_l, V_p], Y = V_l (both None without a predecessor ``p``);
    ``keys_sq``, ``values_sq`` ``[D]`` float64: per-channel sums of K_l², V_l²; ``count``: tokens.
    """

    keys: RidgeStats | None
    values: RidgeStats | None
    keys_sq: torch.Tensor
    values_sq: torch.Tensor
    count: int

    def __add__(self, other: ExactStats) -> ExactStats:
        def add(a: RidgeStats | None, b: RidgeStats | None) -> RidgeStats | None:
            return None if a is None else a + b

        return ExactStats(add(self.keys, other.keys), add(self.values, other.values), self.keys_sq + other.keys_sq,
                          self.values_sq + other.values_sq, self.count + other.count)


# ---------------------------------------------------------------------------------------------------------------
# store I/O


def shard_ranges(num_samples: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ``[0, num_samples)`` into at most ``num_shards`` contiguous, non-empty, near-equal ``(start, stop)``."""
    if num_samples < 1 or num_shards < 1:
        raise ValueError(f"need num_samples >= 1 and num_shards >= 1, got {num_samples}, {num_shards}")
    n = min(num_shards, num_samples)
    bounds = [num_samples * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


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


def _read(group: zarr.Group, kind: str, layer: int, start: int, stop: int, device: str) -> torch.Tensor:
    """Samples ``[start, stop)`` of ``kind/layer`` as float32 ``[(stop-start)*seq_len, D]``."""
    arr = group[f"{kind}/{layer}"]
    data = np.ascontiguousarray(arr[start:stop])
    if arr.attrs.get("dtype") == "bfloat16":  # stored as uint16 bit patterns
        t = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(data)
    return t.to(device=device, dtype=torch.float32).reshape(-1, t.shape[-1])


def _batches(start: int, stop: int, seq_len: int) -> Iterator[tuple[int, int]]:
    step = max(1, ROWS_PER_READ // seq_len)
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


def _require_recon(recon_path: str | os.PathLike, layer: int, info: StoreInfo) -> None:
    """Make ``layer``'s recon arrays unless they are there with the activations' shape (rows are all rewritten by
    :func:`reconstruct_shard`); every shard calls it, the first to create an array wins."""
    group = zarr.open_group(str(recon_path), mode="a")
    shape = (info.num_samples, info.seq_len, info.kv_dim)
    for kind in KINDS:
        name = f"{kind}/{layer}"
        if name in group and group[name].shape == shape:
            continue
        try:
            group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype="float32", compressors=None,
                               overwrite=name in group)
        except ContainsArrayError:
            pass


def _has_recon(recon_path: Path, layer: int) -> bool:
    try:
        group = zarr.open_group(str(recon_path), mode="r")
    except FileNotFoundError:
        return False
    return all(f"{kind}/{layer}" in group for kind in KINDS)


def _cpu(stats: RidgeStats) -> RidgeStats:
    return RidgeStats(stats.xtx.cpu(), stats.xty.cpu(), stats.yty, stats.count)


def _stats(x: torch.Tensor, y: torch.Tensor, layer: int, kind: str, rows: tuple[int, int]) -> RidgeStats:
    try:
        return ridge_stats(x, y)
    except NonFiniteError as e:
        raise NonFiniteError(f"layer {layer} {kind}, samples [{rows[0]}, {rows[1]}): {e}") from e


def _accumulate(total: Any, part: Any) -> Any:
    return part if total is None else total + part


class PairwiseSum:
    """Sum of a sequence in a fixed binary tree over its order, ``((a + b) + (c + d)) + ...``, kept as a stack of
    ``log2 n`` partial sums. Float sums depend on their order; this tree does not depend on how the sequence is cut:
    shards that each cover an aligned power-of-two block of it (``shard_ranges(2^k m, 2^j)`` with ``j <= k``) summed
    the same way give the bits one pass over the whole gives, so 1, 2 or 4 workers fit the same bundle."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, Any]] = []  # (tree level, partial sum), levels strictly decreasing

    def add(self, value: Any) -> None:
        level = 0
        while self._stack and self._stack[-1][0] == level:
            value = self._stack.pop()[1] + value
            level += 1
        self._stack.append((level, value))

    def total(self) -> Any:
        """The sum (None for an empty sequence): remaining partials combined from the right."""
        if not self._stack:
            return None
        value = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            value = left + value
        return value


def _add_samples(total: PairwiseSum, x: torch.Tensor, y: torch.Tensor, samples: int, layer: int, kind: str,
                 start: int) -> None:
    """Ridge statistics of each sample's rows of ``x, y`` (``samples`` equal runs of rows, from sample ``start``)
    added to ``total`` one sample at a time: the tree is over samples, whatever the row batches or shards."""
    per = x.shape[0] // samples
    for i in range(samples):
        rows = slice(i * per, (i + 1) * per)
        total.add(_stats(x[rows], y[rows], layer, kind, (start + i, start + i + 1)))


def kept_rows(samples: int, seq_len: int, skip: int, device: str | torch.device = "cpu") -> torch.Tensor | None:
    """Row mask ``[samples * seq_len]`` leaving out each sample's first ``skip`` tokens (None: keep all)."""
    if skip == 0:
        return None
    return (torch.arange(seq_len, device=device) >= skip).repeat(samples)


def _keep(mask: torch.Tensor | None, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(xs) if mask is None else [x[mask] for x in xs]


def residual_units(keys: torch.Tensor, values: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None,
                   codec: LayerCodec, kind: str, stride: int, seed: int = 0) -> torch.Tensor:
    """One in ``stride`` of the vectors the ``kind`` grid will quantize for rows ``[N, D]`` (a fixed-seed random
    choice: a plain stride would alias with the row length and pick the same channels of every token), with their
    weights: ``[m, d + 1]``.

    The vectors are the residual after the predictor (values: given K̂_l from ``codec``'s key part, as
    :func:`aquakv.codec.encode` makes it), rotated and scaled by :func:`aquakv.quantize.unit_vectors`; the weight
    (last column) is the squared scale of the vector's group over ``g``, what a unit error of the vector costs."""
    if kind == "keys":
        residual, q = keys - codec.predict_keys(prev, keys), codec.keys
    else:
        _, (keys_hat, _) = encode(keys, values, prev, LayerCodec(codec.keys, codec.values, codec.key_predictor, None))
        residual, q = values - codec.predict_values(keys_hat, prev), codec.values
    unit, norms = unit_vectors(residual, q.signs, q.config)  # [N, G*g/d, d], [N, G]
    per_group = q.config.group_size // q.config.dim
    weights = (norms * norms / q.config.group_size).repeat_interleave(per_group, -1)
    samples = torch.cat([unit, weights[..., None]], -1).reshape(-1, q.config.dim + 1)
    if stride > 1:
        gen = torch.Generator().manual_seed(seed)
        samples = samples[torch.randperm(samples.shape[0], generator=gen)[: samples.shape[0] // stride].to(
            samples.device)]
    return samples.cpu()


def grid_stride(tokens: int, channels: int, config: QuantizerConfig, vectors: int) -> int:
    """Subsampling stride so that ``tokens`` rows of ``channels`` give about ``vectors`` grid vectors."""
    per_row = -(-channels // config.group_size) * config.group_size // config.dim
    return max(1, tokens * per_row // max(vectors, 1))


# ---------------------------------------------------------------------------------------------------------------
# per-shard work (top-level, picklable, plain arguments)


def layer_stats_keys(act_path: str, recon_path: str, layer: int, prev: int, start: int, stop: int, skip: int = 0,
                     device: str = "cpu") -> RidgeStats:
    """Key predictor statistics of samples ``[start, stop)``: X = K̂_prev ``[N, D]`` (recon), Y = K_l ``[N, D]``
    (without each sample's first ``skip`` tokens)."""
    act, rec = zarr.open_group(act_path, mode="r"), zarr.open_group(recon_path, mode="r")
    seq_len = act[f"keys/{layer}"].shape[1]
    total = PairwiseSum()
    for a, b in _batches(start, stop, seq_len):
        x, y = _keep(kept_rows(b - a, seq_len, skip, device), _read(rec, "keys", prev, a, b, device),
                     _read(act, "keys", layer, a, b, device))
        _add_samples(total, x, y, b - a, layer, "keys", a)
    return _cpu(total.total())


def layer_stats_values(act_path: str, recon_path: str, layer: int, prev: int, start: int, stop: int,
                       codec: LayerCodec, skip: int = 0, device: str = "cpu") -> RidgeStats:
    """Value predictor statistics: X = [K̂_l, V̂_prev] ``[N, 2D]``, Y = V_l ``[N, D]``.

    K̂_l comes from :func:`aquakv.codec.encode` with ``codec``'s key predictor and quantizer (its value
    predictor is ignored), exactly as :func:`reconstruct_shard` will produce it.
    """
    act, rec = zarr.open_group(act_path, mode="r"), zarr.open_group(recon_path, mode="r")
    key_only = LayerCodec(codec.keys, codec.values, codec.key_predictor, None)
    seq_len = act[f"keys/{layer}"].shape[1]
    total = PairwiseSum()
    for a, b in _batches(start, stop, seq_len):
        rows = [_read(g, kind, i, a, b, device) for g, i in ((act, layer), (rec, prev)) for kind in KINDS]
        keys, values, *prev_kv = _keep(kept_rows(b - a, seq_len, skip, device), *rows)
        try:
            _, (keys_hat, _) = encode(keys, values, prev_kv, key_only.to(device))
        except NonFiniteError as e:
            raise NonFiniteError(f"layer {layer} keys, samples [{a}, {b}): {e}") from e
        _add_samples(total, value_inputs(keys_hat, prev_kv[1]), values, b - a, layer, "values", a)
    return _cpu(total.total())


def layer_stats_exact(act_path: str, layer: int, prev: int | None, start: int, stop: int, skip: int = 0,
                      device: str = "cpu") -> ExactStats:
    """Parallel-mode statistics of samples ``[start, stop)`` from exact inputs (see :class:`ExactStats`)."""
    act = zarr.open_group(act_path, mode="r")
    seq_len = act[f"keys/{layer}"].shape[1]
    total = None
    for a, b in _batches(start, stop, seq_len):
        mask = kept_rows(b - a, seq_len, skip, device)
        keys, values = _keep(mask, _read(act, "keys", layer, a, b, device), _read(act, "values", layer, a, b, device))
        if prev is None:
            for kind, y in (("keys", keys), ("values", values)):
                if not torch.isfinite(y).all():
                    raise NonFiniteError(f"layer {layer} {kind}, samples [{a}, {b}): NaN or Inf in the activations")
            key_stats = value_stats = None
        else:
            prev_keys, prev_values = _keep(mask, _read(act, "keys", prev, a, b, device),
                                           _read(act, "values", prev, a, b, device))
            key_stats = _cpu(_stats(prev_keys, keys, layer, "keys", (a, b)))
            value_stats = _cpu(_stats(value_inputs(keys, prev_values), values, layer, "values", (a, b)))
        keys_sq, values_sq = (keys.double() ** 2).sum(0).cpu(), (values.double() ** 2).sum(0).cpu()
        part = ExactStats(key_stats, value_stats, keys_sq, values_sq, keys.shape[0])
        total = _accumulate(total, part)
    return total


def grid_samples(act_path: str, recon_path: str, layer: int, prev: int | None, start: int, stop: int,
                 codec: LayerCodec, kind: str, skip: int, vectors: int, device: str = "cpu") -> torch.Tensor:
    """About ``vectors`` of the vectors ``[m, d]`` layer ``layer``'s ``kind`` grid will quantize in samples
    ``[start, stop)`` (:func:`residual_units`, without each sample's first ``skip`` tokens)."""
    act = zarr.open_group(act_path, mode="r")
    rec = None if prev is None else zarr.open_group(recon_path, mode="r")
    seq_len, dim = act[f"keys/{layer}"].shape[1:]
    config = (codec.keys if kind == "keys" else codec.values).config
    stride = grid_stride((stop - start) * (seq_len - skip), dim, config, vectors)
    codec, parts = codec.to(device), []
    for a, b in _batches(start, stop, seq_len):
        rows = [_read(act, "keys", layer, a, b, device), _read(act, "values", layer, a, b, device)]
        if prev is not None:
            rows += [_read(rec, "keys", prev, a, b, device), _read(rec, "values", prev, a, b, device)]
        keys, values, *prev_kv = _keep(kept_rows(b - a, seq_len, skip, device), *rows)
        parts.append(residual_units(keys, values, tuple(prev_kv) or None, codec, kind, stride, seed=a))
    return torch.cat(parts)


def reconstruct_shard(act_path: str, recon_path: str, layer: int, prev: int | None, start: int, stop: int,
                      codec: LayerCodec, device: str = "cpu") -> dict[str, float]:
    """Encode samples ``[start, stop)`` of ``layer`` with :func:`aquakv.codec.encode`, write K̂_l, V̂_l rows to the
    recon store (whole chunks only), and return squared-error sums: ``{keys,values}_{err,pred_err,norm}``."""
    act, rec = zarr.open_group(act_path, mode="r"), zarr.open_group(recon_path, mode="r+")
    codec = codec.to(device)
    seq_len, dim = act[f"keys/{layer}"].shape[1:]
    sums = dict.fromkeys(("keys_err", "keys_pred_err", "keys_norm", "values_err", "values_pred_err",
                          "values_norm"), 0.0)
    for a, b in _batches(start, stop, seq_len):
        prev_kv = None if prev is None else (_read(rec, "keys", prev, a, b, device),
                                             _read(rec, "values", prev, a, b, device))
        keys, values = _read(act, "keys", layer, a, b, device), _read(act, "values", layer, a, b, device)
        hats = encode_with_errors(keys, values, prev_kv, codec, sums, f"layer {layer}, samples [{a}, {b})")
        for kind, y_hat in zip(KINDS, hats, strict=True):
            rec[f"{kind}/{layer}"][a:b] = y_hat.reshape(b - a, seq_len, dim).cpu().numpy()
    return sums


@dataclass(frozen=True)
class ZarrShard:
    """Samples ``[start, stop)`` of an activations store as a :class:`pipeline.chain.ChainShard`, on top of the
    per-shard functions above. The reconstructions live in the recon store, every layer's kept on disk: the shard
    holds no state (checkpoints are no-ops) and pickles as paths, so a Ray task can run any of its methods."""

    act_path: str
    recon_path: str
    start: int
    stop: int
    info: StoreInfo
    device: str = "cpu"

    def shape(self) -> ShardShape:
        n, info = self.stop - self.start, self.info
        return {"samples": n, "tokens": n * info.seq_len, "seq_len": info.seq_len, "kv_dim": info.kv_dim,
                "num_layers": info.num_layers, "windows": list(info.windows), "start": self.start, "stop": self.stop}

    def forward(self, layer: int) -> None:
        """Nothing to run (collected already): check that ``layer``'s activations are complete (stores the collect
        stage wrote mark finished shards) and make its recon arrays."""
        act = zarr.open_group(self.act_path, mode="r")
        if "done" in act and not layer_complete(act, layer):
            raise CalibrationError(f"{self.act_path}: layer {layer} is not collected for every sample; run the "
                                   "collect stage first")
        _require_recon(self.recon_path, layer, self.info)

    def key_stats(self, layer: int, skip: int = 0) -> RidgeStats:
        return layer_stats_keys(self.act_path, self.recon_path, layer, self.info.predecessors[layer], self.start,
                                self.stop, skip, self.device)

    def value_stats(self, layer: int, codec: LayerCodec, skip: int = 0) -> RidgeStats:
        return layer_stats_values(self.act_path, self.recon_path, layer, self.info.predecessors[layer], self.start,
                                  self.stop, codec, skip, self.device)

    def grid_samples(self, layer: int, codec: LayerCodec, kind: str, skip: int, vectors: int) -> torch.Tensor:
        return grid_samples(self.act_path, self.recon_path, layer, self.info.predecessors[layer], self.start,
                            self.stop, codec, kind, skip, vectors, self.device)

    def reconstruct(self, layer: int, codec: LayerCodec) -> dict[str, float]:
        return reconstruct_shard(self.act_path, self.recon_path, layer, self.info.predecessors[layer], self.start,
                                 self.stop, codec, self.device)

    def resume_point(self, finished: int, saved: int | None) -> int:
        """After the leading finished layers whose reconstruction is in the recon store (``saved`` is not needed:
        every layer is)."""
        return next((layer for layer in range(finished) if not _has_recon(Path(self.recon_path), layer)), finished)

    def save_state(self, layer: int, directory: str) -> None:
        """Nothing to save: the recon store is the state."""

    def restore_state(self, layer: int, directory: str) -> None:
        """Nothing to restore: the recon store is the state."""

    def finish(self) -> None:
        """No background work."""


def zarr_shards(act_path: str | os.PathLike, recon_path: str | os.PathLike, num_shards: int,
                device: str = "cpu") -> list[ZarrShard]:
    """The activations store at ``act_path`` cut into ``num_shards`` :class:`ZarrShard` s (:func:`shard_ranges`)."""
    info = store_info(act_path)
    return [ZarrShard(str(act_path), str(recon_path), a, b, info, device)
            for a, b in shard_ranges(info.num_samples, num_shards)]


def encode_with_errors(keys: torch.Tensor, values: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None,
                       codec: LayerCodec, sums: dict[str, float], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`aquakv.codec.encode` one batch ``[N, D]``; add its squared errors (reconstruction, prediction alone)
    and norms to ``sums``; return ``(K̂, V̂)``."""
    try:
        _, (keys_hat, values_hat) = encode(keys, values, prev, codec)
    except NonFiniteError as e:
        raise NonFiniteError(f"{where}: {e}") from e
    preds = (codec.predict_keys(prev, keys), codec.predict_values(keys_hat, prev))
    for kind, y, y_hat, pred in (("keys", keys, keys_hat, preds[0]), ("values", values, values_hat, preds[1])):
        y64 = y.double()
        sums[f"{kind}_err"] += float(((y64 - y_hat.double()) ** 2).sum())
        sums[f"{kind}_pred_err"] += float(((y64 - pred.double()) ** 2).sum())
        sums[f"{kind}_norm"] += float((y64 * y64).sum())
    return keys_hat, values_hat


# ---------------------------------------------------------------------------------------------------------------
# solving


def sign_seed(layer: int, kind: str) -> int:
    """Seed of the Hadamard signs of ``layer``'s ``kind`` quantizer: fixed, distinct per layer and kind."""
    return SIGN_SEED + 2 * layer + KINDS.index(kind)


def residual_quantizers(cfg: CalibrationConfig, layer: int, chain_start: bool,
                        allocation: Allocation | None = None) -> tuple[Residual, Residual]:
    """Keys and values residual quantizers of ``layer`` (``cfg.first_layer`` for a layer without predictors: layer 0,
    and the first global / local layer of models with sliding-window layers; else the ``allocation`` of a bit
    budget, or ``cfg.keys`` / ``cfg.values``)."""
    key_cfg, value_cfg = (cfg.first_layer, cfg.first_layer) if chain_start else (cfg.keys, cfg.values)
    if allocation is not None and not chain_start:
        key_cfg, value_cfg = allocation[(layer, "keys")], allocation[(layer, "values")]
    return (gaussian_residual(key_cfg, sign_seed(layer, "keys")),
            gaussian_residual(value_cfg, sign_seed(layer, "values")))


def solve_predictor(stats: RidgeStats, cfg: CalibrationConfig) -> Predictor:
    """The ridge solve with the run's damping and rank policy (fixed rank, rank budget or full rank), on this
    process's GPU when it has one: the float64 solve of a ``[2D+1]²`` system took ~0.3 s per layer on a 16-core CPU
    at D = 1024 (and ~4 s to load LAPACK on first use; H100 machine, 2026-11-26), milliseconds on the GPU. A flow
    driver without a GPU (a cluster's head node) solves on its CPU; the two differ in float64 ulps. Returns CPU
    tensors."""
    if torch.cuda.is_available():
        stats = RidgeStats(stats.xtx.cuda(), stats.xty.cuda(), stats.yty, stats.count)
    p = fit_ridge(stats, cfg.damping, cfg.predictor_rank, cfg.predictor_rank_budget)
    return Predictor(p.weight.cpu(), p.bias.cpu(), p.rank)


def _repeat(n: int, *plain: Any) -> list[list[Any]]:
    """Argument columns for ``map_fn``: each plain value repeated once per task."""
    return [[v] * n for v in plain]


GRID_VECTORS = 1 << 16  # vectors a fitted grid sees (at least; 512 per grid point for large grids)


def _fitted(residual: Residual, samples: torch.Tensor) -> Residual:
    """``residual`` with its grid fitted to ``samples [m, d + 1]`` (vectors, weights: :func:`residual_units`)."""
    return Residual(residual.config, fit_grid(samples[:, :-1], samples[:, -1], residual.grid), residual.signs)


def solve_layer(cfg: CalibrationConfig, layer: int, prev: int | None, key_stats: Callable[[], RidgeStats],
                value_stats: Callable[[LayerCodec], RidgeStats],
                grid_samples: Callable[[LayerCodec, str, int], torch.Tensor],
                allocation: Allocation | None = None) -> LayerCodec:
    """One layer of the chain, wherever its data live (Zarr shards or resident workers): solve the key predictor,
    fit the keys grid to the key residuals (``cfg.grids == "fitted"``), then the value predictor given K̂_l and
    the values grid. ``key_stats()``, ``value_stats(partial codec)`` and ``grid_samples(codec, kind, vectors)``
    gather over all shards."""
    keys_q, values_q = residual_quantizers(cfg, layer, prev is None, allocation)
    key_predictor = value_predictor = None
    if prev is not None:
        key_predictor = solve_predictor(key_stats(), cfg)
    if cfg.grids == "fitted":
        vectors = max(GRID_VECTORS, 512 * keys_q.config.size)
        keys_q = _fitted(keys_q, grid_samples(LayerCodec(keys_q, values_q, key_predictor, None), "keys", vectors))
    if prev is not None:
        value_predictor = solve_predictor(value_stats(LayerCodec(keys_q, values_q, key_predictor, None)), cfg)
    if cfg.grids == "fitted":
        vectors = max(GRID_VECTORS, 512 * values_q.config.size)
        partial = LayerCodec(keys_q, values_q, key_predictor, value_predictor)
        values_q = _fitted(values_q, grid_samples(partial, "values", vectors))
    return LayerCodec(keys_q, values_q, key_predictor, value_predictor)


def _sum(parts: Iterable[Any]) -> Any:
    """Sum of shard results (anything with ``+``) in :class:`PairwiseSum`'s tree, consumed as they arrive."""
    total = PairwiseSum()
    for part in parts:
        total.add(part)
    return total.total()


def _quantization_noise(energy: torch.Tensor, config: QuantizerConfig, distortion: float) -> torch.Tensor:
    """Per-channel variance ``[D]`` of the HIGGS error of a residual with per-channel energy ``energy [D]``.

    Each Hadamard group (zero-padded to ``g`` channels) is scaled by its norm and its rotated coordinates are near
    standard normal, so the group's error energy is ``distortion · ‖r_group‖²``, spread evenly over its ``g``
    channels by the (orthonormal) inverse rotation: ``σ²_c = distortion · mean(energy over c's group)``.
    """
    g, d = config.group_size, energy.shape[0]
    padded = torch.nn.functional.pad(energy, (0, (-d) % g)).view(-1, g)
    return (distortion * padded.mean(1, keepdim=True)).expand_as(padded).reshape(-1)[:d]


def _noisy_solve(stats: RidgeStats, noise: torch.Tensor, y_sq: torch.Tensor, cfg: CalibrationConfig
                 ) -> tuple[Predictor, torch.Tensor]:
    """Ridge solve with the inputs' expected noise ``noise [D_in]`` (per-channel variance) added to XᵀX's diagonal.

    Returns the predictor and the expected per-channel residual energy ``[D_out]`` per token on noisy inputs.
    """
    n = stats.count
    extra = torch.cat([noise.double() * n, torch.zeros(1, dtype=torch.float64)])
    noisy = RidgeStats(stats.xtx + torch.diag(extra), stats.xty, stats.yty, n)
    predictor = solve_predictor(noisy, cfg)
    w = torch.cat([predictor.weight, predictor.bias[None]], 0).double()
    energy = (y_sq - 2 * (w * noisy.xty).sum(0) + (w * (noisy.xtx @ w)).sum(0)) / n
    return predictor, energy.clamp_min(0.0)


def solve_parallel(stats: Iterable[ExactStats], cfg: CalibrationConfig,
                   preds: list[int | None]) -> list[LayerCodec]:
    """Layer-parallel codecs from exact-input statistics (one :class:`ExactStats` per layer, in order; ``preds``:
    each layer's predecessor, :func:`aquakv.family.predecessors`).

    Errors-in-variables: inference feeds the predictors reconstructions ``X̂ = X + E``. Taking ``E`` zero-mean,
    independent of X and Y, with diagonal covariance ``Σ``: ``E[X̂ᵀX̂] = XᵀX + n·Σ`` and ``E[X̂ᵀY] = XᵀY``, so each
    solve adds ``n·Σ`` to ``XᵀX`` (and ``λ`` follows from the noisy diagonal, as in the chain). ``Σ`` of a layer's
    output is :func:`_quantization_noise` of its residual energy, itself predicted from the statistics with that
    layer's own noisy inputs, so noise propagates down the layers. Only ``[D, D]`` algebra, sequential over layers;
    the data pass is parallel over layers and shards. (A forward-channel model with the quantizer's shrinkage,
    ``Q(R) = (1-D)·R + N``, is exact for Gaussian residuals but made the corrected XᵀX indefinite on near-degenerate
    real activations; this additive model stayed within a few percent of the chain.)
    """
    codecs: list[LayerCodec] = []
    noise: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: per-channel error variance of K̂_l, V̂_l
    distortions: dict[QuantizerConfig, float] = {}
    for layer, s in enumerate(stats):
        prev = preds[layer]
        keys_q, values_q = residual_quantizers(cfg, layer, prev is None)
        for q in (keys_q, values_q):
            if q.config not in distortions:
                distortions[q.config] = expected_distortion(q.grid)
        if prev is None:
            key_predictor = value_predictor = None
            key_energy, value_energy = s.keys_sq / s.count, s.values_sq / s.count
            noise_keys = _quantization_noise(key_energy, keys_q.config, distortions[keys_q.config])
        else:
            key_predictor, key_energy = _noisy_solve(s.keys, noise[prev][0], s.keys_sq, cfg)
            noise_keys = _quantization_noise(key_energy, keys_q.config, distortions[keys_q.config])
            value_predictor, value_energy = _noisy_solve(s.values, value_inputs(noise_keys, noise[prev][1]),
                                                         s.values_sq, cfg)
        noise.append((noise_keys, _quantization_noise(value_energy, values_q.config, distortions[values_q.config])))
        codecs.append(LayerCodec(keys_q, values_q, key_predictor, value_predictor))
    return codecs


def _per_layer(results: Iterable[ExactStats], shards_per_layer: int) -> Iterator[ExactStats]:
    """Sum consecutive runs of ``shards_per_layer`` shard results (layer-major order), streaming."""
    total, seen = None, 0
    for part in results:
        total, seen = _accumulate(total, part), seen + 1
        if seen == shards_per_layer:
            yield total
            total, seen = None, 0


def parallel_codecs(act_path: str, cfg: CalibrationConfig, shards: list[tuple[int, int]], map_fn: MapFn = map,
                    device: str = "cpu") -> list[LayerCodec]:
    """Parallel-mode codecs of every layer: one map over all (layer, shard) pairs, then :func:`solve_parallel`."""
    info = store_info(act_path)
    preds = info.predecessors
    tasks = [(layer, preds[layer], a, b) for layer in range(info.num_layers) for a, b in shards]
    results = map_fn(layer_stats_exact, *_repeat(len(tasks), str(act_path)), *map(list, zip(*tasks, strict=True)),
                     *_repeat(len(tasks), cfg.skipped_tokens, device))
    return solve_parallel(_per_layer(results, len(shards)), cfg, preds)


def layer_metrics(sums: dict[str, float], codec: LayerCodec, kv_dim: int, tokens: int) -> dict[str, float]:
    """:class:`LayerFit` metrics from the squared-error sums of :func:`reconstruct_shard` (summed over shards)."""
    return {
        "keys_rel_mse": sums["keys_err"] / max(sums["keys_norm"], 1e-30),
        "values_rel_mse": sums["values_err"] / max(sums["values_norm"], 1e-30),
        "keys_pred_rel_mse": sums["keys_pred_err"] / max(sums["keys_norm"], 1e-30),
        "values_pred_rel_mse": sums["values_pred_err"] / max(sums["values_norm"], 1e-30),
        "bits_per_value": bits_per_value([codec], kv_dim)["total"],
        "tokens": float(tokens),
        "keys_predictor_rank": float((codec.key_predictor.rank or 0) if codec.key_predictor else 0),
        "values_predictor_rank": float((codec.value_predictor.rank or 0) if codec.value_predictor else 0),
    }


# ---------------------------------------------------------------------------------------------------------------
# persistence and the driver


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_codec(stem: Path, codec: LayerCodec, info: dict[str, Any]) -> None:
    """Write ``stem.safetensors`` (tensors) then ``stem.json`` (configs, ``info``, tensor SHA-256), atomically."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = dict(info)
    for kind, residual, predictor in (("keys", codec.keys, codec.key_predictor),
                                      ("values", codec.values, codec.value_predictor)):
        tensors[f"{kind}.grid"] = residual.grid.detach().float().cpu().clone()
        tensors[f"{kind}.signs"] = residual.signs.detach().float().cpu().clone()
        if predictor is not None:
            tensors[f"{kind}.weight"] = predictor.weight.detach().float().cpu().clone()
            tensors[f"{kind}.bias"] = predictor.bias.detach().float().cpu().clone()
        meta[kind] = {"quantizer": residual.config.model_dump(), "predictor": predictor is not None,
                      "rank": None if predictor is None else predictor.rank}
    blob = save_safetensors(tensors)
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    stem.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(stem.with_name(stem.name + ".safetensors"), blob)
    _atomic_write(stem.with_name(stem.name + ".json"), json.dumps(meta, indent=2, sort_keys=True).encode())


def load_codec(stem: Path, digest: str) -> tuple[LayerCodec, dict[str, Any]] | None:
    """The codec and json info saved at ``stem`` if complete, intact and made with config ``digest``; else None."""
    try:
        meta = json.loads(stem.with_name(stem.name + ".json").read_bytes())
        blob = stem.with_name(stem.name + ".safetensors").read_bytes()
    except (OSError, ValueError):
        return None
    if meta.get("digest") != digest or meta.get("sha256") != hashlib.sha256(blob).hexdigest():
        return None
    tensors = load_safetensors(blob)
    parts = []
    for kind in KINDS:
        residual = Residual(QuantizerConfig(**meta[kind]["quantizer"]), tensors[f"{kind}.grid"],
                            tensors[f"{kind}.signs"])
        predictor = (Predictor(tensors[f"{kind}.weight"], tensors[f"{kind}.bias"], meta[kind].get("rank"))
                     if meta[kind]["predictor"] else None)
        parts.append((residual, predictor))
    return LayerCodec(parts[0][0], parts[1][0], parts[0][1], parts[1][1]), meta


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


def _solved_codecs(act_path: str, workdir: Path, cfg: CalibrationConfig, shards: list[tuple[int, int]],
                   map_fn: MapFn, device: str, num_layers: int) -> list[LayerCodec]:
    """Parallel mode: the saved solved codecs if all are there, else solve (and save) them."""
    stems = [workdir / FIT_DIR / f"solved-{layer}" for layer in range(num_layers)]
    loaded = [load_codec(stem, cfg.fit_digest()) for stem in stems]
    if all(x is not None for x in loaded):
        return [x[0] for x in loaded]
    codecs = parallel_codecs(act_path, cfg, shards, map_fn, device)
    for layer, (stem, codec) in enumerate(zip(stems, codecs, strict=True)):
        save_codec(stem, codec, {"digest": cfg.fit_digest(), "layer": layer})
    return codecs


def bit_allocation(act_path: str, workdir: Path, cfg: CalibrationConfig, shards: list[tuple[int, int]],
                   map_fn: MapFn = map, device: str = "cpu") -> Allocation:
    """``cfg.bit_budget`` spread over the layers (:mod:`pipeline.budget`), from one pass of exact-input statistics:
    each layer's residual energy after a noise-free predictor, relative to its data's. Saved in
    ``fit/budget.json`` (keyed by the fit digest) and reloaded on resume."""
    path = workdir / FIT_DIR / "budget.json"
    try:
        saved = json.loads(path.read_text())
        if saved["digest"] == cfg.fit_digest():
            return {(int(layer), kind): QuantizerConfig(**q) for layer, kind, q in saved["allocation"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    info = store_info(act_path)
    preds = info.predecessors
    tasks = [(layer, preds[layer], a, b) for layer in range(info.num_layers) for a, b in shards]
    results = map_fn(layer_stats_exact, *_repeat(len(tasks), act_path), *map(list, zip(*tasks, strict=True)),
                     *_repeat(len(tasks), cfg.skipped_tokens, device))
    items = []
    for layer, s in enumerate(_per_layer(results, len(shards))):
        if preds[layer] is None:
            continue
        for kind, stats, y_sq in (("keys", s.keys, s.keys_sq), ("values", s.values, s.values_sq)):
            _, energy = _noisy_solve(stats, torch.zeros(stats.xtx.shape[0] - 1, dtype=torch.float64), y_sq, cfg)
            items.append(budget.Item(layer, kind, float(energy.sum() / (y_sq.sum() / s.count).clamp_min(1e-30))))
    choices = {"keys": budget.options(cfg.keys), "values": budget.options(cfg.values)}
    distortion = {q: expected_distortion(gaussian_grid(q.dim, q.size)) for qs in choices.values() for q in qs}
    starts = sum(p is None for p in preds)
    try:
        allocation = budget.allocate(items, choices, distortion, cfg.bit_budget, 2 * starts *
                                     cfg.first_layer.bits_per_value, 2 * starts)
    except ValueError as e:
        raise CalibrationError(f"{e}; raise bit_budget") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps({"digest": cfg.fit_digest(), "allocation": [
        [layer, kind, q.model_dump()] for (layer, kind), q in sorted(allocation.items())]}, indent=1).encode())
    return allocation


def fit_all(act_path: str | os.PathLike, workdir: str | os.PathLike, cfg: CalibrationConfig, map_fn: MapFn = map,
            progress: bool = True, num_shards: int | None = None, device: str = "cpu",
            seconds: dict[str, float] | None = None) -> list[LayerFit]:
    """Fit every layer (``cfg.fit_mode``) from the activations store: :func:`pipeline.chain.fit_chain` over
    :class:`ZarrShard` s, resuming after the finished layers found under ``workdir``.

    ``map_fn(fn, *iterables)`` has builtin ``map`` semantics (results in order) and runs the shards' methods;
    ``num_shards`` defaults to ``cfg.workers``. A layer is finished once ``fit/{l}.json`` holds this config's
    digest and its reconstruction is in ``recon.zarr``; finished layers are loaded, never recomputed. Parallel mode
    solves every codec first (saved as ``fit/solved-{l}``), then the driver only reconstructs; a bit budget's
    allocation is made (or reloaded) before the first layer left to fit. ``seconds``: as
    :func:`~pipeline.chain.fit_chain`'s.
    """
    from pipeline.chain import fit_chain, shards_call

    act_path, workdir = str(act_path), Path(workdir)
    shards = zarr_shards(act_path, workdir / RECON_STORE, num_shards or cfg.workers, device)
    ranges = [(s.start, s.stop) for s in shards]
    num_layers = shards[0].info.num_layers
    allocation = None if cfg.bit_budget is None else partial(bit_allocation, act_path, workdir, cfg, ranges, map_fn,
                                                             device)
    codecs = (partial(_solved_codecs, act_path, workdir, cfg, ranges, map_fn, device, num_layers)
              if cfg.fit_mode == "parallel" else None)
    return fit_chain(shards_call(shards, map_fn), cfg, workdir, num_layers, progress, seconds,
                     f"fit ({cfg.fit_mode})", allocation, codecs)
