"""The chain fit's math, from statistics to codecs: no stores, no workers, only ``[D, D]`` algebra on the driver.

Chain mode (the paper): layer by layer, predictors are fitted on the reconstructions inference will have,
``K_l ≈ P^K_l(K̂_p)`` and ``V_l ≈ P^V_l([K̂_l, V̂_p])`` where ``p`` is the layer's predecessor (``l - 1``, or the
previous layer of the same attention type in models with sliding-window layers, see
:func:`aquakv.family.predecessors`; none: no predictors): :func:`solve_layer`, its statistics gathered over the
shards by :func:`pipeline.chain.fit_chain`.

Parallel mode: every layer is fitted from exact inputs at once, the expected quantization noise of the inputs
entering the ridge term (errors-in-variables, :func:`solve_parallel`); a final pass quantizes in chain order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from aquakv.bundle import bits_per_value
from aquakv.codec import LayerCodec, Residual, gaussian_residual
from aquakv.config import CalibrationConfig, QuantizerConfig
from aquakv.errors import CalibrationError
from aquakv.grids import expected_distortion, fit_grid, gaussian_grid
from aquakv.predictors import Predictor, RidgeStats, fit_ridge
from pipeline import budget

KINDS = ("keys", "values")
SIGN_SEED = 0xA0A0
GRID_VECTORS = 1 << 16  # vectors a fitted grid sees (at least; 512 per grid point for large grids)


Allocation = dict[tuple[int, str], QuantizerConfig]  # (layer, "keys" | "values") -> quantizer of a bit budget


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


def solve_predictor(stats: RidgeStats, cfg: CalibrationConfig, kind: Literal["keys", "values"]) -> Predictor:
    """``kind``'s ridge solve with the run's damping and rank policy (fixed rank, rank budget or full rank), on this
    process's GPU when it has one: the float64 solve of a ``[2D+1]²`` system took ~0.3 s per layer on a 16-core CPU
    at D = 1024 (and ~4 s to load LAPACK on first use; H100 machine, 2026-11-26), milliseconds on the GPU. A flow
    driver without a GPU (a cluster's head node) solves on its CPU; the two differ in float64 ulps. Returns CPU
    tensors."""
    if torch.cuda.is_available():
        stats = RidgeStats(stats.xtx.cuda(), stats.xty.cuda(), stats.yty, stats.count)
    p = fit_ridge(stats, cfg.damping, cfg.rank_of(kind), cfg.predictor_rank_budget)
    return Predictor(p.weight.cpu(), p.bias.cpu(), p.rank)


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
        key_predictor = solve_predictor(key_stats(), cfg, "keys")
    if cfg.grids == "fitted":
        vectors = max(GRID_VECTORS, 512 * keys_q.config.size)
        keys_q = _fitted(keys_q, grid_samples(LayerCodec(keys_q, values_q, key_predictor, None), "keys", vectors))
    if prev is not None:
        value_predictor = solve_predictor(value_stats(LayerCodec(keys_q, values_q, key_predictor, None)), cfg,
                                          "values")
    if cfg.grids == "fitted":
        vectors = max(GRID_VECTORS, 512 * values_q.config.size)
        partial = LayerCodec(keys_q, values_q, key_predictor, value_predictor)
        values_q = _fitted(values_q, grid_samples(partial, "values", vectors))
    return LayerCodec(keys_q, values_q, key_predictor, value_predictor)


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


def _quantization_noise(energy: torch.Tensor, config: QuantizerConfig, distortion: float) -> torch.Tensor:
    """Per-channel variance ``[D]`` of the HIGGS error of a residual with per-channel energy ``energy [D]``.

    Each Hadamard group (zero-padded to ``g`` channels) is scaled by its norm and its rotated coordinates are near
    standard normal, so the group's error energy is ``distortion · ‖r_group‖²``, spread evenly over its ``g``
    channels by the (orthonormal) inverse rotation: ``σ²_c = distortion · mean(energy over c's group)``.
    """
    g, d = config.group_size, energy.shape[0]
    padded = torch.nn.functional.pad(energy, (0, (-d) % g)).view(-1, g)
    return (distortion * padded.mean(1, keepdim=True)).expand_as(padded).reshape(-1)[:d]


def _noisy_solve(stats: RidgeStats, noise: torch.Tensor, y_sq: torch.Tensor, cfg: CalibrationConfig,
                 kind: Literal["keys", "values"]) -> tuple[Predictor, torch.Tensor]:
    """Ridge solve with the inputs' expected noise ``noise [D_in]`` (per-channel variance) added to XᵀX's diagonal.

    Returns the predictor and the expected per-channel residual energy ``[D_out]`` per token on noisy inputs.
    """
    n = stats.count
    extra = torch.cat([noise.double() * n, torch.zeros(1, dtype=torch.float64)])
    noisy = RidgeStats(stats.xtx + torch.diag(extra), stats.xty, stats.yty, n)
    predictor = solve_predictor(noisy, cfg, kind)
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
            key_predictor, key_energy = _noisy_solve(s.keys, noise[prev][0], s.keys_sq, cfg, "keys")
            noise_keys = _quantization_noise(key_energy, keys_q.config, distortions[keys_q.config])
            value_noise = LayerCodec.value_inputs(noise_keys, noise[prev][1])
            value_predictor, value_energy = _noisy_solve(s.values, value_noise, s.values_sq, cfg, "values")
        noise.append((noise_keys, _quantization_noise(value_energy, values_q.config, distortions[values_q.config])))
        codecs.append(LayerCodec(keys_q, values_q, key_predictor, value_predictor))
    return codecs


def allocate_bits(stats: Iterable[ExactStats], preds: list[int | None], cfg: CalibrationConfig,
                  sensitivity: budget.Sensitivity) -> Allocation:
    """``cfg.bit_budget`` spread over the layers (:mod:`pipeline.budget`) from exact-input statistics (one
    :class:`ExactStats` per layer, in order) and the loss's sensitivity to each layer's keys and values
    (:func:`pipeline.sensitivity.fisher`): each item's weight is its residual energy per token after a noise-free
    predictor times its mean squared gradient. :class:`CalibrationError` when the budget is below the cheapest
    choice."""
    items = []
    for layer, s in enumerate(stats):
        if preds[layer] is None:
            continue
        for kind, xy, y_sq in (("keys", s.keys, s.keys_sq), ("values", s.values, s.values_sq)):
            _, energy = _noisy_solve(xy, torch.zeros(xy.xtx.shape[0] - 1, dtype=torch.float64), y_sq, cfg, kind)
            items.append(budget.Item(layer, kind, float(energy.sum()) * sensitivity[kind][layer]))
    choices = {"keys": budget.options(cfg.keys), "values": budget.options(cfg.values)}
    distortion = {q: expected_distortion(gaussian_grid(q.dim, q.size)) for qs in choices.values() for q in qs}
    starts = sum(p is None for p in preds)
    try:
        return budget.allocate(items, choices, distortion, cfg.bit_budget, 2 * starts * cfg.first_layer.bits_per_value,
                               2 * starts)
    except ValueError as e:
        raise CalibrationError(f"{e}; raise bit_budget") from None
