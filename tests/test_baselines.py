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


def test_kivi_dequantizes_each_block_once_with_the_same_numbers() -> None:
    """KIVILayer keeps its blocks' dequantized keys and values: what it returns at every step equals dequantizing
    every block again (the O(T^2) way it worked before), to the bit."""
    from aquakv.baselines import KIVILayer

    gen = torch.Generator().manual_seed(5)
    layer = KIVILayer(bits=2, residual=32, group=16)
    for step in (7, 32, 1, 40, 16, 64, 3):
        keys, values = torch.randn(2, 3, step, 16, generator=gen), torch.randn(2, 3, step, 16, generator=gen)
        exact_keys = layer.keys if layer.is_initialized else keys[:, :, :0]
        exact_values = layer.values if layer.is_initialized else values[:, :, :0]
        old = [layer._decompress(b) for b in layer.blocks]
        want_keys = torch.cat([k for k, _ in old] + [exact_keys, keys], -2)
        want_values = torch.cat([v for _, v in old] + [exact_values, values], -2)
        got_keys, got_values = layer.update(keys, values)
        assert torch.equal(got_keys, want_keys) and torch.equal(got_values, want_values)
    assert layer.quantized_len == 160 and len(layer.blocks) == 5


def test_keep_reconstructions_gives_the_same_perplexity(model3, bundle3) -> None:
    """The quality bench evaluates AQUA-KV caches on a CPU with ``keep_reconstructions`` (each compressed token
    reconstructed once per layer): the same NLL as reconstructing everything at every step, to the bit."""
    from aquakv.kernels.settings import KernelSettings

    ids = torch.randint(0, 128, (2, 160), generator=torch.Generator().manual_seed(4))
    keep = KernelSettings.from_env(attention="full", keep_reconstructions=True)
    for method in ("aquakv", "no-predictors"):
        plain = window_nll(model3, ids, make_cache(method, model3, bundle3)(), step=16)
        kept = window_nll(model3, ids, make_cache(method, model3, bundle3, kernels=keep)(), step=16)
        assert kept == plain
