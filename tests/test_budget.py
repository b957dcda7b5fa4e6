"""pipeline.budget: a per-layer bit budget, as pure arithmetic and through the fit stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_fit import DIM, _cfg, write_store

from aquakv.bundle import bits_per_value
from aquakv.config import QuantizerConfig
from aquakv.grids import expected_distortion, gaussian_grid
from pipeline import budget, fit

Q = QuantizerConfig(dim=2, size=16, group_size=32)


def _distortions(choices: dict) -> dict:
    return {q: expected_distortion(gaussian_grid(q.dim, q.size)) for qs in choices.values() for q in qs}


def test_options_span_one_to_three_index_bits() -> None:
    sizes = [q.size for q in budget.options(Q)]
    assert sizes == [4, 8, 16, 32, 64]
    assert [q.size for q in budget.options(Q.model_copy(update={"dim": 4, "size": 256}))] == [16, 32, 64, 128, 256,
                                                                                              512, 1024]


def test_allocation_spends_bits_where_the_residual_is_large() -> None:
    choices = {"keys": budget.options(Q), "values": budget.options(Q)}
    items = [budget.Item(1, "keys", 0.01), budget.Item(1, "values", 0.5), budget.Item(2, "keys", 0.02),
             budget.Item(2, "values", 0.3)]
    got = budget.allocate(items, choices, _distortions(choices), budget=Q.bits_per_value)
    bits = {k: q.index_bits_per_value for k, q in got.items()}
    assert bits[(1, "values")] > bits[(1, "keys")] and bits[(2, "values")] > bits[(2, "keys")]
    assert sum(q.bits_per_value for q in got.values()) / len(got) <= Q.bits_per_value + 1e-9
    with pytest.raises(ValueError, match="below the cheapest"):
        budget.allocate(items, choices, _distortions(choices), budget=1.0)


def test_allocation_follows_the_sensitivity() -> None:
    """Equal residuals: the kind the loss is more sensitive to gets the bits."""
    choices = {"keys": budget.options(Q), "values": budget.options(Q)}
    for sensitive in ("keys", "values"):
        items = [budget.Item(layer, kind, 0.1 * (30.0 if kind == sensitive else 1.0))
                 for layer in (1, 2) for kind in ("keys", "values")]
        got = budget.allocate(items, choices, _distortions(choices), budget=Q.bits_per_value)
        other = "values" if sensitive == "keys" else "keys"
        for layer in (1, 2):
            assert got[(layer, sensitive)].size > got[(layer, other)].size


def test_fit_all_meets_the_budget(tmp_path: Path) -> None:
    act = tmp_path / "act.zarr"
    write_store(act, layers=4)
    cfg = _cfg(bit_budget=2.6)
    with pytest.raises(ValueError, match="sensitivity"):
        fit.fit_all(act, tmp_path / "work", cfg, progress=False)
    calls = []

    def sensitivity() -> dict:
        calls.append(1)
        return {"keys": [1.0] * 4, "values": [1.0] * 4}

    fits = fit.fit_all(act, tmp_path / "work", cfg, progress=False, sensitivity=sensitivity)
    codecs = [f.codec for f in fits]
    assert bits_per_value(codecs, DIM)["total"] <= 2.6 + 1e-6
    sizes = {(c.keys.config.size, c.values.config.size) for c in codecs[1:]}
    assert len({s for pair in sizes for s in pair}) > 1  # not one grid for all
    saved = json.loads((tmp_path / "work" / "fit" / "budget.json").read_text())
    assert saved["sensitivity"] == sensitivity()
    again = fit.fit_all(act, tmp_path / "work", cfg, progress=False, sensitivity=sensitivity)  # resumed
    assert [f.codec.values.config for f in again] == [c.values.config for c in codecs]
    assert len(calls) == 2  # measured once (the second call is the assertion's), reloaded on resume
    keys_first = fit.fit_all(act, tmp_path / "keys", cfg, progress=False,
                             sensitivity=lambda: {"keys": [1e3] * 4, "values": [1e-3] * 4})
    assert sum(f.codec.keys.config.size for f in keys_first[1:]) > sum(c.keys.config.size for c in codecs[1:])


def test_sensitivity_samples_name_a_budgets_fit_only() -> None:
    from aquakv.config import CalibrationConfig
    from aquakv.errors import ConfigError

    plain = CalibrationConfig(model="m", data="d", num_samples=4)
    assert plain.fit_digest() == plain.model_copy(update={"sensitivity_samples": 3}).fit_digest()
    assert plain.digest() == plain.model_copy(update={"sensitivity_samples": 3}).digest()
    budgeted = plain.model_copy(update={"bit_budget": 2.5})
    assert budgeted.fit_digest() != budgeted.model_copy(update={"sensitivity_samples": 3}).fit_digest()
    with pytest.raises(ConfigError, match="sensitivity_samples 5 > num_samples 4"):
        CalibrationConfig.validated({"model": "m", "data": "d", "num_samples": 4, "bit_budget": 2.5,
                                     "sensitivity_samples": 5})
