"""Every cache of :data:`aquakv.baselines.METHODS` runs a forward pass that compresses on the installed transformers."""

from __future__ import annotations

import pytest
import torch

from aquakv.baselines import METHODS, held_bytes, make_cache
from aquakv.eval import window_nll


@pytest.mark.parametrize("method", METHODS)
def test_each_baseline_runs_and_compresses(method: str, model3, bundle3) -> None:
    if method.startswith("quanto"):
        pytest.importorskip("optimum.quanto")
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(3))
    exact_cache = make_cache("exact", model3, bundle3)()
    exact_nll, count = window_nll(model3, ids, exact_cache, step=16)
    cache = make_cache(method, model3, bundle3)()
    nll, count2 = window_nll(model3, ids, cache, step=16)
    assert count2 == count and torch.isfinite(torch.tensor(nll))
    assert cache.get_seq_length() == ids.shape[1]
    ratio = held_bytes(cache) / held_bytes(exact_cache)
    if method == "exact":
        assert nll == exact_nll and ratio == 1
    else:  # 96 tokens with a 32-token recent window: most of the cache is compressed, and it costs some accuracy
        assert ratio < 0.75, f"{method} holds {ratio:.2f} of the exact cache"
        assert nll != exact_nll


def test_no_predictors_is_higgs_with_the_gaussian_grid(bundle3) -> None:
    """A bundle with fitted grids: the no-predictor baseline keeps each quantizer's size and signs, not its grid."""
    from dataclasses import replace

    from aquakv.baselines import kivi_bits, without_predictors
    from aquakv.bundle import Bundle
    from aquakv.grids import gaussian_grid

    fitted = Bundle([replace(c, keys=replace(c.keys, grid=c.keys.grid * 1.1)) for c in bundle3.codecs], bundle3.cache,
                    bundle3.manifest)
    plain = without_predictors(fitted)
    for c, p in zip(fitted.codecs, plain.codecs, strict=True):
        assert p.key_predictor is None and p.value_predictor is None
        assert p.keys.config == c.keys.config and torch.equal(p.keys.signs, c.keys.signs)
        assert torch.equal(p.keys.grid, gaussian_grid(c.keys.config.dim, c.keys.config.size).to(p.keys.grid))
    assert kivi_bits("kivi-2bit", 128) == 2.375 and kivi_bits("kivi-2bit-g32", 128) == 2.625
    with pytest.raises(ValueError, match="unknown cache method"):
        kivi_bits("kivi-2bit-x", 128)
    for bad in ("kivi-0bit", "kivi-9bit", "kivi-2bit-g0", "kivi-2bit-g48"):
        with pytest.raises(ValueError, match="power-of-two channel group"):
            kivi_bits(bad, 128)
