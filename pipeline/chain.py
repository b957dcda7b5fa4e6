"""The chain fit's shard protocol: what the driver asks of each shard of calibration samples, wherever its data live.

A shard holds samples ``[start, stop)``: their keys and values ``K_l, V_l [n*T, D]`` of the current layer and the
reconstructions ``K̂_p, V̂_p`` of its predecessors (``p = l - 1``, or the previous layer of the same attention type,
:func:`aquakv.family.predecessors`). Two implementations: :class:`pipeline.fit.ZarrShard` (activations and
reconstructions in Zarr stores, stateless: a Ray task runs its methods) and :class:`pipeline.resident.ResidentShard`
(hidden states and K/V on a worker's device, a Ray actor). Per layer the driver calls, on every shard::

    forward(l) -> key_stats(l) -> [solve P^K_l] -> value_stats(l, codec) -> [solve P^V_l] -> reconstruct(l, codec)

(``grid_samples`` between them with fitted grids). Only statistics, sums and grid samples (small, CPU) come back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypedDict

import torch

from aquakv.codec import LayerCodec
from aquakv.predictors import RidgeStats

ShardsCall = Callable[..., list[Any]]  # shards_call(method, *args): method(*args) on every shard, in shard order
MapFn = Callable[..., Iterable[Any]]  # builtin map semantics (results in order)


class ShardShape(TypedDict):
    """A shard's sizes: ``tokens = samples * seq_len``; ``windows`` per layer (None: global attention)."""

    samples: int
    tokens: int
    seq_len: int
    kv_dim: int
    num_layers: int
    windows: list[int | None]
    start: int
    stop: int


class ChainShard(Protocol):
    """One shard of samples in the chain fit. Per layer, calls come in chain order: :meth:`forward`, then
    :meth:`key_stats` / :meth:`value_stats` (layers with a predecessor) and :meth:`grid_samples` (fitted grids),
    then :meth:`reconstruct`, which makes K̂_l, V̂_l the inputs of the layer's successors."""

    def shape(self) -> ShardShape:
        """The shard's sizes."""
        ...

    def forward(self, layer: int) -> None:
        """Make ``K_l, V_l`` of ``layer`` available (run the layer, or check it was collected)."""
        ...

    def key_stats(self, layer: int, skip: int = 0) -> RidgeStats:
        """Key predictor statistics: X = K̂_p ``[N, D]``, Y = K_l ``[N, D]`` (without each sample's first ``skip``
        tokens), summed per sample in :class:`pipeline.fit.PairwiseSum`'s tree."""
        ...

    def value_stats(self, layer: int, codec: LayerCodec, skip: int = 0) -> RidgeStats:
        """Value predictor statistics: X = [K̂_l, V̂_p] ``[N, 2D]`` (K̂_l encoded with ``codec``'s key part),
        Y = V_l ``[N, D]``."""
        ...

    def grid_samples(self, layer: int, codec: LayerCodec, kind: str, skip: int, vectors: int) -> torch.Tensor:
        """About ``vectors`` weighted vectors ``[m, d + 1]`` the ``kind`` grid will quantize
        (:func:`pipeline.fit.residual_units`)."""
        ...

    def reconstruct(self, layer: int, codec: LayerCodec) -> dict[str, float]:
        """Encode ``K_l, V_l`` with ``codec``, keep K̂_l, V̂_l for the successors; return squared-error sums
        ``{keys,values}_{err,pred_err,norm}``."""
        ...

    def resume_point(self, finished: int, saved: int | None) -> int:
        """The first layer this shard can go on at, given ``finished`` leading layers with saved codecs and
        ``saved``, the last layer after which every shard saved its state (None: none)."""
        ...

    def save_state(self, layer: int, directory: str) -> None:
        """Save under ``directory`` what this shard needs to go on after ``layer`` (reconstructed)."""
        ...

    def restore_state(self, layer: int, directory: str) -> None:
        """Go on after ``layer`` from :meth:`save_state`'s files."""
        ...

    def finish(self) -> None:
        """Wait for background work (re-raising its errors)."""
        ...


def shards_call(shards: Sequence[ChainShard], map_fn: MapFn = map) -> ShardsCall:
    """``shards_call(method, *args)`` over ``shards`` (all of one class): one ``map_fn`` call of the method per shard,
    the same arguments for each. Builtin ``map`` runs them here; :func:`cluster.workers.ray_map` runs each as a Ray
    task, for shards that carry no state (:class:`pipeline.fit.ZarrShard`)."""
    cls = type(shards[0])

    def call(method: str, *args: Any) -> list[Any]:
        return list(map_fn(getattr(cls, method), shards, *([a] * len(shards) for a in args)))

    return call

