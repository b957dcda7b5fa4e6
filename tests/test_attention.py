"""The backend seam and the fused protocol on the CPU: partials + merge, the PyTorch reference of the fused math inside
a model, backend selection, and the attention hook (other caches on the same model keep their numbers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from aquakv import kernels
from aquakv.attention import (
    IMPLEMENTATION,
    TorchBackend,
    install,
    key_validity,
    merge_partials,
    partial_attention,
    select_backend,
    tiled_partials,
)
from aquakv.cache import AquaKVCache
from aquakv.compat import cache_kwargs
from aquakv.config import QuantizerConfig
from aquakv.kernels import KernelSettings
from conftest import tiny_llama


def _sdpa(query, keys, values, valid, scaling):
    g = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=valid[:, None], scale=scaling)


@pytest.mark.parametrize("q_len", [1, 5])
def test_tiled_partials_merged_equal_sdpa_over_all_tokens(q_len):
    gen = torch.Generator().manual_seed(0)
    b, hkv, g, hd, n_c, n_e = 2, 2, 3, 32, 70, 9
    query = torch.randn(b, hkv * g, q_len, hd, generator=gen)
    keys = torch.randn(b, hkv, n_c + n_e, hd, generator=gen)
    values = torch.randn(b, hkv, n_c + n_e, hd, generator=gen)
    valid = torch.ones(b, q_len, n_c + n_e, dtype=torch.bool)
    valid[1, :, :20] = False  # left padding: a whole tile of row 1 is masked
    valid[:, :, -q_len:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    o_c, lse_c = tiled_partials(query, keys[:, :, :n_c], values[:, :, :n_c], valid[..., :n_c], 0.3, tile=16)
    assert o_c.shape == (b, hkv * g, q_len, 5, hd) and torch.isinf(lse_c[1, :, :, 0]).all()
    o_e, lse_e = partial_attention(query, keys[:, :, n_c:], values[:, :, n_c:], valid[..., n_c:], 0.3)
    merged = merge_partials(torch.cat([o_c, o_e.unsqueeze(3)], 3), torch.cat([lse_c, lse_e.unsqueeze(3)], 3))
    want = _sdpa(query, keys, values, valid, 0.3)
    assert torch.allclose(merged, want, atol=1e-5)


def test_key_validity_reads_bool_and_additive_masks_and_defaults_to_causal():
    m = torch.tensor([[[[True, False, True]]]])
    assert torch.equal(key_validity(m, 1, 1, 3, torch.device("cpu")), m[:, 0])
    additive = torch.where(m, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(key_validity(additive, 1, 1, 3, torch.device("cpu")), m[:, 0])
    assert key_validity(None, 2, 1, 3, torch.device("cpu")) is None
    causal = key_validity(None, 1, 2, 4, torch.device("cpu"))
    assert causal[0].tolist() == [[True, True, True, False], [True, True, True, True]]


def _run(model, cache, ids, mask, chunks):
    with torch.no_grad():
        return torch.cat([model(ids[:, s : s + n], attention_mask=mask[:, : s + n], **cache_kwargs(model, cache)).logits
                          for s, n in chunks], 1)


def test_fused_protocol_reference_equals_reconstruct_then_attend(model_and_bundle):
    """The PyTorch reference of the fused math (tiled partials + merge with sinks / window / new tokens) inside the
    model gives the logits of the reconstruct-then-attend path: left padding, batch 2, q_len > 1 and 1."""
    model, bundle = model_and_bundle
    ids = torch.randint(0, 128, (2, 230), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    chunks = [(0, 40), (40, 20), (60, 20), (80, 50)] + [(130 + i, 1) for i in range(100)]
    full = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(attention="full"))
    fused = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(attention="fused"))
    want, got = _run(model, full, ids, mask, chunks), _run(model, fused, ids, mask, chunks)
    assert fused.backend.name == "torch" and model.config._attn_implementation == IMPLEMENTATION
    assert fused.layers[2].compressed_len == 224 and fused.get_seq_length() == 230
    for row in (0, 1):  # fp32 sums in another order over 100+ chained steps: ~1e-4 on some BLAS; a wrong RoPE,
        a, b = got[row, 5 * row :], want[row, 5 * row :]  # mask or segment moves the logits by > 1e-1
        assert float((a - b).norm() / b.norm()) < 1e-3


def test_update_returns_tagged_exact_segments_only_when_the_model_attends_through_aquakv(model_and_bundle):
    model, bundle = model_and_bundle
    ids = torch.randint(0, 128, (1, 151), generator=torch.Generator().manual_seed(3))
    fused = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(attention="fused"))
    full = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(attention="full"))
    with torch.no_grad():
        for cache in (fused, full):
            model(ids[:, :150], **cache_kwargs(model, cache))
    k = torch.randn(1, 2, 1, 16)
    keys, _ = fused.update(k, k, 1)  # layer 1: no position tracking needed
    assert keys.shape[-2] == 4 + fused.layers[1].keys.shape[-2] and hasattr(keys, "_aquakv_segments")
    fused.layers[1].exact.length -= 1  # undo the update: the step below appends its own token
    model.set_attn_implementation("sdpa")  # the model no longer routes attention to the fused path
    try:
        with torch.no_grad():  # q_len 1, no padding: sdpa gets no mask, so short keys would pass silently
            got, want = (model(ids[:, 150:], **cache_kwargs(model, c)).logits for c in (fused, full))
        assert fused.layers[1].compressed_len == 128
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    finally:
        install(model)


def test_installing_the_hook_keeps_other_caches_bit_identical():
    model = tiny_llama(layers=2, kv_heads=2, head_dim=16, seed=5)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    chunks = [(0, 30)] + [(30 + i, 1) for i in range(10)]
    before = _run(model, DynamicCache(config=model.config), ids, mask, chunks)
    assert install(model) and model.config._attn_implementation == IMPLEMENTATION
    after = _run(model, DynamicCache(config=model.config), ids, mask, chunks)
    assert torch.equal(before, after)


def test_eager_models_are_left_alone_and_get_full_keys(model_and_bundle):
    _, bundle = model_and_bundle
    model = tiny_llama(layers=3, kv_heads=2, head_dim=16, seed=4)
    model.set_attn_implementation("eager")
    cache = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(attention="fused"))
    assert model.config._attn_implementation == "eager" and cache.shared.attn_config is None
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, cache)).logits
    assert torch.isfinite(out).all() and cache.layers[0].compressed_len == 128


def test_backend_selection_and_settings(model_and_bundle, monkeypatch):
    _, bundle = model_and_bundle
    cpu = torch.device("cpu")
    assert isinstance(select_backend(cpu, bundle.codecs, 64, KernelSettings(enabled=False)), TorchBackend)
    # head_dim 16 is not a kernel shape, whatever the device
    assert select_backend(cpu, bundle.codecs, 16, KernelSettings()).name == "torch"
    monkeypatch.setenv("AQUAKV_KERNELS", "0")
    assert KernelSettings.from_env().enabled is False
    monkeypatch.setenv("AQUAKV_KERNELS", "1")
    assert KernelSettings.from_env(scratch="fp8").scratch == "fp8"
    with pytest.raises(ValueError, match="scratch"):
        KernelSettings(scratch="fp4")
    with pytest.raises(ValueError, match="tile_tokens"):
        KernelSettings(tile_tokens=48)
    with pytest.raises(ValueError, match="value_latents"):
        KernelSettings(value_latents="later")
    with pytest.raises(ValueError, match="key_residual"):
        KernelSettings(key_residual="after")
    # where the kernels would run, post-RoPE key residuals still take the PyTorch backend (the kernels read pre-RoPE)
    monkeypatch.setattr(kernels, "available", lambda device, settings: True)
    assert select_backend(cpu, bundle.codecs, 64, KernelSettings()).name == "triton"
    assert select_backend(cpu, bundle.codecs, 64, KernelSettings(key_residual="post_rope")).name == "torch"
    settings = KernelSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.enabled = False  # type: ignore[misc]


def test_value_latents_auto_defers_at_many_programs_per_sm_or_a_high_rank():
    """decode.md rounds 22-23 (H100, 32k): deferring pays from 4 decode programs per SM (batch 8), and at batch 1
    (2 per SM) only at rank 256."""
    from aquakv.kernels.decode import defers_values

    auto = KernelSettings()
    assert defers_values(auto, 64, 8 * 256, 132) and not defers_values(auto, 64, 256, 132)
    assert defers_values(auto, 256, 256, 132) and not defers_values(auto, 128, 256, 132)
    assert not defers_values(KernelSettings(value_latents="fused"), 256, 8 * 256, 132)
    assert defers_values(KernelSettings(value_latents="deferred"), 16, 1, 132)


@pytest.mark.parametrize("ranks,want", [((16, 40), (True, 128)), ((None, 16), (False, 1024)),
                                        ((128, 16), (True, 256)), ((256, 16), (False, 1024))])
def test_scratch_hand_on_is_projected_only_for_low_rank_predictors(ranks, want):
    """The fused path hands layer l+1 only its low-rank projections of layer l's reconstruction (the widest layer's
    RK + RV columns, ranks padded to powers of two) when every predictor has rank <= 128; else the whole ``[K̂ | V̂]``."""
    from aquakv.codec import LayerCodec, gaussian_residual
    from aquakv.kernels.decode import handoff
    from aquakv.predictors import Predictor

    gen = torch.Generator().manual_seed(0)
    d = 512
    q = QuantizerConfig(dim=2, size=16, group_size=64)

    def predictor(d_in: int, rank: int | None) -> Predictor:
        w = torch.randn(d_in, rank or d, generator=gen)
        return Predictor(w @ torch.randn(rank, d, generator=gen) if rank else w, torch.zeros(d))

    codecs = [LayerCodec(gaussian_residual(q, 0), gaussian_residual(q, 1))]
    for i, rank in enumerate(ranks, 1):
        codecs.append(LayerCodec(gaussian_residual(q, 2 * i), gaussian_residual(q, 2 * i + 1),
                                 predictor(d, rank), predictor(2 * d, rank)))
    assert handoff(codecs, KernelSettings(), d) == want


@pytest.mark.parametrize("wanted", [(128, 8, 1), (64, 4, 4), (32, 4, 2), (128, 4, 1, 168)])
def test_decode_launch_fallbacks_need_less_shared_memory(wanted):
    """When the measured launch does not fit an SM's shared memory (rank 256 at D = 1024 did not), the fused kernel
    tries fewer pipeline stages, then smaller token tiles: each candidate needs no more than the one before, and keeps
    the launch's register cap (the stored kernel's with the value term deferred)."""
    from aquakv.kernels.decode import _launch_candidates

    got = _launch_candidates(wanted)
    cap = wanted[3:]
    assert got[0] == wanted and len(set(got)) == len(got) and all(c[3:] == cap for c in got)
    assert got[-1] == (wanted[0], wanted[1], 1, *cap) if wanted[0] == 32 else got[-1] == (32, 4, 1, *cap)
    for (t0, _, s0, *_), (t1, _, s1, *_) in zip(got, got[1:], strict=False):
        assert t1 < t0 or (t1 == t0 and s1 < s0)


@pytest.mark.parametrize("fp8", [True, False])
def test_the_kernels_key_factor_is_the_codecs_rounded_up(fp8):
    """The decode kernel's operand for the stored key prediction holds exactly the bits encode predicts with
    (``codec.stored_factors(keys=True)``), zero-padded to the kernel rank, in both forms (float8 ``up^T`` for float8
    tensor cores; ``up8`` in the operand dtype, its scale applied to ``z^K``), also after the predictor moves."""
    from aquakv.codec import stored_factors
    from aquakv.kernels.decode import _stored_key_up
    from aquakv.predictors import Predictor, kernel_rank

    gen = torch.Generator().manual_seed(6)
    weight = (torch.randn(64, 12, generator=gen) @ torch.randn(12, 96, generator=gen)).float()
    predictor = Predictor(weight, torch.zeros(96)).to("cpu")
    want = stored_factors(predictor, keys=True)[1]
    assert not torch.equal(want, predictor.factors()[1])  # rounded
    op, scale = _stored_key_up(predictor.to("cpu"), torch.device("cpu"), fp8)
    up = (op.t() if fp8 else op).float() * scale
    assert up.shape == (kernel_rank(want.shape[0]), 96) and torch.equal(up[: want.shape[0]], want)
    assert not up[want.shape[0]:].any()
