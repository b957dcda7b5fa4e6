"""A per-layer bit budget: which grid each layer's keys and values get for a given average bits/value.

Pure arithmetic over numbers the fit stage measures. Each (layer, kind) has options (quantizer configs of the run's
grid dimension and group size, from 1 to 3 index bits per value) with a cost (stored bits per value) and an effect
(the expected increase of the model's loss: the grid's distortion per coordinate times the item's ``weight``, its
residual energy after the predictor times the loss's sensitivity to that layer's keys or values,
:mod:`pipeline.sensitivity`). Greedy on the lower convex hull: start every item at its cheapest option and repeatedly
take the upgrade that removes the most effect per extra bit while the average stays within the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from aquakv.config import QuantizerConfig

MIN_INDEX_BITS, MAX_INDEX_BITS, MAX_GRID = 1.0, 3.0, 1024
Sensitivity = dict[str, list[float]]  # {"keys": [L], "values": [L]}: the loss's mean squared gradient per token


def options(base: QuantizerConfig) -> list[QuantizerConfig]:
    """Grids of ``base``'s dimension and group size from 1 to 3 index bits per value (at most 1024 points)."""
    out = []
    size = 2
    while size <= MAX_GRID:
        cfg = base.model_copy(update={"size": size})
        if MIN_INDEX_BITS <= cfg.index_bits_per_value <= MAX_INDEX_BITS:
            out.append(cfg)
        size *= 2
    return out


@dataclass(frozen=True)
class Item:
    """One layer's keys or values: ``weight`` = what one unit of grid distortion costs (residual energy per token
    after the predictor x the loss's mean squared gradient per token)."""

    layer: int
    kind: str
    weight: float


def allocate(items: list[Item], choices: dict[str, list[QuantizerConfig]], distortion: dict[QuantizerConfig, float],
             budget: float, fixed_bits: float = 0.0, fixed_count: int = 0) -> dict[tuple[int, str], QuantizerConfig]:
    """Configs per ``(layer, kind)`` whose average ``bits_per_value`` together with ``fixed_count`` items of
    ``fixed_bits`` total (layers outside the budget, e.g. chain starts) stays within ``budget``, minimising the sum
    of effects. Raises ``ValueError`` if even the cheapest options exceed the budget."""
    allowed = budget * (len(items) + fixed_count) - fixed_bits
    pick = {(it.layer, it.kind): 0 for it in items}

    def cost(it: Item, i: int) -> float:
        return choices[it.kind][i].bits_per_value

    def effect(it: Item, i: int) -> float:
        return distortion[choices[it.kind][i]] * it.weight

    spent = sum(cost(it, 0) for it in items)
    if spent > allowed + 1e-9:
        least = (spent + fixed_bits) / (len(items) + fixed_count)
        raise ValueError(f"bit budget {budget:.3f} is below the cheapest grids ({least:.3f} bits/value)")
    while True:
        best, best_gain = None, 0.0
        for it in items:
            i = pick[(it.layer, it.kind)]
            for j in range(i + 1, len(choices[it.kind])):  # any upgrade: the hull is not always the next option
                extra = cost(it, j) - cost(it, i)
                if spent + extra > allowed + 1e-9 or extra <= 0:
                    continue
                gain = (effect(it, i) - effect(it, j)) / extra
                if gain > best_gain:
                    best, best_gain = (it, j, extra), gain
        if best is None:
            break
        it, j, extra = best
        pick[(it.layer, it.kind)] = j
        spent += extra
    return {(it.layer, it.kind): choices[it.kind][pick[(it.layer, it.kind)]] for it in items}
