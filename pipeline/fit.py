"""The fit stage on collected activations: every layer's codec from ``activations.zarr``, saved under a workdir.

Chain mode runs :func:`pipeline.chain.fit_chain` over :class:`pipeline.staged.ZarrShard` s (a bit budget's
allocation first, when set); parallel mode solves every layer at once (:func:`pipeline.solve.solve_parallel`, its
exact-input statistics one ``map_fn`` over layers x shards), then the same driver only reconstructs. Layout of the
workdir: :mod:`pipeline.store`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from aquakv.codec import LayerCodec
from aquakv.config import CalibrationConfig, QuantizerConfig
from pipeline.budget import Sensitivity
from pipeline.chain import MapFn, fit_chain, shards_call
from pipeline.solve import Allocation, ExactStats, LayerFit, allocate_bits, solve_parallel
from pipeline.staged import layer_stats_exact, zarr_shards
from pipeline.stats import accumulate
from pipeline.store import FIT_DIR, RECON_STORE, atomic_write, load_codec, save_codec, store_info


def _repeat(n: int, *plain: Any) -> list[list[Any]]:
    """Argument columns for ``map_fn``: each plain value repeated once per task."""
    return [[v] * n for v in plain]


def _per_layer(results: Iterable[ExactStats], shards_per_layer: int) -> Iterator[ExactStats]:
    """Sum consecutive runs of ``shards_per_layer`` shard results (layer-major order), streaming."""
    total, seen = None, 0
    for part in results:
        total, seen = accumulate(total, part), seen + 1
        if seen == shards_per_layer:
            yield total
            total, seen = None, 0


def _exact_stats(act_path: str, cfg: CalibrationConfig, shards: list[tuple[int, int]], map_fn: MapFn,
                 device: str) -> tuple[list[int | None], Iterator[ExactStats]]:
    """Every layer's predecessor and its exact-input statistics (streamed, in layer order): one ``map_fn`` over all
    (layer, shard) pairs of :func:`pipeline.staged.layer_stats_exact`."""
    info = store_info(act_path)
    preds = info.predecessors
    tasks = [(layer, preds[layer], a, b) for layer in range(info.num_layers) for a, b in shards]
    results = map_fn(layer_stats_exact, *_repeat(len(tasks), act_path), *map(list, zip(*tasks, strict=True)),
                     *_repeat(len(tasks), cfg.skipped_tokens, device))
    return preds, _per_layer(results, len(shards))


def _solved_codecs(act_path: str, workdir: Path, cfg: CalibrationConfig, shards: list[tuple[int, int]],
                   map_fn: MapFn, device: str, num_layers: int) -> list[LayerCodec]:
    """Parallel mode: the saved solved codecs if all are there, else solve (and save) them."""
    stems = [workdir / FIT_DIR / f"solved-{layer}" for layer in range(num_layers)]
    loaded = [load_codec(stem, cfg.fit_digest()) for stem in stems]
    if all(x is not None for x in loaded):
        return [x[0] for x in loaded]
    preds, stats = _exact_stats(act_path, cfg, shards, map_fn, device)
    codecs = solve_parallel(stats, cfg, preds)
    for layer, (stem, codec) in enumerate(zip(stems, codecs, strict=True)):
        save_codec(stem, codec, {"digest": cfg.fit_digest(), "layer": layer})
    return codecs


def bit_allocation(act_path: str, workdir: Path, cfg: CalibrationConfig, shards: list[tuple[int, int]],
                   sensitivity: Callable[[], Sensitivity], map_fn: MapFn = map, device: str = "cpu") -> Allocation:
    """``cfg.bit_budget`` spread over the layers (:func:`pipeline.solve.allocate_bits`) from one pass of exact-input
    statistics and ``sensitivity()`` (called only when no allocation is saved). Saved in ``fit/budget.json`` (keyed
    by the fit digest, with the sensitivity it used) and reloaded on resume."""
    path = workdir / FIT_DIR / "budget.json"
    try:
        saved = json.loads(path.read_text())
        if saved["digest"] == cfg.fit_digest():
            return {(int(layer), kind): QuantizerConfig(**q) for layer, kind, q in saved["allocation"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    preds, stats = _exact_stats(act_path, cfg, shards, map_fn, device)
    weights = sensitivity()
    allocation = allocate_bits(stats, preds, cfg, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"digest": cfg.fit_digest(), "sensitivity": weights, "allocation": [
        [layer, kind, q.model_dump()] for (layer, kind), q in sorted(allocation.items())]}, indent=1).encode())
    return allocation


def fit_all(act_path: str | os.PathLike, workdir: str | os.PathLike, cfg: CalibrationConfig, map_fn: MapFn = map,
            progress: bool = True, num_shards: int | None = None, device: str = "cpu",
            seconds: dict[str, float] | None = None,
            sensitivity: Callable[[], Sensitivity] | None = None) -> list[LayerFit]:
    """Fit every layer (``cfg.fit_mode``) from the activations store: :func:`pipeline.chain.fit_chain` over
    :class:`ZarrShard` s, resuming after the finished layers found under ``workdir``.

    ``map_fn(fn, *iterables)`` has builtin ``map`` semantics (results in order) and runs the shards' methods;
    ``num_shards`` defaults to ``cfg.workers``. A layer is finished once ``fit/{l}.json`` holds this config's
    digest and its reconstruction is in ``recon.zarr``; finished layers are loaded, never recomputed. Parallel mode
    solves every codec first (saved as ``fit/solved-{l}``), then the driver only reconstructs; a bit budget's
    allocation is made (or reloaded) before the first layer left to fit, weighted by ``sensitivity()``
    (:func:`pipeline.sensitivity.fisher` on the model; required with ``cfg.bit_budget``). ``seconds``: as
    :func:`~pipeline.chain.fit_chain`'s.
    """
    act_path, workdir = str(act_path), Path(workdir)
    shards = zarr_shards(act_path, workdir / RECON_STORE, num_shards or cfg.workers, device)
    ranges = [(s.start, s.stop) for s in shards]
    num_layers = shards[0].info.num_layers
    if cfg.bit_budget is not None and sensitivity is None:
        raise ValueError("a bit budget needs the model's sensitivity (pipeline.sensitivity)")
    allocation = None if cfg.bit_budget is None else partial(bit_allocation, act_path, workdir, cfg, ranges,
                                                             sensitivity, map_fn, device)
    codecs = (partial(_solved_codecs, act_path, workdir, cfg, ranges, map_fn, device, num_layers)
              if cfg.fit_mode == "parallel" else None)
    return fit_chain(shards_call(shards, map_fn), cfg, workdir, num_layers, progress, seconds,
                     f"fit ({cfg.fit_mode})", allocation, codecs)
