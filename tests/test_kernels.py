"""Triton kernels against the PyTorch reference. Skipped without CUDA + Triton (CI is CPU-only); they also run on
the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, Triton installed), slowly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from aquakv import kernels
from aquakv.attention import TorchBackend
from aquakv.cache import AquaKVCache
from aquakv.codec import EncodedBlock, LayerCodec, Residual, gaussian_residual
from aquakv.compat import cache_kwargs
from aquakv.config import CacheConfig, QuantizerConfig
from aquakv.grids import fit_grid, gaussian_grid
from aquakv.hadamard import random_signs, rotate, walsh_hadamard
from aquakv.kernels import KernelSettings
from aquakv.packing import pack, packed_bytes, unpack
from aquakv.predictors import Predictor, low_rank_factors
from aquakv.quantize import Quantized, dequantize_reference, quantize, quantize_reference

if kernels.HAS_TRITON:
    from aquakv.kernels import host

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available(DEV), reason="needs CUDA and Triton (or TRITON_INTERPRET=1)")
QUANTIZERS = [(2, 16, 64, 1024), (2, 16, 64, 192), (2, 64, 64, 100), (2, 256, 128, 256), (1, 16, 64, 64),
              (1, 8, 64, 130), (2, 16, 128, 1024), (4, 256, 64, 192), (4, 512, 64, 1024), (4, 1024, 64, 130)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fitted_grid(dim: int, size: int, seed: int) -> torch.Tensor:
    """A grid as calibration fits it per layer (:func:`aquakv.grids.fit_grid`: weighted Lloyd from the Gaussian
    grid) on skewed, shifted, scaled data, different per ``seed``: not the Gaussian grid."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * size, dim, generator=gen) * (0.5 + torch.rand(dim, generator=gen))
    vectors = x * x.abs().sqrt() + 0.3 * torch.randn(dim, generator=gen)
    grid = fit_grid(vectors, torch.rand(16 * size, generator=gen) ** 2, gaussian_grid(dim, size), iters=8)
    assert (grid - gaussian_grid(dim, size)).abs().max() > 0.1
    return grid


def fitted_residual(residual: Residual, seed: int) -> Residual:
    """``residual`` with a :func:`fitted_grid` of its shape in place of its grid."""
    cfg = residual.config
    return Residual(cfg, fitted_grid(cfg.dim, cfg.size, seed).to(residual.grid.device), residual.signs)


def check_quantize(x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, cfg: QuantizerConfig) -> None:
    """The quantize kernel gives the reference's codes (but for near-ties) in the same layout, and its scales."""
    group, dim = cfg.group_size, cfg.dim
    ours = Quantized(*host.quantize(x, grid, signs, cfg), x.shape[-1])
    ref = quantize_reference(x, grid, signs, cfg)
    assert ours.codes.shape == ref.codes.shape and ours.codes.dtype == torch.uint8
    assert ours.scales.shape == ref.scales.shape and ours.scales.dtype == ref.scales.dtype
    count = ref.scales.shape[-1] * group // dim
    idx, ref_idx = unpack(ours.codes, cfg.index_bits, count), unpack(ref.codes, cfg.index_bits, count)
    assert torch.equal(pack(idx, cfg.index_bits), ours.codes)  # same layout, padding bits zero
    mismatch = idx != ref_idx
    assert mismatch.float().mean() < 1e-3
    if mismatch.any():  # only near-ties may differ: compare both choices' distances on the reference unit vectors
        groups = rotate(x.float(), signs)
        unit = groups * group**0.5 / groups.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        vecs = unit.reshape(*unit.shape[:-2], -1, dim)[mismatch]
        d_ours = ((vecs - grid[idx[mismatch]]) ** 2).sum(-1)
        d_ref = ((vecs - grid[ref_idx[mismatch]]) ** 2).sum(-1)
        assert torch.allclose(d_ours, d_ref, rtol=1e-4, atol=1e-4)
    fp8 = cfg.torch_scale_dtype.itemsize == 1  # a norm on a rounding boundary may round one fp8 step apart
    if not (fp8 and kernels.INTERPRET):  # Triton 3.6's interpreter rounds 31.3 to e4m3 16 (drops the mantissa's carry)
        assert torch.allclose(ours.scales.float(), ref.scales.float(), rtol=0.0625 if fp8 else 2e-3, atol=0)


def test_rotation_matrices_are_the_reference_transform():
    g = 64
    signs = random_signs(g, 7)
    x = torch.randn(9, g, dtype=torch.float64)
    h = host.hadamard_pm1(g).double()
    assert torch.allclose(walsh_hadamard(x), x @ h * g**-0.5)
    rot, unrot = host.rotation_matrices(signs, torch.device(DEV))
    assert torch.allclose(x @ rot.double().cpu() * g**-0.5, rotate(x, signs.double())[:, 0])
    assert torch.equal(unrot, rot.T)


@pytest.mark.parametrize("dim,size,group,channels", QUANTIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference(dim, size, group, channels, dtype):
    cfg = QuantizerConfig(dim=dim, size=size, group_size=group)
    grid, signs = gaussian_grid(dim, size).to(DEV), random_signs(group, 11).to(DEV)
    x = (torch.randn(517, channels, device=DEV) * torch.rand(1, channels, device=DEV) * 5).to(dtype)
    x[3, :5] = 40.0  # an outlier row
    check_quantize(x, grid, signs, cfg)


@pytest.mark.parametrize("dim,size,group,channels", QUANTIZERS)
def test_dequantize_matches_reference_and_codes_interchange(dim, size, group, channels):
    cfg = QuantizerConfig(dim=dim, size=size, group_size=group)
    grid, signs = gaussian_grid(dim, size).to(DEV), random_signs(group, 5).to(DEV)
    x = torch.randn(300, channels, device=DEV) * 3
    q = Quantized(*host.quantize(x, grid, signs, cfg), channels)
    ref = dequantize_reference(q, grid, signs, cfg)
    ours = host.dequantize(q.codes, q.scales, channels, grid, signs, cfg)
    assert ours.shape == x.shape and _rel(ours, ref) < 1e-6
    add = torch.randn_like(x)
    assert _rel(host.dequantize(q.codes, q.scales, channels, grid, signs, cfg, add=add), ref + add) < 1e-6
    assert _rel(host.dequantize(q.codes, q.scales, channels, grid, signs, cfg, out_dtype=torch.bfloat16), ref) < 5e-3
    # GPU codes decode on the CPU reference and vice versa
    cpu_q = Quantized(q.codes.cpu(), q.scales.cpu(), q.channels)
    assert _rel(dequantize_reference(cpu_q, grid.cpu(), signs.cpu(), cfg), ours.cpu()) < 1e-6
    ref_q = quantize_reference(x.cpu(), grid.cpu(), signs.cpu(), cfg)
    back = host.dequantize(ref_q.codes.to(DEV), ref_q.scales.to(DEV), channels, grid, signs, cfg)
    assert _rel(back.cpu(), dequantize_reference(ref_q, grid.cpu(), signs.cpu(), cfg)) < 1e-6


@pytest.mark.parametrize("dim,size,group,channels", [(2, 16, 64, 1024), (1, 16, 64, 130), (2, 256, 64, 192),
                                                     (4, 512, 64, 192)])
def test_fitted_grids_quantize_and_dequantize_match_the_reference(dim, size, group, channels):
    """Calibration fits a grid per layer (weighted Lloyd): the codec kernels handle any grid, not only the
    Gaussian one."""
    cfg = QuantizerConfig(dim=dim, size=size, group_size=group)
    for layer in range(2):
        grid, signs = fitted_grid(dim, size, layer).to(DEV), random_signs(group, 20 + layer).to(DEV)
        x = torch.randn(400, channels, device=DEV) * torch.rand(1, channels, device=DEV) * 4
        check_quantize(x, grid, signs, cfg)
        q = Quantized(*host.quantize(x, grid, signs, cfg), channels)
        ours = host.dequantize(q.codes, q.scales, channels, grid, signs, cfg)
        assert _rel(ours, dequantize_reference(q, grid, signs, cfg)) < 1e-6


def test_quantize_module_dispatches_to_kernels_on_cuda():
    if DEV != "cuda":
        pytest.skip("dispatch is CUDA-only")
    cfg = QuantizerConfig()
    grid, signs = gaussian_grid(2, 16).to(DEV), random_signs(64, 1).to(DEV)
    x = torch.randn(64, 256, device=DEV)
    assert torch.equal(quantize(x, grid, signs, cfg).codes, host.quantize(x, grid, signs, cfg)[0])


def test_low_rank_factors():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 20, generator=gen) @ torch.randn(20, 128, generator=gen)
    down, up = low_rank_factors(w)
    assert down.shape == (256, 32) and up.shape == (32, 128)  # rank 20, padded to a power of two
    assert _rel(down @ up, w) < 1e-6
    assert low_rank_factors(torch.randn(256, 128, generator=gen)) is None


def synthetic_cache(batch: int, kv_heads: int, head_dim: int, layers: int, tokens: int, window: int,
                    dtype: torch.dtype, rank: int | tuple[int, ...] | None = None, seed: int = 0,
                    settings: KernelSettings | None = None,
                    grids: tuple[QuantizerConfig, QuantizerConfig] | None = None) -> AquaKVCache:
    """An AQUA-KV cache filled directly with random codes (4-bit layer 0; layers >= 1 2-bit d=2, or ``grids``: their
    keys' and values' quantizers) and random predictors (``rank``: of every layer's, or a tuple: layer ``i``'s is
    ``rank[i - 1]``)."""
    gen = torch.Generator().manual_seed(seed)
    d = kv_heads * head_dim
    cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4 * kv_heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, num_hidden_layers=layers, vocab_size=16, intermediate_size=64)
    rotary = LlamaRotaryEmbedding(cfg).to(DEV)

    def predictor(d_in: int, rank: int | None) -> Predictor:
        if rank:
            w = torch.randn(d_in, rank, generator=gen) @ torch.randn(rank, d, generator=gen) / (d_in * rank) ** 0.5
        else:
            w = torch.randn(d_in, d, generator=gen) / d_in**0.5
        return Predictor(0.5 * w, 0.1 * torch.randn(d, generator=gen))

    codecs = []
    for i in range(layers):
        q = QuantizerConfig(dim=2, size=256 if i == 0 else 16, group_size=64)
        kq, vq = grids if grids and i else (q, q)
        codec = LayerCodec(gaussian_residual(kq, 2 * i), gaussian_residual(vq, 2 * i + 1))
        if i:
            r = rank[i - 1] if isinstance(rank, tuple) else rank
            codec.key_predictor, codec.value_predictor = predictor(d, r), predictor(2 * d, r)
        codecs.append(codec)
    cache = AquaKVCache(codecs, CacheConfig(), rotary, kernels=settings or KernelSettings())
    for layer, codec in zip(cache.layers, codecs, strict=True):
        empty = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=DEV)
        layer.lazy_initialization(empty, empty)
        rnd = lambda n: torch.randn(batch, kv_heads, n, head_dim, generator=gen).to(DEV, dtype)  # noqa: E731
        sink_keys, sink_values, keys, values = rnd(4), rnd(4), rnd(window), rnd(window)
        layer.exact.append(sink_keys, sink_values, 4)
        layer.exact.append(keys, values, 0)
        layer._refresh()
        blocks = [_random_block(gen, batch, tokens, d, r.config) for r in (codec.keys, codec.values)]
        layer.compressed, layer.compressed_len = EncodedBlock(*blocks), tokens
    pos = torch.arange(4, 4 + tokens + window, dtype=torch.int32)[None] + 3 * torch.arange(batch, dtype=torch.int32)[
        :, None]
    cache.shared.positions = pos.contiguous().to(DEV)
    return cache


def _random_block(gen: torch.Generator, batch: int, tokens: int, d: int, cfg: QuantizerConfig) -> Quantized:
    groups = -(-d // cfg.group_size)  # the last group zero-padded
    row_bytes = packed_bytes(groups * cfg.group_size // cfg.dim, cfg.index_bits)
    codes = torch.randint(0, 256, (batch, tokens, row_bytes), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(batch, tokens, groups, generator=gen) * 16 + 4).to(cfg.torch_scale_dtype)
    return Quantized(codes.to(DEV), scales.to(DEV), d)


def _read_all(cache: AquaKVCache, fused: bool, precision: str = "bf16", gemm: str = "cublas"):
    cache.shared.prev_old, cache.shared.rope_memo = None, {}
    if not fused:
        backend = TorchBackend(KernelSettings(enabled=False))
        return [backend.read(layer) for layer in cache.layers]
    settings = KernelSettings(predictor=precision, gemm=gemm)
    return [host.read_compressed(layer, settings) for layer in cache.layers]


@pytest.mark.parametrize("head_dim,kv_heads", [(128, 2), (64, 3)])
@pytest.mark.parametrize("dtype,precision,tol", [(torch.float32, "ieee", 1e-5), (torch.bfloat16, "bf16", 2e-2),
                                                 (torch.bfloat16, "tf32", 1e-2)])
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_fused_read_matches_reference(head_dim, kv_heads, dtype, precision, tol, gemm):
    cache = synthetic_cache(2, kv_heads, head_dim, 3, 200, 5, dtype)
    ref, ours = _read_all(cache, False), _read_all(cache, True, precision, gemm)
    for (rk, rv), (ok, ov) in zip(ref, ours, strict=True):
        assert ok.shape == rk.shape and ok.dtype == rk.dtype and ov.shape == rv.shape
        assert _rel(ok, rk) < tol and _rel(ov, rv) < tol, (_rel(ok, rk), _rel(ov, rv))


@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_fused_read_low_rank_predictors(gemm):
    cache = synthetic_cache(2, 2, 128, 3, 150, 3, torch.float32, rank=24)
    ref, ours = _read_all(cache, False), _read_all(cache, True, "ieee", gemm)
    prep = host.prepare(cache.layers[1].codec.key_predictor, torch.float32, torch.device(DEV))
    assert prep.rank == 32 and prep.weight is None
    for (rk, rv), (ok, ov) in zip(ref, ours, strict=True):
        assert _rel(ok, rk) < 1e-5 and _rel(ov, rv) < 1e-5


def test_cache_on_the_kernel_path_matches_the_reference_logits():
    """A real model forward through AquaKVCache: the CUDA/Triton path vs the PyTorch path on the CPU."""
    from conftest import calibrate_in_memory, tiny_llama

    model = tiny_llama(layers=3, kv_heads=2, head_dim=64)
    q = QuantizerConfig(dim=2, size=16, group_size=64)
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(0))
    bundle = calibrate_in_memory(model, ids[:, :160], q, QuantizerConfig(dim=2, size=256, group_size=64))
    logits = []
    for device in ("cpu", DEV):
        m = model.to(device)
        cache = AquaKVCache.from_bundle(bundle, m, recent_window=32)
        with torch.no_grad():
            logits.append(torch.cat([m(ids[:, s : s + 20].to(device), **cache_kwargs(m, cache)).logits.cpu()
                                     for s in range(0, 300, 20)], 1))
        assert cache.shared.kernels_fit == (device != "cpu" or kernels.INTERPRET)
    assert _rel(logits[1], logits[0]) < 2e-2


# ------------------------------------------------------------------------------- fused decode attention (Triton)


def check_fused_layers(cache: AquaKVCache, kv_heads: int, head_dim: int, q_len: int, tokens: int) -> None:
    """Layer by layer: the kernel's partials merged with the exact segments equal the PyTorch reference of the same
    math, and the scratch it leaves holds this layer's reconstruction (what layer l+1 reads)."""
    from aquakv.attention import Segments, TritonBackend

    ref_backend, ours = TorchBackend(KernelSettings(enabled=False), tile=32), TritonBackend(KernelSettings())
    gen = torch.Generator().manual_seed(1)
    hq = 2 * kv_heads
    mask = torch.ones(2, 1, q_len, 4 + tokens + 5, dtype=torch.bool)
    mask[1, ..., :7] = False  # left padding: sinks and the first compressed tokens of row 1
    mask[..., -q_len:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    mask = mask.to(DEV)
    cache.shared.prev_old = None
    for layer in cache.layers:
        query = torch.randn(2, hq, q_len, head_dim, generator=gen).to(DEV, torch.bfloat16)
        exact_k = torch.cat([layer.sink_keys, layer.keys], -2)
        exact_v = torch.cat([layer.sink_values, layer.values], -2)
        seg = Segments(layer, layer.compressed, layer.compressed_len, 4)
        want = ref_backend.attend(seg, query, exact_k, exact_v, mask, head_dim**-0.5)
        keys_hat, values_hat = cache.shared.prev_old
        got = ours.attend(seg, query, exact_k, exact_v, mask, head_dim**-0.5)
        assert got.shape == want.shape == (2, q_len, hq, head_dim)
        assert _rel(got[0], want[0]) < 2e-2 and _rel(got[1], want[1]) < 2e-2, (_rel(got, want), layer.layer_idx)
        scratch = cache.shared.scratch_buffer(cache.shared.scratch_src)[:, :tokens].float()
        d = kv_heads * head_dim
        if not ours.handoff[0]:  # a full-rank predictor: the whole reconstruction
            assert _rel(scratch[..., :d], keys_hat) < 2e-2 and _rel(scratch[..., d:], values_hat) < 2e-2
        elif layer.layer_idx + 1 < len(cache.layers):  # the next layer's low-rank projections of K̂_l, V̂_l
            nxt = cache.layers[layer.layer_idx + 1].codec
            ka = host.prepare(nxt.key_predictor, torch.float32, torch.device(DEV), rank_multiple=0).down
            va = host.prepare(nxt.value_predictor, torch.float32, torch.device(DEV), rank_multiple=0).down[d:]
            rk, rv = ka.shape[1], va.shape[1]
            assert _rel(scratch[..., :rk], keys_hat @ ka) < 2e-2
            assert _rel(scratch[..., rk : rk + rv], values_hat @ va) < 2e-2


@pytest.mark.parametrize("rank,head_dim,kv_heads,q_len", [(None, 128, 2, 1), (24, 128, 2, 3), (None, 64, 3, 2),
                                                         (40, 64, 2, 1), (128, 128, 8, 1), (256, 128, 8, 1),
                                                         ((256, 16), 128, 8, 1)])
def test_fused_attention_and_scratch_handoff_match_the_reference(rank, head_dim, kv_heads, q_len):
    cache = synthetic_cache(2, kv_heads, head_dim, 3, 150, 5, torch.bfloat16, rank=rank)
    check_fused_layers(cache, kv_heads, head_dim, q_len, 150)


@pytest.mark.parametrize("rank", [None, 24])
def test_fitted_grids_on_the_fused_decode_path(rank):
    """Per-layer fitted grids (not the Gaussian grid) through the decode kernel: full and projected hand-on."""
    cache = synthetic_cache(2, 2, 128, 3, 150, 5, torch.bfloat16, rank=rank)
    for i, codec in enumerate(cache.shared.codecs):
        for part, seed in (("keys", 2 * i), ("values", 2 * i + 1)):
            r = getattr(codec, part)
            setattr(codec, part, fitted_residual(r, seed))
    check_fused_layers(cache, 2, 128, 1, 150)


@pytest.mark.parametrize("rank", [None, 24])
def test_d4_grids_on_the_fused_decode_path(rank):
    """The quality bench's best config at <= 2.5 bits: d=4 grids, keys 9-bit codes (n=512: codes straddle bytes),
    values 8-bit (n=256: read as words); fitted grids, through the decode kernel."""
    grids = QuantizerConfig(dim=4, size=512, group_size=64), QuantizerConfig(dim=4, size=256, group_size=64)
    cache = synthetic_cache(2, 2, 128, 3, 150, 5, torch.bfloat16, rank=rank, grids=grids)
    for i, codec in enumerate(cache.shared.codecs[1:], 1):
        codec.keys, codec.values = fitted_residual(codec.keys, 2 * i), fitted_residual(codec.values, 2 * i + 1)
    check_fused_layers(cache, 2, 128, 1, 150)


@pytest.mark.parametrize("rank", [None, 24])
def test_groups_wider_than_a_head_on_the_fused_decode_path(rank):
    """Hadamard groups of 128 channels over 64-channel heads: head ``h``'s halves sit at offsets 0/32 or 64/96 of
    their group by the parity of ``h``, so the un-rotation slices differ from head to head (the kernel reads them
    once per program only where the group size divides the head)."""
    grids = (QuantizerConfig(dim=2, size=16, group_size=128),) * 2
    cache = synthetic_cache(2, 3, 64, 3, 150, 5, torch.bfloat16, rank=rank, grids=grids)
    check_fused_layers(cache, 3, 64, 1, 150)


def test_fp8_scales_on_the_kernels():
    """fp8 (e4m3) group scales: the codec kernels store and read what the reference does, saturating at 448; the decode
    kernel reads them (d=4 keys with 10-bit codes, d=2 values)."""
    k8, v8 = (QuantizerConfig(dim=d, size=n, group_size=64, scale_dtype="float8_e4m3fn")
              for d, n in ((4, 1024), (2, 16)))
    grid, signs = gaussian_grid(4, 1024).to(DEV), random_signs(64, 7).to(DEV)
    x = torch.randn(300, 192, device=DEV) * torch.rand(1, 192, device=DEV) * 5
    x[5, :64] *= 1e4
    check_quantize(x, grid, signs, k8)
    q = Quantized(*host.quantize(x, grid, signs, k8), 192)
    assert q.scales.dtype == torch.float8_e4m3fn and float(q.scales[5, 0]) == 448.0
    ours = host.dequantize(q.codes, q.scales, 192, grid, signs, k8)
    assert _rel(ours, dequantize_reference(q, grid, signs, k8)) < 1e-6
    cache = synthetic_cache(2, 2, 128, 3, 150, 5, torch.bfloat16, rank=24, grids=(k8, v8))
    check_fused_layers(cache, 2, 128, 1, 150)


@pytest.mark.parametrize("values", ["fused", "deferred"])
@pytest.mark.parametrize("rank,q_len,grids,heads,tile", [(24, 1, None, (2, 4), None), ((64, 16), 3, None, (2, 4), None),
                                                      (64, 1, "d4", (2, 4), None), (256, 1, None, (8, 32), 128)])
def test_stored_projections_on_the_fused_decode_path(rank, q_len, grids, heads, tile, values):
    """``prediction="stored"``: the kernel reads each token's own float8 projections (no scratch, no other layer) and
    gives the PyTorch reference's attention, layer by layer in any order; d=4 keys with 9-bit codes too; rank D/4 of
    an 8B model's D = 1024 (8 KV heads of 128, 32 query heads) at the runtime's 32k launch (128-token tiles, 4 warps:
    the launch that spills registers, decode.md round 21); the value predictor's low-rank term in the decode kernel
    or deferred past the merge (``value_latents``)."""
    from aquakv.attention import Segments, TritonBackend
    from aquakv.codec import PROJECTION_DTYPE, Projections

    if grids == "d4":
        grids = QuantizerConfig(dim=4, size=512, group_size=64), QuantizerConfig(dim=4, size=256, group_size=64)
    kv_heads, query_heads = heads
    settings = KernelSettings(prediction="stored", tile_tokens=tile, value_latents=values)
    cache = synthetic_cache(2, kv_heads, 128, 3, 150, 5, torch.bfloat16, rank=rank, settings=settings, grids=grids)
    gen = torch.Generator().manual_seed(2)
    for layer in cache.layers[1:]:
        widths = [p.factors()[0].shape[1] for p in (layer.codec.key_predictor, layer.codec.value_predictor)]
        latents = (torch.randn(2, 150, sum(widths), generator=gen) * 100).to(PROJECTION_DTYPE)
        scales = torch.rand(2, 150, 2, generator=gen) * 0.05 + 1e-3
        scales[0, 9] = 0.0  # encode never writes a zero scale; the float8 key product divides by it, kept finite
        layer.compressed.projections = Projections(latents.to(DEV), scales.to(DEV), widths[0])
    ref, ours = TorchBackend(KernelSettings(enabled=False, prediction="stored"), tile=32), TritonBackend(settings)
    mask = torch.ones(2, 1, q_len, 4 + 150 + 5, dtype=torch.bool)
    mask[1, ..., :7] = False
    mask[..., -q_len:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    for layer in reversed(cache.layers):  # no layer needs another's read
        query = torch.randn(2, query_heads, q_len, 128, generator=gen).to(DEV, torch.bfloat16)
        exact_k = torch.cat([layer.sink_keys, layer.keys], -2)
        exact_v = torch.cat([layer.sink_values, layer.values], -2)
        seg = Segments(layer, layer.compressed, layer.compressed_len, 4)
        cache.shared.prev_old = None
        want = ref.attend(seg, query, exact_k, exact_v, mask.to(DEV), 128**-0.5)
        got = ours.attend(seg, query, exact_k, exact_v, mask.to(DEV), 128**-0.5)
        assert _rel(got[0], want[0]) < 2e-2 and _rel(got[1], want[1]) < 2e-2, (_rel(got, want), layer.layer_idx)
    assert cache.shared.scratch is None


def test_deferred_value_term_adds_every_chunk(monkeypatch):
    """The value predictor's deferred term (``_add_latent_values``) against its formula, ``out += (sum_t p_t
    exp(lse_tile - lse_row) s_t z^V_t) @ up[:, head]``, with one tile per chunk on 132 SMs: 80 chunks, more than one
    load of the finish (64), 2 query tokens per head, batch 2."""
    import aquakv.kernels.decode as dec
    from aquakv.kernels.decode import LatentValues, _add_latent_values

    monkeypatch.setattr(dec, "_sm_count", lambda device: 132)
    gen = torch.Generator().manual_seed(4)
    b, hkv, gq, qlen, bt, nt, rv, hd = 2, 2, 4, 2, 16, 80, 32, 64
    hq, qm, length = hkv * gq, 16, nt * bt - 5

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    probs, scales = torch.rand(b * nt, hkv, qm, bt, generator=gen), torch.rand(b, length, 2, generator=gen)
    lse, z, up, out = rnd(b, hq, qlen, nt), rnd(b, length + 3, rv), rnd(rv, hkv * hd), rnd(b, qlen, hq, hd)
    lse_row = torch.logsumexp(lse, -1) + 1.0
    t = torch.arange(length)
    want = out.clone()
    for bb in range(b):
        for h in range(hq):
            for qi in range(qlen):
                p = probs.view(b, nt, hkv, qm, bt)[bb, t // bt, h // gq, (h % gq) * qlen + qi, t % bt]
                weight = p * torch.exp(lse[bb, h, qi, t // bt] - lse_row[bb, h, qi]) * scales[bb, :, 1]
                want[bb, qi, h] += (weight @ z[bb, :length]) @ up[:, h // gq * hd:(h // gq + 1) * hd]
    got = out.to(DEV)
    _add_latent_values(got, LatentValues(*(x.to(DEV) for x in (probs, z, scales, up))), lse.to(DEV),
                       lse_row.to(DEV), length, hkv)
    # fp32 under the interpreter; on a GPU the sums multiply bf16 operands (1e-3 measured on an H100): a chunk left
    # out of the 80 moves the result by ~1e-2 or more
    assert _rel(got.cpu(), want) < (1e-5 if DEV == "cpu" else 5e-3)


@pytest.mark.parametrize("q_len,window,mask_kind,length", [(1, 9, None, 70), (3, 9, None, 70), (1, 9, "bool", 70),
                                                            (3, 90, "float", 70), (2, 9, "bool", 0)])
def test_exact_merge_kernel_equals_the_reference_merge(q_len, window, mask_kind, length):
    """``attend_exact`` (sinks + window + new tokens, causal / padding mask, merged with tile partials) against
    ``attend_segments``, float32: exact segments longer than one chunk, a fully masked tile, no compressed tokens."""
    from aquakv.attention import Segments, attend_segments, key_validity, tiled_partials
    from aquakv.kernels.decode import attend_exact

    gen = torch.Generator().manual_seed(3)
    b, hkv, g, hd, sinks = 2, 2, 3, 64, 4
    te = sinks + window
    kv_len = te + length
    query = torch.randn(b, q_len, hkv * g, hd, generator=gen).transpose(1, 2)  # the model's strides
    keys, values = (torch.randn(b, hkv, kv_len, hd, generator=gen) for _ in range(2))
    mask = None
    if mask_kind:
        valid = torch.ones(b, 1, q_len, kv_len + 3, dtype=torch.bool)  # longer than kv_len: the last columns count
        valid[1, ..., : 3 + 20] = False  # left padding: sinks and a whole 16-token tile of row 1
        valid[..., -q_len:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        mask = valid if mask_kind == "bool" else torch.where(valid, 0.0, torch.finfo(torch.float32).min)
    exact_k = torch.cat([keys[:, :, :sinks], keys[:, :, sinks + length :]], 2)
    exact_v = torch.cat([values[:, :, :sinks], values[:, :, sinks + length :]], 2)
    compressed = None
    if length:
        valid = key_validity(mask, b, q_len, kv_len, torch.device("cpu"))
        compressed = tiled_partials(query, keys[:, :, sinks : sinks + length], values[:, :, sinks : sinks + length],
                                    None if valid is None else valid[..., sinks : sinks + length], 0.2, 16)
    want = attend_segments(query, Segments(None, None, length, sinks), exact_k, exact_v, mask, 0.2, compressed)
    on_dev = [None if t is None else t.to(DEV) for t in (query, exact_k, exact_v, mask)]
    got = attend_exact(*on_dev[:3], sinks, length, on_dev[3], 0.2,
                       None if compressed is None else tuple(t.to(DEV) for t in compressed))
    assert got.shape == want.shape == (b, q_len, hkv * g, hd) and got.dtype == torch.float32
    assert torch.allclose(got.cpu(), want, atol=1e-5, rtol=1e-5), (got.cpu() - want).abs().max()


@pytest.mark.parametrize("scratch,tol,grids,prediction", [("bf16", 2e-2, "gaussian", "chained"),
                                                          ("fp8", 1e-1, "gaussian", "chained"),
                                                          ("bf16", 2e-2, "fitted", "chained"),
                                                          ("bf16", 2e-2, "gaussian", "stored")])
def test_fused_path_logits_match_the_reference_path(scratch, tol, grids, prediction):
    """A tiny Llama through AquaKVCache: fused Triton attention vs reconstruct-then-attend in PyTorch, on the same
    device; sinks, several compressed blocks, batch 2 with left padding, prefill chunks then q_len 1 steps; the
    bundle's Gaussian grids, or a fitted grid per layer (encode through the quantize kernel, decode in the fused
    kernel); ``prediction="stored"``: rank-32 predictors whose projections the encode stores and the kernel reads."""
    if DEV != "cuda" and scratch == "fp8":
        pytest.skip("fp8 scratch needs CUDA")
    from conftest import calibrate_in_memory, tiny_llama

    model = tiny_llama(layers=3, kv_heads=2, head_dim=64).to(DEV)
    q = QuantizerConfig(dim=2, size=16, group_size=64)
    ids = torch.randint(0, 128, (2, 420), generator=torch.Generator().manual_seed(0)).to(DEV)
    bundle = calibrate_in_memory(model.cpu(), ids[:, :200].cpu(), q, QuantizerConfig(dim=2, size=256, group_size=64),
                                 cache=CacheConfig(recent_window=64), rank=32 if prediction == "stored" else None)
    if grids == "fitted":
        for i, codec in enumerate(bundle.codecs):
            codec.keys, codec.values = fitted_residual(codec.keys, 2 * i), fitted_residual(codec.values, 2 * i + 1)
    model = model.to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    chunks = [(0, 100), (100, 20), (120, 30), (150, 7)] + [(157 + i, 1) for i in range(263)]
    logits = {}
    for name, settings in (("ref", KernelSettings(enabled=False, attention="full", prediction=prediction)),
                           ("fused", KernelSettings(scratch=scratch, prediction=prediction))):
        cache = AquaKVCache.from_bundle(bundle, model, kernels=settings)
        with torch.no_grad():
            logits[name] = torch.cat([model(ids[:, s : s + n], attention_mask=mask[:, : s + n],
                                            **cache_kwargs(model, cache)).logits for s, n in chunks], 1)
        assert cache.layers[2].compressed_len == 384
        assert (cache.layers[2].compressed.projections is not None) == (prediction == "stored")
    assert cache.backend.name == "triton" and model.config._attn_implementation == "aquakv"
    for row in (0, 1):
        assert _rel(logits["fused"][row, 6 * row :], logits["ref"][row, 6 * row :]) < tol


def test_kept_reconstructions_on_the_triton_read_path():
    """``keep_reconstructions`` reads only the tokens compressed since the last pass (``read_compressed(layer,
    settings, start)``: RoPE at their own positions, the previous layer's reconstruction of the same tokens) and gives
    the logits of reading every compressed token at every chunk."""
    from conftest import calibrate_in_memory, tiny_llama

    model = tiny_llama(layers=3, kv_heads=2, head_dim=64)
    q = QuantizerConfig(dim=2, size=16, group_size=64)
    ids = torch.randint(0, 128, (2, 400), generator=torch.Generator().manual_seed(1))
    bundle = calibrate_in_memory(model, ids[:, :200], q, QuantizerConfig(dim=2, size=256, group_size=64),
                                 cache=CacheConfig(recent_window=64))
    model, ids = model.to(DEV), ids.to(DEV)
    logits = {}
    for keep in (False, True):
        cache = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(attention="full",
                                                                              keep_reconstructions=keep))
        with torch.no_grad():
            logits[keep] = torch.cat([model(ids[:, s : s + 32], **cache_kwargs(model, cache)).logits
                                      for s in range(0, 400, 32)], 1)
        assert cache.layers[2].compressed_len == 384
        assert (cache.layers[2].kept is not None) == keep
    assert cache.backend.name == ("triton" if DEV == "cuda" else cache.backend.name)
    assert _rel(logits[True], logits[False]) < 1e-2
