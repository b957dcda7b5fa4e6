import pytest
import torch

from aquakv.predictors import RidgeStats, fit_ridge, relative_mse, residual_mse, ridge_stats


def _planted(n=4000, d_in=24, d_out=16, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(d_in, d_out, generator=g), torch.randn(d_out, generator=g)
    x = torch.randn(n, d_in, generator=g)
    return x, x @ w + b + noise * torch.randn(n, d_out, generator=g), w, b


def test_ridge_recovers_known_affine_map():
    x, y, w, b = _planted()
    p = fit_ridge(ridge_stats(x, y), damping=1e-6)
    assert torch.allclose(p.weight, w, atol=1e-3)
    assert torch.allclose(p.bias, b, atol=1e-3)
    assert relative_mse(y, p(x)) < 1e-6


def test_chunked_statistics_equal_one_shot():
    x, y, _, _ = _planted(noise=0.3)
    whole = ridge_stats(x, y)
    summed = sum((ridge_stats(x[i : i + 700], y[i : i + 700]) for i in range(0, len(x), 700)),
                 start=RidgeStats(torch.zeros_like(whole.xtx), torch.zeros_like(whole.xty), 0.0, 0))
    assert summed.count == whole.count
    assert torch.allclose(summed.xtx, whole.xtx) and torch.allclose(summed.xty, whole.xty)
    assert torch.equal(fit_ridge(summed).weight, fit_ridge(whole).weight) or torch.allclose(
        fit_ridge(summed).weight, fit_ridge(whole).weight, atol=1e-6)
    restored = RidgeStats.from_tensors(whole.to_tensors())
    assert restored.count == whole.count and restored.yty == whole.yty


def test_residual_mse_from_statistics_matches_direct():
    x, y, _, _ = _planted(noise=0.5)
    stats = ridge_stats(x, y)
    p = fit_ridge(stats)
    assert abs(residual_mse(stats, p) - relative_mse(y, p(x))) < 1e-6


def test_low_rank_predictor_has_that_rank_and_costs_quality():
    x, y, _, _ = _planted(noise=0.1)
    stats = ridge_stats(x, y)
    full, low = fit_ridge(stats), fit_ridge(stats, rank=4)
    assert torch.linalg.matrix_rank(low.weight) == 4
    assert residual_mse(stats, low) > residual_mse(stats, full)


def test_rank_budget_finds_the_planted_rank_and_its_error_is_exact() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4000, 64, generator=g)
    w = torch.randn(64, 16, generator=g) @ torch.randn(16, 48, generator=g)  # a rank-16 relation
    y = x @ w + 0.05 * torch.randn(4000, 48, generator=g)
    stats = ridge_stats(x, y)
    full = fit_ridge(stats, damping=1e-6)
    chosen = fit_ridge(stats, damping=1e-6, rank_budget=0.05)
    assert torch.linalg.matrix_rank(chosen.weight, rtol=1e-4) == 16
    assert residual_mse(stats, chosen) <= 1.05 * residual_mse(stats, full)
    # below the planted rank the error explodes; a zero budget keeps the full-rank fit
    too_low = fit_ridge(stats, damping=1e-6, rank=8)
    assert residual_mse(stats, too_low) > 10 * residual_mse(stats, full)
    assert torch.allclose(fit_ridge(stats, damping=1e-6, rank_budget=0.0).weight, full.weight, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        fit_ridge(stats, rank=16, rank_budget=0.1)


def test_statistics_predictors_and_residuals_pickle_their_tensors_out_of_band() -> None:
    """What crosses Ray every layer (statistics to the driver, codecs to the workers) pickles its tensors as NumPy
    buffers, which Ray's object store passes without copying them into the pickled bytes, and comes back equal and
    writable, also from read-only buffers (Ray's zero-copy views)."""
    import pickle

    from aquakv.codec import gaussian_residual
    from aquakv.config import QuantizerConfig
    from aquakv.predictors import Predictor

    g = torch.Generator().manual_seed(0)
    objects = [
        ridge_stats(torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randn(64, 4, generator=g,
                                                                                       dtype=torch.float64)),
        Predictor(torch.randn(8, 4, generator=g), torch.randn(4, generator=g), rank=2),
        gaussian_residual(QuantizerConfig(dim=2, size=16, group_size=32)),
    ]
    for obj in objects:
        tensors = {k: v for k, v in vars(obj).items() if isinstance(v, torch.Tensor)}
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        assert len(buffers) == len(tensors) >= 2, type(obj).__name__
        frozen = [memoryview(bytes(b.raw())) for b in buffers]  # as Ray hands them back: read-only views
        back = pickle.loads(data, buffers=frozen)
        for name, t in tensors.items():
            got = getattr(back, name)
            assert isinstance(got, torch.Tensor) and got.dtype == t.dtype and torch.equal(got, t), name
            got += 0  # writable
        assert {k: v for k, v in vars(back).items() if k not in tensors} == \
            {k: v for k, v in vars(obj).items() if k not in tensors}
