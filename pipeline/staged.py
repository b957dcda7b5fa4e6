"""Zarr-backed chain shards: the collected activations on disk, the chain's reconstructions in ``recon.zarr``.

The per-shard work is top-level functions of plain arguments (paths, a sample range ``[start, stop)``), so a Ray
task can run them; :class:`ZarrShard` puts them behind :class:`pipeline.chain.ChainShard` for
:func:`pipeline.chain.fit_chain`. Re-fitting with other quantizer settings needs no new collect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import zarr

from aquakv.codec import LayerCodec
from aquakv.errors import CalibrationError, NonFiniteError
from aquakv.predictors import RidgeStats
from pipeline.chain import ShardShape, shard_ranges
from pipeline.collect import layer_complete
from pipeline.solve import KINDS, ExactStats
from pipeline.stats import (
    SUMS,
    PairwiseSum,
    accumulate,
    add_samples,
    add_value_samples,
    encode_with_errors,
    grid_stride,
    keep_rows,
    kept_rows,
    residual_units,
    row_batches,
    sample_stats,
    to_cpu,
)
from pipeline.store import StoreInfo, has_recon, open_recon, read_rows, require_recon, store_info


def layer_stats_keys(act_path: str, recon_path: str, layer: int, prev: int, start: int, stop: int, skip: int = 0,
                     device: str = "cpu") -> RidgeStats:
    """Key predictor statistics of samples ``[start, stop)``: X = K̂_prev ``[N, D]`` (recon), Y = K_l ``[N, D]``
    (without each sample's first ``skip`` tokens)."""
    act, rec = zarr.open_group(act_path, mode="r"), zarr.open_group(recon_path, mode="r")
    seq_len = act[f"keys/{layer}"].shape[1]
    total = PairwiseSum()
    for a, b in row_batches(start, stop, seq_len):
        x, y = keep_rows(kept_rows(b - a, seq_len, skip, device), read_rows(rec, "keys", prev, a, b, device),
                     read_rows(act, "keys", layer, a, b, device))
        add_samples(total, x, y, b - a, layer, "keys", a)
    return to_cpu(total.total())


def layer_stats_values(act_path: str, recon_path: str, layer: int, prev: int, start: int, stop: int,
                       codec: LayerCodec, skip: int = 0, device: str = "cpu") -> RidgeStats:
    """Value predictor statistics of samples ``[start, stop)``: X = [K̂_l, V̂_prev] ``[N, 2D]``, Y = V_l ``[N, D]``
    (:func:`pipeline.stats.add_value_samples`, K̂_l from ``codec``'s key part)."""
    act, rec = zarr.open_group(act_path, mode="r"), zarr.open_group(recon_path, mode="r")
    key_only = codec.key_part().to(device)
    seq_len = act[f"keys/{layer}"].shape[1]
    total = PairwiseSum()
    for a, b in row_batches(start, stop, seq_len):
        rows = [read_rows(g, kind, i, a, b, device) for g, i in ((act, layer), (rec, prev)) for kind in KINDS]
        keys, values, *prev_kv = keep_rows(kept_rows(b - a, seq_len, skip, device), *rows)
        add_value_samples(total, keys, values, prev_kv, key_only, b - a, layer, a)
    return to_cpu(total.total())


def layer_stats_exact(act_path: str, layer: int, prev: int | None, start: int, stop: int, skip: int = 0,
                      device: str = "cpu") -> ExactStats:
    """Parallel-mode statistics of samples ``[start, stop)`` from exact inputs (see :class:`ExactStats`)."""
    act = zarr.open_group(act_path, mode="r")
    seq_len = act[f"keys/{layer}"].shape[1]
    total = None
    for a, b in row_batches(start, stop, seq_len):
        mask = kept_rows(b - a, seq_len, skip, device)
        keys, values = keep_rows(mask, read_rows(act, "keys", layer, a, b, device),
                                 read_rows(act, "values", layer, a, b, device))
        if prev is None:
            for kind, y in (("keys", keys), ("values", values)):
                if not torch.isfinite(y).all():
                    raise NonFiniteError(f"layer {layer} {kind}, samples [{a}, {b}): NaN or Inf in the activations")
            key_stats = value_stats = None
        else:
            prev_keys, prev_values = keep_rows(mask, read_rows(act, "keys", prev, a, b, device),
                                           read_rows(act, "values", prev, a, b, device))
            key_stats = to_cpu(sample_stats(prev_keys, keys, layer, "keys", (a, b)))
            value_stats = to_cpu(sample_stats(LayerCodec.value_inputs(keys, prev_values), values, layer, "values",
                                              (a, b)))
        keys_sq, values_sq = (keys.double() ** 2).sum(0).cpu(), (values.double() ** 2).sum(0).cpu()
        part = ExactStats(key_stats, value_stats, keys_sq, values_sq, keys.shape[0])
        total = accumulate(total, part)
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
    for a, b in row_batches(start, stop, seq_len):
        rows = [read_rows(act, "keys", layer, a, b, device), read_rows(act, "values", layer, a, b, device)]
        if prev is not None:
            rows += [read_rows(rec, "keys", prev, a, b, device), read_rows(rec, "values", prev, a, b, device)]
        keys, values, *prev_kv = keep_rows(kept_rows(b - a, seq_len, skip, device), *rows)
        parts.append(residual_units(keys, values, tuple(prev_kv) or None, codec, kind, stride, seed=a))
    return torch.cat(parts)


def reconstruct_shard(act_path: str, recon_path: str, layer: int, prev: int | None, start: int, stop: int,
                      codec: LayerCodec, device: str = "cpu") -> dict[str, float]:
    """Encode samples ``[start, stop)`` of ``layer`` with :func:`aquakv.codec.encode`, write K̂_l, V̂_l rows to the
    recon store (whole chunks only), and return squared-error sums: ``{keys,values}_{err,pred_err,norm}``."""
    act, rec = zarr.open_group(act_path, mode="r"), zarr.open_group(recon_path, mode="r+")
    codec = codec.to(device)
    seq_len, dim = act[f"keys/{layer}"].shape[1:]
    sums = dict.fromkeys(SUMS, 0.0)
    for a, b in row_batches(start, stop, seq_len):
        prev_kv = None if prev is None else (read_rows(rec, "keys", prev, a, b, device),
                                             read_rows(rec, "values", prev, a, b, device))
        keys, values = read_rows(act, "keys", layer, a, b, device), read_rows(act, "values", layer, a, b, device)
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
        require_recon(self.recon_path, layer, self.info)

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
        return next((layer for layer in range(finished) if not has_recon(Path(self.recon_path), layer)), finished)

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
    open_recon(recon_path, info)
    return [ZarrShard(str(act_path), str(recon_path), a, b, info, device)
            for a, b in shard_ranges(info.num_samples, num_shards)]
