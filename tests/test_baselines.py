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
