import pytest
import torch
from transformers import DynamicCache

from aquakv.cache import AquaKVCache, dynamic_cache_nbytes
from aquakv.codec import LayerCodec, decode, encode, gaussian_residual, round_factor, stored_factors
from aquakv.compat import cache_kwargs
from aquakv.config import CacheConfig, QuantizerConfig
from aquakv.errors import ConfigError
from aquakv.kernels import KernelSettings
from aquakv.predictors import fit_ridge, ridge_stats
from conftest import calibrate_in_memory, tiny_llama


def _stepped_logits(model, ids, cache, step):
    with torch.no_grad():
        return torch.cat([model(ids[:, s : s + step], **cache_kwargs(model, cache), use_cache=True).logits
                          for s in range(0, ids.shape[1], step)], 1)


def test_compression_off_equals_dynamic_cache(model3, bundle3):
    ids = torch.randint(0, 128, (2, 200))
    exact = _stepped_logits(model3, ids, DynamicCache(config=model3.config), 16)
    off = _stepped_logits(model3, ids, AquaKVCache.from_bundle(bundle3, model3, compress=False), 16)
    assert torch.equal(off, exact)


def test_four_bit_logits_stay_close_and_cache_compresses(model3, bundle3):
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(5))
    exact = _stepped_logits(model3, ids, DynamicCache(config=model3.config), 20)
    cache = AquaKVCache.from_bundle(bundle3, model3)
    approx = _stepped_logits(model3, ids, cache, 20)
    assert cache.get_seq_length() == 300
    layer = cache.layers[1]
    assert layer.compressed_len == 288 and layer.keys.shape[-2] == 300 - 4 - 288
    rel = (approx - exact).norm() / exact.norm()
    assert rel < 0.02, rel
    assert torch.isfinite(approx).all()


def test_one_prefill_then_decode_matches_stepped(model3, bundle3):
    """A long prompt compressed in one update and then decoded equals the cache's stepwise behaviour in shape."""
    ids = torch.randint(0, 128, (1, 100))
    cache = AquaKVCache.from_bundle(bundle3, model3)
    with torch.no_grad():
        model3(ids, **cache_kwargs(model3, cache), use_cache=True)
        out = model3(ids[:, :1], **cache_kwargs(model3, cache), use_cache=True)
    assert cache.get_seq_length() == 101
    assert cache.layers[2].compressed_len == 96
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("prompt_len", [10, 90])
def test_generate_batch_two(model3, bundle3, do_sample, prompt_len):
    # seeded, and no early end of sequence: the outcome must not depend on which tests ran before
    ids = torch.randint(1, 128, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    torch.manual_seed(prompt_len)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    cache = AquaKVCache.from_bundle(bundle3, model3)
    out = model3.generate(ids, attention_mask=mask, **cache_kwargs(model3, cache), max_new_tokens=50,
                          min_new_tokens=50, do_sample=do_sample, pad_token_id=0, top_k=10)
    assert out.shape == (2, prompt_len + 50)
    assert cache.layers[0].compressed_len > 0


def test_greedy_generation_mostly_agrees_with_exact(model3, bundle3):
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    exact = model3.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    ours = model3.generate(ids, **cache_kwargs(model3, AquaKVCache.from_bundle(bundle3, model3)), max_new_tokens=40,
                           do_sample=False, pad_token_id=0)
    assert (exact == ours).float().mean() > 0.9


def test_two_bit_cache_holds_at_most_a_sixth_of_dynamic_cache():
    model = tiny_llama(layers=3, kv_heads=4, head_dim=32).to(torch.bfloat16)
    q2 = QuantizerConfig(dim=2, size=16, group_size=64)
    ids = torch.randint(0, 128, (1, 2048), generator=torch.Generator().manual_seed(2))
    bundle = calibrate_in_memory(model.float(), ids[:, :512], q2, q2)
    model = model.to(torch.bfloat16)
    ours, exact = AquaKVCache.from_bundle(bundle, model, recent_window=32), DynamicCache(config=model.config)
    with torch.no_grad():
        for s in range(0, 2048, 256):
            model(ids[:, s : s + 256], **cache_kwargs(model, ours), use_cache=True)
            model(ids[:, s : s + 256], **cache_kwargs(model, exact), use_cache=True)
    ratio = ours.nbytes() / dynamic_cache_nbytes(exact)
    assert ratio <= 1 / 6, ratio


def test_cache_without_bundle_positions_fails_clearly(model3, bundle3):
    cache = AquaKVCache(bundle3.codecs, CacheConfig(recent_window=8), model3.model.rotary_emb)
    model3.model.rotary_emb._aquakv_positions = None
    with pytest.raises(RuntimeError, match="position_ids"):
        cache.update(torch.zeros(1, 2, 20, 16), torch.zeros(1, 2, 20, 16), 0)


def test_stored_projections_decode_exactly_what_encode_returned():
    """``prediction="stored"``: decode needs no previous layer (it is not given one) and reconstructs exactly what
    encode returned; the rounding of the float8 projections goes into the residual, so where the prediction is about
    twice the residual (as on real models) the reconstruction error stays within 2% of the chained encode's."""
    gen = torch.Generator().manual_seed(0)
    d = 64
    basis = torch.randn(4, d, generator=gen)
    prev_k, prev_v = (torch.randn(2, 40, 4, generator=gen) @ basis + 0.05 * torch.randn(2, 40, d, generator=gen)
                      for _ in range(2))
    keys = prev_k @ torch.randn(d, d, generator=gen) * 0.04 + 0.3 * torch.randn(2, 40, d, generator=gen)
    values = (torch.cat([keys, prev_v], -1) @ torch.randn(2 * d, d, generator=gen) * 0.02
              + 0.3 * torch.randn(2, 40, d, generator=gen))
    q = QuantizerConfig(dim=2, size=16, group_size=32)
    codec = LayerCodec(gaussian_residual(q, 1), gaussian_residual(q, 2),
                       fit_ridge(ridge_stats(prev_k.flatten(0, 1), keys.flatten(0, 1)), rank=8))
    codec.value_predictor = fit_ridge(ridge_stats(LayerCodec.value_inputs(keys, prev_v).flatten(0, 1),
                                                  values.flatten(0, 1)), rank=8)
    block, (k_hat, v_hat) = encode(keys, values, (prev_k, prev_v), codec, stored=True)
    proj = block.projections
    assert proj.latents.dtype == torch.float8_e4m3fn and proj.latents.shape == (2, 40, 32) and proj.key_width == 16
    got_k, got_v = decode(block, None, codec)
    assert torch.equal(got_k, k_hat) and torch.equal(got_v, v_hat)
    _, (chained_k, chained_v) = encode(keys, values, (prev_k, prev_v), codec)
    for ours, chained, x in ((k_hat, chained_k, keys), (v_hat, chained_v, values)):
        err, chained_err = (ours - x).norm() / x.norm(), (chained - x).norm() / x.norm()
        assert err < 1.02 * chained_err, (err, chained_err)


def test_stored_key_prediction_multiplies_by_the_float8_up_factor():
    """The stored key predictor's ``up`` is rounded to float8 with one scale (the decode kernel multiplies ``z^K`` by it
    on float8 tensor cores) and encode predicts with that rounded factor, so decode gives back exactly what encode
    returned; the value predictor's ``up`` is not rounded."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 48, generator=gen) * torch.logspace(-3, 0, 48)  # columns over three decades
    w8, scale = round_factor(w)
    assert w8.dtype == torch.float8_e4m3fn and float(w8.float().abs().max()) == 448.0
    back = w8.float() * scale
    assert ((back - w).abs() <= w.abs() / 16 + 1e-6).all()  # e4m3 keeps ~3 significant bits at every magnitude
    assert float(round_factor(torch.zeros(4, 4))[1]) == 1.0  # an all-zero factor: scale 1, no division by zero
    d = 32
    prev_k, prev_v = torch.randn(2, 3, 20, d, generator=gen).unbind(0)
    keys, values = prev_k @ torch.randn(d, d, generator=gen) * 0.2, torch.randn(3, 20, d, generator=gen)
    q = QuantizerConfig(dim=2, size=16, group_size=32)
    codec = LayerCodec(gaussian_residual(q, 1), gaussian_residual(q, 2),
                       fit_ridge(ridge_stats(prev_k.flatten(0, 1), keys.flatten(0, 1)), rank=8),
                       fit_ridge(ridge_stats(LayerCodec.value_inputs(keys, prev_v).flatten(0, 1),
                                             values.flatten(0, 1)), rank=8))
    up = codec.key_predictor.factors()[1]
    up8, up_scale = round_factor(up)
    assert torch.equal(stored_factors(codec.key_predictor, keys=True)[1], up8.float() * up_scale)
    assert torch.equal(stored_factors(codec.value_predictor)[1], codec.value_predictor.factors()[1])
    block, (k_hat, v_hat) = encode(keys, values, (prev_k, prev_v), codec, stored=True)
    zk = block.projections.parts()[0]
    residual = codec.keys.dequantize(block.keys)
    rounded = zk @ stored_factors(codec.key_predictor, keys=True)[1] + codec.key_predictor.bias
    assert torch.allclose(k_hat, rounded + residual, atol=1e-5)
    assert not torch.allclose(k_hat, zk @ up + codec.key_predictor.bias + residual, atol=1e-5)
    got_k, got_v = decode(block, None, codec)
    assert torch.equal(got_k, k_hat) and torch.equal(got_v, v_hat)


@pytest.fixture(scope="module")
def low_rank_bundle(model3):
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(1))
    q = QuantizerConfig(dim=2, size=256, group_size=32)
    return calibrate_in_memory(model3, ids, q, q, cache=CacheConfig(recent_window=32), rank=8)


def test_stored_prediction_gives_the_chained_logits_and_holds_the_projections(model3, low_rank_bundle):
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(5))
    exact = _stepped_logits(model3, ids, DynamicCache(config=model3.config), 20)
    caches, logits = {}, {}
    for mode in ("chained", "stored"):
        caches[mode] = AquaKVCache.from_bundle(low_rank_bundle, model3, kernels=KernelSettings(prediction=mode))
        logits[mode] = _stepped_logits(model3, ids, caches[mode], 20)
    assert (logits["stored"] - exact).norm() / exact.norm() < 0.02
    assert (logits["stored"] - logits["chained"]).norm() / logits["chained"].norm() < 0.01
    # layers 1 and 2 keep 16 + 16 float8 projections and two float32 scales per compressed token
    held = caches["stored"].nbytes() - caches["chained"].nbytes()
    assert held == 2 * 2 * 288 * (32 + 8), held


def test_post_rope_key_residuals_keep_the_logits_and_decode_as_encoded(model3, low_rank_bundle):
    """``key_residual="post_rope"``: the key residual is quantized after RoPE at each token's position. Same quality
    on the tiny model, other codes than pre-RoPE, and decode reproduces encode's ``K̂`` bit for bit. Layer 0 (no key
    predictor) keeps its keys before RoPE: the same codes either way."""
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(5))
    exact = _stepped_logits(model3, ids, DynamicCache(config=model3.config), 20)
    for prediction in ("chained", "stored"):
        caches, logits = {}, {}
        for where in ("pre_rope", "post_rope"):
            settings = KernelSettings(prediction=prediction, key_residual=where)
            caches[where] = AquaKVCache.from_bundle(low_rank_bundle, model3, kernels=settings)
            logits[where] = _stepped_logits(model3, ids, caches[where], 20)
        err = {w: float((logits[w] - exact).norm() / exact.norm()) for w in logits}
        assert err["post_rope"] < 0.02 and err["post_rope"] < 1.25 * err["pre_rope"], err
        pre, post = (caches[w].layers[1].compressed.keys.codes for w in ("pre_rope", "post_rope"))
        assert pre.shape == post.shape and not torch.equal(pre, post)
        first = [caches[w].layers[0].compressed.keys.codes for w in ("pre_rope", "post_rope")]
        assert torch.equal(*first)
    layer = caches["post_rope"].layers[1]
    rotation = layer.residual_rotation(0, 64)  # the positions of the first 64 compressed tokens
    gen = torch.Generator().manual_seed(0)
    keys, values, prev_k, prev_v = (torch.randn(2, 64, layer.keys.shape[1] * layer.keys.shape[-1], generator=gen)
                                    for _ in range(4))
    assert torch.allclose(rotation.inverse(rotation.forward(keys)), keys, atol=1e-5)
    assert torch.allclose(rotation.forward(keys).norm(dim=-1), keys.norm(dim=-1), rtol=1e-5)
    for stored in (False, True):
        block, (k_hat, v_hat) = encode(keys, values, (prev_k, prev_v), layer.codec, stored, rotation)
        got_k, got_v = decode(block, (prev_k, prev_v), layer.codec, rotation)
        assert torch.equal(got_k, k_hat) and torch.equal(got_v, v_hat)
        pre_k = decode(block, (prev_k, prev_v), layer.codec)[0]  # read without the rotation: another K̂
        assert (pre_k - k_hat).norm() > 0.1 * (k_hat - keys).norm()
    assert caches["pre_rope"].layers[1].residual_rotation(0, 64) is None
    assert caches["post_rope"].layers[0].residual_rotation(0, 64) is None


def test_caches_of_one_bundle_factorize_its_predictors_once(model3, low_rank_bundle, monkeypatch):
    """A server builds a cache per request from one bundle: the predictors' factorization (and the operands prepared
    from it) is done once per device, not at each cache's first step; the device copies are not pickled."""
    import pickle

    from aquakv import predictors

    calls = []
    real = predictors.low_rank_factors
    monkeypatch.setattr(predictors, "low_rank_factors", lambda w, *a, **k: calls.append(w.shape) or real(w, *a, **k))
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(6))
    outs, counts = [], []
    for _ in range(3):
        cache = AquaKVCache.from_bundle(low_rank_bundle, model3, kernels=KernelSettings(prediction="stored"))
        outs.append(_stepped_logits(model3, ids, cache, 20))
        counts.append(len(calls))
    low_rank = sum(p is not None for c in low_rank_bundle.codecs for p in (c.key_predictor, c.value_predictor))
    assert low_rank == 4 and counts[0] <= low_rank and counts[2] == counts[0], counts  # (0: an earlier test did it)
    assert all(torch.equal(o, outs[0]) for o in outs)
    codec = low_rank_bundle.codecs[1]
    assert codec.to("cpu") is codec.to("cpu") and codec._moved
    made = []
    assert codec.derived("x", lambda: made.append(1) or (1,)) is codec.derived("x", lambda: made.append(1) or (2,))
    assert made == [1]
    back = pickle.loads(pickle.dumps(codec))
    assert back._moved == {} and back._derived == {}


def test_stored_prediction_refuses_full_rank_predictors(model3, bundle3):
    with pytest.raises(ConfigError, match="layer 1's key predictor: prediction='stored' needs low-rank predictors"):
        AquaKVCache.from_bundle(bundle3, model3, kernels=KernelSettings(prediction="stored"))
