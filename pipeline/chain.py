"""The chain fit's shard protocol: what the driver asks of each shard of calibration samples, wherever its data live.

A shard holds samples ``[start, stop)``: their keys and values ``K_l, V_l [n*T, D]`` of the current layer and the
reconstructions ``K̂_p, V̂_p`` of its predecessors (``p = l - 1``, or the previous layer of the same attention type,
:func:`aquakv.family.predecessors`). Two implementations: :class:`pipeline.staged.ZarrShard` (activations and
reconstructions in Zarr stores, stateless: a Ray task runs its methods) and :class:`pipeline.resident.ResidentShard`
(hidden states and K/V on a worker's device, a Ray actor). Per layer the driver calls, on every shard::

    forward(l) -> key_stats(l) -> [solve P^K_l] -> value_stats(l, codec) -> [solve P^V_l] -> reconstruct(l, codec)

(``grid_samples`` between them with fitted grids). Only statistics, sums and grid samples (small, CPU) come back.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict

import torch
from tqdm.auto import tqdm

from aquakv.codec import LayerCodec
from aquakv.config import CalibrationConfig
from aquakv.errors import CalibrationError
from aquakv.family import predecessors
from aquakv.predictors import RidgeStats
from pipeline.solve import Allocation, LayerFit, layer_metrics, solve_layer
from pipeline.stats import pairwise_sum
from pipeline.store import FIT_DIR, load_fits, save_codec

ShardsCall = Callable[..., list[Any]]  # shards_call(method, *args): method(*args) on every shard, in shard order
MapFn = Callable[..., Iterable[Any]]  # builtin map semantics (results in order)
STATE_DIR = "resident-state"  # under the fit's work directory: the shards' latest saved state
log = logging.getLogger(__name__)


def shard_ranges(num_samples: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ``[0, num_samples)`` into at most ``num_shards`` contiguous, non-empty, near-equal ``(start, stop)``."""
    if num_samples < 1 or num_shards < 1:
        raise ValueError(f"need num_samples >= 1 and num_shards >= 1, got {num_samples}, {num_shards}")
    n = min(num_shards, num_samples)
    bounds = [num_samples * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


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
        tokens), summed per sample in :class:`pipeline.stats.PairwiseSum`'s tree."""
        ...

    def value_stats(self, layer: int, codec: LayerCodec, skip: int = 0) -> RidgeStats:
        """Value predictor statistics: X = [K̂_l, V̂_p] ``[N, 2D]`` (K̂_l encoded with ``codec``'s key part),
        Y = V_l ``[N, D]``."""
        ...

    def grid_samples(self, layer: int, codec: LayerCodec, kind: str, skip: int, vectors: int) -> torch.Tensor:
        """About ``vectors`` weighted vectors ``[m, d + 1]`` the ``kind`` grid will quantize
        (:func:`pipeline.stats.residual_units`)."""
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
    task, for shards that carry no state (:class:`pipeline.staged.ZarrShard`)."""
    cls = type(shards[0])

    def call(method: str, *args: Any) -> list[Any]:
        return list(map_fn(getattr(cls, method), shards, *([a] * len(shards) for a in args)))

    return call



def timed_calls(shards_call: ShardsCall, seconds: dict[str, float]) -> ShardsCall:
    """``shards_call`` that adds each method's wall seconds (the slowest shard's, as the driver waits) to
    ``seconds[method]``."""
    def call(method: str, *args: Any) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return shards_call(method, *args)
        finally:
            seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - t0

    return call


def _save_states(shards_call: ShardsCall, states: Path, cfg: CalibrationConfig, layer: int,
                 shards: list[tuple[int, int]]) -> None:
    """Every shard saves its state after ``layer``; ``state.json`` names the layer once all have."""
    states.mkdir(parents=True, exist_ok=True)
    (states / "state.json").unlink(missing_ok=True)  # the files are replaced one by one: invalid until all are
    shards_call("save_state", layer, str(states))
    info = {"layer": layer, "digest": cfg.fit_digest(), "shards": [list(s) for s in shards]}
    tmp = states / "state.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(states / "state.json")


def saved_layer(states: Path, cfg: CalibrationConfig, shards: list[tuple[int, int]]) -> int | None:
    """The layer after which every shard saved its state (``state.json``), when it is this fit's, for these shards;
    else None."""
    try:
        info = json.loads((states / "state.json").read_text())
    except (OSError, ValueError):
        return None
    layer = info.get("layer") if isinstance(info, dict) else None
    if (not isinstance(layer, int) or layer < 0 or info.get("digest") != cfg.fit_digest()
            or info.get("shards") != [list(s) for s in shards]):
        return None
    return layer


def _solve(shards_call: ShardsCall, cfg: CalibrationConfig, layer: int, prev: int | None, num_shards: int,
           allocation: Allocation | None) -> LayerCodec:
    """:func:`pipeline.solve.solve_layer` on statistics and grid samples gathered over every shard."""
    skip = cfg.skipped_tokens
    return solve_layer(
        cfg, layer, prev,
        lambda: pairwise_sum(shards_call("key_stats", layer, skip)),
        lambda partial: pairwise_sum(shards_call("value_stats", layer, partial, skip)),
        lambda partial, kind, vectors: torch.cat(
            shards_call("grid_samples", layer, partial, kind, skip, -(-vectors // num_shards))),
        allocation)


def fit_chain(shards_call: ShardsCall, cfg: CalibrationConfig, workdir: str | Path, num_layers: int,
              progress: bool = True, seconds: dict[str, float] | None = None, label: str = "fit (chain)",
              allocation: Callable[[], Allocation] | None = None,
              codecs: Callable[[], list[LayerCodec]] | None = None) -> list[LayerFit]:
    """Fit every layer in chain order over shards; saves ``workdir/fit/{l}`` (:func:`pipeline.store.save_codec`).

    ``shards_call(method, *args)`` calls a :class:`ChainShard` method on every shard and returns the results in
    shard order (:func:`shards_call`, or :func:`cluster.workers.ray_shards_call` for Ray actors). Returns the saved
    fits if every layer is there for ``cfg.fit_digest()``; else it goes on at the shards' :meth:`~ChainShard.
    resume_point` (every ``cfg.resident_checkpoint_every`` layers the shards save their state and ``state.json``
    names the layer). ``allocation`` (a bit budget's quantizers) and ``codecs`` (given codecs: only reconstruct,
    the parallel fit) are called once, when a layer is left to fit. ``seconds`` (optional) receives where the time
    went: each shard method's wall time, ``solve`` (the driver's predictor and grid fits), ``layers`` (the whole
    layer loop, without the first ``shape`` call that waits for the workers to start), ``first_layer`` (the first
    layer run, layer 0 unless resumed: its weights are not prefetched and the workers' kernels compile there) and
    ``median_layer`` (the median of the layers after it: the steady cost of a layer; the next one also pays the
    driver's first solve), ``median_solve`` (the same median of the driver's solve alone: it depends on the model's
    dimensions, not on the token count). ``label`` names the progress bar.
    """
    workdir = Path(workdir)
    fits = load_fits(workdir, cfg, num_layers)
    if len(fits) == num_layers:
        return fits
    seconds = {} if seconds is None else seconds
    shapes: list[ShardShape] = shards_call("shape")
    kv_dim, tokens = shapes[0]["kv_dim"], sum(s["tokens"] for s in shapes)
    if any(s["num_layers"] != num_layers for s in shapes):
        raise CalibrationError(f"the shards' model has {shapes[0]['num_layers']} layers, expected {num_layers}")
    states, shards = workdir / STATE_DIR, [(s["start"], s["stop"]) for s in shapes]
    first = min(shards_call("resume_point", len(fits), saved_layer(states, cfg, shards)))
    if first:
        shards_call("restore_state", first - 1, str(states))
        log.info("%s: resuming after layer %d", label, first - 1)
    fits = fits[:first]
    given = None if codecs is None else codecs()
    budget = None if allocation is None else allocation()
    preds = predecessors(shapes[0]["windows"])
    bar = tqdm(range(first, num_layers), desc=label, disable=not progress, initial=first, total=num_layers)
    start, shards_call = time.perf_counter(), timed_calls(shards_call, seconds)
    ends, solves = [start], []
    for layer in bar:
        shards_call("forward", layer)
        if given is None:
            t0, before = time.perf_counter(), sum(seconds.values())
            codec = _solve(shards_call, cfg, layer, preds[layer], len(shapes), budget)
            solves.append(time.perf_counter() - t0 - (sum(seconds.values()) - before))
            seconds["solve"] = seconds.get("solve", 0.0) + solves[-1]
        else:
            codec = given[layer]
        sums: dict[str, float] = {}
        for part in shards_call("reconstruct", layer, codec):
            sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
        fit = LayerFit(layer, codec, layer_metrics(sums, codec, kv_dim, tokens))
        save_codec(workdir / FIT_DIR / str(layer), codec,
                   {"digest": cfg.fit_digest(), "layer": layer, "metrics": fit.metrics})
        bar.set_postfix(k=f"{fit.metrics['keys_rel_mse']:.3g}", v=f"{fit.metrics['values_rel_mse']:.3g}")
        fits.append(fit)
        every = cfg.resident_checkpoint_every
        if every and (layer + 1) % every == 0 and layer + 1 < num_layers:
            _save_states(shards_call, states, cfg, layer, shards)
        ends.append(time.perf_counter())
    shards_call("finish")
    shutil.rmtree(states, ignore_errors=True)  # finished: the fits are saved, the shards' state is not needed
    seconds["layers"] = time.perf_counter() - start
    per_layer = sorted(b - a for a, b in zip(ends[1:-1], ends[2:], strict=True))  # the layers after the first
    seconds["first_layer"] = ends[1] - start
    if per_layer:
        seconds["median_layer"] = per_layer[len(per_layer) // 2]
    if len(solves) > 1:
        seconds["median_solve"] = sorted(solves[1:])[(len(solves) - 1) // 2]
    return fits
