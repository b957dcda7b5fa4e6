"""Row-batch statistics of a chain shard, the same for Zarr-backed and resident shards (pure torch, no I/O).

Both shard kinds walk their samples in the same row batches (:func:`row_batches`) and add ridge statistics one
sample at a time to a :class:`PairwiseSum`, so equal shards give equal bits wherever the data live, and aligned
power-of-two shards give the bits of one pass. Rows are tokens ``[N, D]`` (samples x seq_len, flattened).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from aquakv.codec import LayerCodec, encode
from aquakv.config import QuantizerConfig
from aquakv.errors import CalibrationError, NonFiniteError
from aquakv.predictors import RidgeStats, ridge_stats
from aquakv.quantize import unit_vectors
from pipeline.solve import KINDS

ROWS_PER_READ = 1 << 16  # tokens read at once within a shard (bounds memory, keeps whole-sample reads)
SUMS = tuple(f"{kind}_{what}" for kind in KINDS for what in ("err", "pred_err", "norm"))  # reconstruct's sums


def row_batches(start: int, stop: int, seq_len: int) -> Iterator[tuple[int, int]]:
    """Samples ``[start, stop)`` in runs of whole samples of about :data:`ROWS_PER_READ` tokens."""
    step = max(1, ROWS_PER_READ // seq_len)
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


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


def pairwise_sum(parts: Iterable[Any]) -> Any:
    """Sum of shard results (anything with ``+``) in :class:`PairwiseSum`'s tree, consumed as they arrive."""
    total = PairwiseSum()
    for part in parts:
        total.add(part)
    return total.total()


def accumulate(total: Any, part: Any) -> Any:
    return part if total is None else total + part


def to_cpu(stats: RidgeStats) -> RidgeStats:
    return RidgeStats(stats.xtx.cpu(), stats.xty.cpu(), stats.yty, stats.count)


def sample_stats(x: torch.Tensor, y: torch.Tensor, layer: int, kind: str, rows: tuple[int, int]) -> RidgeStats:
    try:
        return ridge_stats(x, y)
    except NonFiniteError as e:
        raise NonFiniteError(f"layer {layer} {kind}, samples [{rows[0]}, {rows[1]}): {e}") from e


def add_samples(total: PairwiseSum, x: torch.Tensor, y: torch.Tensor, samples: int, layer: int, kind: str,
                 start: int) -> None:
    """Ridge statistics of each sample's rows of ``x, y`` (``samples`` equal runs of rows, from sample ``start``)
    added to ``total`` one sample at a time: the tree is over samples, whatever the row batches or shards."""
    per = x.shape[0] // samples
    for i in range(samples):
        rows = slice(i * per, (i + 1) * per)
        total.add(sample_stats(x[rows], y[rows], layer, kind, (start + i, start + i + 1)))


def add_value_samples(total: PairwiseSum, keys: torch.Tensor, values: torch.Tensor,
                      prev: tuple[torch.Tensor, torch.Tensor], key_codec: LayerCodec, samples: int, layer: int,
                      start: int) -> None:
    """Value predictor statistics of one row batch ``[N, D]`` added per sample: K̂_l encoded with ``key_codec`` (its
    key part, :meth:`LayerCodec.key_part`, exactly as the reconstruction will make it), X = [K̂_l, V̂_p] ``[N, 2D]``
    (:meth:`LayerCodec.value_inputs`), Y = V_l."""
    try:
        _, (keys_hat, _) = encode(keys, values, prev, key_codec)
    except NonFiniteError as e:
        raise NonFiniteError(f"layer {layer} keys, samples [{start}, {start + samples}): {e}") from e
    add_samples(total, LayerCodec.value_inputs(keys_hat, prev[1]), values, samples, layer, "values", start)


def kept_rows(samples: int, seq_len: int, skip: int, device: str | torch.device = "cpu") -> torch.Tensor | None:
    """Row mask ``[samples * seq_len]`` leaving out each sample's first ``skip`` tokens (None: keep all)."""
    if skip == 0:
        return None
    return (torch.arange(seq_len, device=device) >= skip).repeat(samples)


def keep_rows(mask: torch.Tensor | None, *xs: torch.Tensor) -> list[torch.Tensor]:
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
        _, (keys_hat, _) = encode(keys, values, prev, codec.key_part())
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


def encode_with_errors(keys: torch.Tensor, values: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None,
                       codec: LayerCodec, sums: dict[str, float], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`aquakv.codec.encode` one batch ``[N, D]``; add its squared errors (reconstruction, prediction alone)
    and norms to ``sums``; return ``(K̂, V̂)``."""
    try:
        block, (keys_hat, values_hat) = encode(keys, values, prev, codec)
    except NonFiniteError as e:
        raise NonFiniteError(f"{where}: {e}") from e
    for kind, q, residual in (("keys", block.keys, codec.keys), ("values", block.values, codec.values)):
        cfg = residual.config
        if bool((q.scales.float() >= cfg.scale_max).any()):  # the quantizers clamp a scale there
            raise CalibrationError(f"{where}: {kind} residual groups with a norm above {cfg.scale_max:g} saturate "
                                   f"the {cfg.scale_dtype} scale; use a wider scale_dtype (float16, float32)")
    preds = (codec.predict_keys(prev, keys), codec.predict_values(keys_hat, prev))
    for kind, y, y_hat, pred in (("keys", keys, keys_hat, preds[0]), ("values", values, values_hat, preds[1])):
        y64 = y.double()
        sums[f"{kind}_err"] += float(((y64 - y_hat.double()) ** 2).sum())
        sums[f"{kind}_pred_err"] += float(((y64 - pred.double()) ** 2).sum())
        sums[f"{kind}_norm"] += float((y64 * y64).sum())
    return keys_hat, values_hat
