from collections import defaultdict

import pytest
import torch

from aquakv.codec import gaussian_residual
from aquakv.config import QuantizerConfig
from aquakv.errors import NonFiniteError
from aquakv.grids import expected_distortion, gaussian_grid
from aquakv.hadamard import random_signs, rotate, unrotate, walsh_hadamard
from aquakv.packing import pack, packed_bytes, unpack


def test_hadamard_is_orthonormal_and_self_inverse():
    x = torch.randn(5, 64, dtype=torch.float64)
    y = walsh_hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.allclose(walsh_hadamard(y), x)


def test_rotate_pads_and_inverts():
    x = torch.randn(3, 7, 100)
    signs = random_signs(64, seed=3)
    groups = rotate(x, signs)
    assert groups.shape == (3, 7, 2, 64)
    assert torch.allclose(unrotate(groups, signs, 100), x, atol=1e-5)


def test_group_size_must_be_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        random_signs(48, 0)
    with pytest.raises(ValueError):
        QuantizerConfig(group_size=48)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 12])
def test_pack_round_trip_and_exact_bytes(bits):
    codes = torch.randint(0, 2**bits, (4, 37))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (4, packed_bytes(37, bits))
    assert torch.equal(unpack(packed, bits, 37), codes)


@pytest.mark.parametrize(("dim", "size"), [(1, 4), (2, 16), (2, 64), (2, 256), (4, 256)])
def test_quantizer_mse_matches_grid_distortion(dim, size):
    """On Gaussian data the whole pipeline (rotation, norm scale, grid) achieves the grid's own distortion."""
    cfg = QuantizerConfig(dim=dim, size=size, group_size=64, scale_dtype="float32")
    r = gaussian_residual(cfg, seed=0)
    x = torch.randn(4096, 128, generator=torch.Generator().manual_seed(7))
    x_hat = r.dequantize(r.quantize(x))
    mse = float(((x - x_hat) ** 2).mean())
    target = expected_distortion(gaussian_grid(dim, size))
    assert abs(mse / target - 1) < 0.05, (mse, target)


def test_grid_distortion_falls_with_bits():
    d = [expected_distortion(gaussian_grid(2, n)) for n in (16, 64, 256)]
    assert d[0] > d[1] > d[2]
    assert 0.08 < d[0] < 0.13  # 2 bits/value: near the Gaussian rate-distortion region (0.0625 bound, 0.1175 scalar)


def test_bits_and_stored_bytes():
    cfg = QuantizerConfig(dim=2, size=16, group_size=64)
    assert cfg.index_bits_per_value == 2.0
    assert cfg.bits_per_value == 2.25
    q = gaussian_residual(cfg).quantize(torch.randn(10, 128))
    assert q.codes.numel() == 10 * 128 * 2 // 8
    assert q.nbytes == 10 * 128 * 2 // 8 + 10 * 2 * 2
    assert QuantizerConfig.for_bits(3).size == 64


def test_fp8_scales_halve_the_scale_bits_and_saturate_instead_of_nan():
    fp8, fp16 = (QuantizerConfig(dim=4, size=256, group_size=64, scale_dtype=t) for t in ("float8_e4m3fn", "float16"))
    assert fp8.bits_per_value == 2.125 and fp16.bits_per_value == 2.25 and fp8.scale_max == 448.0
    x = torch.randn(200, 128) * 3
    x[0, :64] *= 1000  # a group norm of ~24,000: above fp8's largest finite value
    errs = []
    for cfg in (fp8, fp16):
        r = gaussian_residual(cfg, seed=2)
        q = r.quantize(x)
        assert q.scales.dtype == cfg.torch_scale_dtype and torch.isfinite(q.scales.float()).all()
        assert q.nbytes == 200 * 128 * 2 // 8 + 200 * 2 * cfg.torch_scale_dtype.itemsize
        errs.append(float((r.dequantize(q)[1:] - x[1:]).norm() / x[1:].norm()))
    assert q.scales[0, 0] > 20000 and fp8.scale_max == float(gaussian_residual(fp8).quantize(x).scales[0, 0])
    assert errs[1] < errs[0] < 1.02 * errs[1]  # 3 mantissa bits cost < 2% relative error at 2 bits/value


def test_calibration_refuses_a_saturated_fp8_scale():
    from aquakv.codec import LayerCodec
    from aquakv.errors import CalibrationError
    from pipeline.stats import encode_with_errors

    cfg = QuantizerConfig(dim=2, size=16, group_size=64, scale_dtype="float8_e4m3fn")
    codec = LayerCodec(gaussian_residual(cfg, 0), gaussian_residual(cfg, 1))
    keys, values = torch.randn(8, 128), torch.randn(8, 128)
    sums: defaultdict[str, float] = defaultdict(float)
    encode_with_errors(keys, values, None, codec, sums, "layer 0")  # in range: fine
    values[3, 64:] *= 1e4
    with pytest.raises(CalibrationError, match="layer 0: values residual groups with a norm above 448 saturate"):
        encode_with_errors(keys, values, None, codec, sums, "layer 0")


def test_quantize_is_deterministic_and_shape_preserving():
    r = gaussian_residual(QuantizerConfig(dim=2, size=64, group_size=32), seed=1)
    x = torch.randn(2, 9, 50)
    a, b = r.quantize(x), r.quantize(x.clone())
    assert torch.equal(a.codes, b.codes)
    assert r.dequantize(a).shape == x.shape


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(4, 64)
    x[1, 3] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        gaussian_residual(QuantizerConfig()).quantize(x)


def test_fitted_grid_follows_weighted_data() -> None:
    """fit_grid: weighted Lloyd from the Gaussian grid; lower weighted distortion on skewed data than the
    Gaussian grid, zero-weight vectors ignored, deterministic."""
    from aquakv.grids import fit_grid, nearest

    gen = torch.Generator().manual_seed(0)
    skewed = torch.randn(1 << 14, 2, generator=gen) * torch.tensor([0.4, 1.6]) + 0.3
    noise = torch.randn(1 << 14, 2, generator=gen) * 9.0  # far outliers, but weightless
    vectors, weights = torch.cat([skewed, noise]), torch.cat([torch.ones(1 << 14), torch.zeros(1 << 14)])
    init = gaussian_grid(2, 16)
    grid = fit_grid(vectors, weights, init)
    assert torch.equal(grid, fit_grid(vectors, weights, init))

    def err(g: torch.Tensor) -> float:
        return float(((skewed - g[nearest(skewed, g)]) ** 2).mean())

    assert err(grid) < 0.8 * err(init)
    assert float(grid.abs().max()) < 6  # the outliers pulled no point out


@pytest.mark.parametrize(("dim", "size"), [(2, 16), (2, 256), (4, 256), (4, 1024)])
def test_nearest_is_the_one_chunk_argmin_to_the_bit(dim, size) -> None:
    """nearest's CPU path (small chunks, distances in place in one buffer) gives the codes of the plain formula over
    one large chunk, ``argmin(|g|^2 - 2 x @ g.T)``, on Gaussian vectors, exact grid points and midpoints between
    neighbouring points (ties: the first index wins in both); also for any explicit chunk."""
    from aquakv.grids import nearest

    grid = gaussian_grid(dim, size)
    gen = torch.Generator().manual_seed(size + dim)
    mids = (grid[:-1] + grid[1:]) / 2
    x = torch.cat([torch.randn(50_000, dim, generator=gen), grid, mids, 3 * torch.randn(5_000, dim, generator=gen)])

    want = torch.argmin((grid * grid).sum(-1) - 2 * x @ grid.T, dim=-1)
    assert torch.equal(nearest(x, grid), want)
    assert torch.equal(nearest(x.view(-1, 5, dim) if x.shape[0] % 5 == 0 else x, grid).reshape(-1), want)
    assert torch.equal(nearest(x, grid, chunk=777), want)
    assert torch.equal(nearest(x[:0], grid), want[:0])
    # exact ties across the argmin's blocks: copies of point 5 further on (one in the same block, two in later ones)
    tied = grid.clone()
    copies = [i for i in (7, 40, size - 1) if i < size]
    tied[copies] = grid[5]
    got = nearest(torch.cat([tied[5:6].expand(100, -1), x[:1000]]), tied)
    assert (got[:100] == 5).all()
    assert torch.equal(got, torch.argmin((tied * tied).sum(-1) - 2 * torch.cat([tied[5:6].expand(100, -1), x[:1000]])
                                         @ tied.T, dim=-1))
