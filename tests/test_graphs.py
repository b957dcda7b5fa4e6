"""Captured decode steps (:mod:`aquakv.graphs`): the token written at a device index and the exact length read on the
device give the logits of ordinary steps, across compressions of the window; on CUDA, replayed from CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from aquakv import kernels
from aquakv.attention import captured_mask
from aquakv.cache import AquaKVCache
from aquakv.compat import cache_kwargs
from aquakv.config import CacheConfig, QuantizerConfig
from aquakv.graphs import CapturedDecode, captured_decoding, generate
from aquakv.kernels import KernelSettings, cuda
from conftest import calibrate_in_memory, tiny_llama, wide_llama

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _steps(model, cache, ids: torch.Tensor, prompt: int, runner: dict | None = None,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of one-token steps after a ``prompt``-token prefill, ``[B, steps, vocab]``: ordinary steps, or with
    ``runner`` (options of :class:`CapturedDecode`, which is put in it as ``"runner"``) captured ones. ``mask``: the
    prompt's padding ``[B, prompt]`` (ordinary steps get the growing mask and each row's positions, as
    ``model.generate`` passes them)."""
    def masks(m: torch.Tensor | None, last: bool) -> dict:
        if m is None:
            return {}
        pos = m.sum(-1, keepdim=True) - 1 if last else (m.cumsum(-1) - 1).clamp(min=0)
        return {"attention_mask": m, "position_ids": pos}

    with torch.no_grad():
        model(ids[:, :prompt], **cache_kwargs(model, cache), **masks(mask, False))
        if runner is not None:
            runner["runner"] = CapturedDecode(model, cache, attention_mask=mask, **runner)
        out = []
        for i in range(prompt, ids.shape[1]):
            step = ids[:, i : i + 1]
            if runner is not None:
                out.append(runner["runner"](step))
                continue
            full = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], i + 1 - prompt)], 1)
            out.append(model(step, **cache_kwargs(model, cache), **masks(full, True)).logits)
    return torch.cat(out, 1)


def _same_state(a: AquaKVCache, b: AquaKVCache) -> None:
    assert a.get_seq_length() == b.get_seq_length()
    assert torch.equal(a.shared.positions, b.shared.positions)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.compressed_len, x.exact.length, x.exact.sinks) == (y.compressed_len, y.exact.length, y.exact.sinks)
        n = x.exact.length
        assert torch.equal(x.exact.keys[:, :, :n], y.exact.keys[:, :, :n])


def test_captured_steps_give_the_logits_of_ordinary_steps(model_and_bundle):
    """The captured-step protocol without graphs (the PyTorch backend): 100 steps over three compressions of the
    window, each compression and the step after it eager, every other step captured."""
    model, bundle = model_and_bundle
    ids = torch.randint(0, 128, (2, 140), generator=torch.Generator().manual_seed(2))
    settings = KernelSettings(enabled=False, attention="fused")
    plain, captured = (AquaKVCache.from_bundle(bundle, model, kernels=settings) for _ in range(2))
    run = {"graphs": False}
    want, got = _steps(model, plain, ids, 40), _steps(model, captured, ids, 40, run)
    runner = run["runner"]
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    assert captured.layers[2].compressed_len == 128 and runner.counts["uncaptured"] >= 90
    assert runner.counts["eager"] == 100 - runner.counts["uncaptured"] >= 6  # compressions, and the step after each
    _same_state(plain, captured)


def test_what_cannot_be_captured_runs_eagerly_and_says_why(model_and_bundle):
    model, bundle = model_and_bundle
    cache = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(enabled=False, attention="fused"))
    assert cache.capturable(1, graphs=False) == "the cache holds no tokens yet"
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 10)), **cache_kwargs(model, cache))
    assert cache.capturable(2, graphs=False) == "the cache holds 1 sequences, not 2"
    assert cache.capturable(1, graphs=True) == "the PyTorch backend reads lengths on the host"
    assert cache.capturable(1, graphs=False) is None
    full = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(enabled=False, attention="full"))
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 10)), **cache_kwargs(model, full))
    assert "fused protocol" in full.capturable(1, graphs=False)
    with pytest.raises(ValueError, match=r"one token per sequence, \[B, 1\]"):
        CapturedDecode(model, cache, graphs=False)(torch.zeros(1, 2, dtype=torch.long))
    captured_mask(torch.zeros(2, 1, 1, 9))  # the all-visible causal mask of one query token (additive, bool)
    captured_mask(torch.ones(2, 1, 1, 9, dtype=torch.bool))
    padded = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    padded[1, ..., :2] = False
    with pytest.raises(ValueError, match="padded"):
        captured_mask(padded)


def _padded_prompt(batch: int = 2, length: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``[B, T]`` (pad id 0) and their mask: row 1 has 7 pads (among them every sink), row 2 has
    3 (in a 3-row batch)."""
    ids = torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pads in ((1, 7), (2, 3))[: batch - 1]:
        ids[row, :pads], mask[row, :pads] = 0, 0
    return ids, mask


def test_a_padded_batch_decodes_as_transformers_generate_does(model_and_bundle):
    """Left padding: captured steps mask the pads with the cache's own copy of the prompt's mask and count each row's
    positions; ``generate(attention_mask=)`` picks transformers' greedy tokens (over compressions of the window), and
    the steps give the logits of ordinary padded steps."""
    model, bundle = model_and_bundle
    prompt, mask = _padded_prompt()
    settings = KernelSettings(enabled=False, attention="fused")
    ours = generate(model, AquaKVCache.from_bundle(bundle, model, kernels=settings), prompt, 50, graphs=False,
                    attention_mask=mask)
    cache = AquaKVCache.from_bundle(bundle, model, kernels=settings)
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=mask, max_new_tokens=50, do_sample=False, pad_token_id=0,
                              **cache_kwargs(model, cache))
    assert torch.equal(ours, want)
    plain, captured = (AquaKVCache.from_bundle(bundle, model, kernels=settings) for _ in range(2))
    run = {"graphs": False}
    expected, got = _steps(model, plain, ours, 30, mask=mask), _steps(model, captured, ours, 30, run, mask)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6)
    runner = run["runner"]
    assert runner.counts["uncaptured"] >= 40 and runner.counts["eager"] >= 2
    _same_state(plain, captured)
    assert captured.shared.positions[1, -1] == 79 - 7 and captured.shared.positions[0, -1] == 79
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, 80\]"):
        CapturedDecode(model, captured, graphs=False, attention_mask=mask)
    with pytest.raises(ValueError, match="must match input_ids"):
        generate(model, captured, prompt, 1, graphs=False, attention_mask=mask[:, 1:])


def test_transformers_generate_decodes_through_captured_steps(model_and_bundle):
    """``model.generate(..., custom_generate=captured_decoding)``: transformers' own generate (its logits processors,
    stopping criteria, left padding) with the steps captured gives its ordinary tokens: greedy with an end-of-sequence
    token, a chunked prompt pass (``prefill_chunk_size``; and ``graphs.generate(prefill_chunk=)``), seeded top-k
    sampling."""
    model, bundle = model_and_bundle
    prompt, mask = _padded_prompt()
    settings = KernelSettings(enabled=False, attention="fused")

    def run(seed: int, custom: bool, **kw) -> torch.Tensor:
        cache = AquaKVCache.from_bundle(bundle, model, kernels=settings)
        torch.manual_seed(seed)
        extra = {"custom_generate": captured_decoding} if custom else {}
        with torch.no_grad():
            return model.generate(prompt, attention_mask=mask, max_new_tokens=50, pad_token_id=0,
                                  **cache_kwargs(model, cache), **extra, **kw)

    greedy_tokens = run(0, True, do_sample=False)
    assert torch.equal(greedy_tokens, run(0, False, do_sample=False)) and greedy_tokens.shape == (2, 80)
    eos = int(greedy_tokens[0, 50])
    stopped = run(0, True, do_sample=False, eos_token_id=eos)
    assert torch.equal(stopped, run(0, False, do_sample=False, eos_token_id=eos))
    assert stopped[0, 50] == eos and (stopped[0, 51:] == 0).all()  # the first sequence ends there, padded
    chunked = run(0, True, do_sample=False, prefill_chunk_size=7)  # the prompt in passes of 7 tokens
    assert torch.equal(chunked, run(0, False, do_sample=False, prefill_chunk_size=7))
    passes: list[int] = []  # tokens per forward pass
    hook = model.register_forward_pre_hook(lambda m, a, kw: passes.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        ours = generate(model, AquaKVCache.from_bundle(bundle, model, kernels=settings), prompt, 50, graphs=False,
                        attention_mask=mask, prefill_chunk=7)
    finally:
        hook.remove()
    assert torch.equal(ours, chunked) and passes == [7, 7, 7, 7, 2] + [1] * 49
    sampled = run(7, True, do_sample=True, top_k=20, temperature=1.5)
    assert torch.equal(sampled, run(7, False, do_sample=True, top_k=20, temperature=1.5))
    assert not torch.equal(sampled, greedy_tokens)
    used = AquaKVCache.from_bundle(bundle, model, kernels=settings)
    with torch.no_grad():
        model(prompt[:, :3], **cache_kwargs(model, used))
        with pytest.raises(ValueError, match="empty AquaKVCache"):
            model.generate(prompt, max_new_tokens=2, custom_generate=captured_decoding, **cache_kwargs(model, used))


@pytest.mark.skipif(not kernels.available(DEV), reason="needs CUDA and Triton (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("prediction,padded", [("chained", False), ("stored", False), ("stored", True)])
def test_captured_steps_on_the_triton_backend(prediction, padded):
    """The Triton backend (the merge kernel reads the exact length on the device): on CUDA replayed from CUDA graphs,
    one capture per layout; under Triton's interpreter the protocol alone. Four layers: chained with full-rank
    predictors, three layers switch scratch buffers, so a pass ends on the other buffer than it started on.
    ``padded``: three left-padded rows, pads among the sinks and the compressed tokens (both kernels' masks)."""
    model = tiny_llama(layers=4, kv_heads=2, head_dim=64)
    q = QuantizerConfig(dim=2, size=16, group_size=64)
    n = 200 if DEV == "cuda" else 110  # the interpreter: two compressions of the window after the prompt's
    ids = torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(0))
    bundle = calibrate_in_memory(model, ids, q, QuantizerConfig(dim=2, size=256, group_size=64),
                                 cache=CacheConfig(recent_window=32), rank=32 if prediction == "stored" else None)
    mask = None
    if padded:
        prompt, mask = _padded_prompt(3, 60)
        ids = torch.cat([prompt, torch.randint(1, 128, (3, n - 60), generator=torch.Generator().manual_seed(6))], 1)
        mask = mask.to(DEV)
    model, ids = model.to(DEV), ids.to(DEV)
    settings = KernelSettings(prediction=prediction)
    plain, captured = (AquaKVCache.from_bundle(bundle, model, kernels=settings) for _ in range(2))
    run: dict = {}
    want, got = _steps(model, plain, ids, 60, mask=mask), _steps(model, captured, ids, 60, run, mask)
    runner = run["runner"]
    assert captured.backend.name == "triton" and captured.layers[2].compressed_len == (n - 4) // 32 * 32
    if prediction == "chained":
        from aquakv.kernels.decode import needs_own_buffer

        assert sum(needs_own_buffer(layer.codec, settings) for layer in captured.layers) == 3
    assert float((got - want).norm() / want.norm()) < 1e-5
    _same_state(plain, captured)
    if DEV == "cuda":
        assert runner.counts["captures"] >= 4 and runner.counts["replays"] >= 100


@pytest.mark.skipif(not (DEV == "cuda" and cuda.device_fits(torch.device(DEV))),
                    reason="needs a CUDA GPU with float8 tensor cores and NVRTC")
@pytest.mark.parametrize("padded", [False, True])
def test_captured_steps_on_the_cuda_backend(padded):
    """The CUDA decode kernel (post-RoPE stored format) replayed from CUDA graphs gives the logits of ordinary steps
    on the same backend: its launch reads the compressed tokens' positions and the RoPE table from tensors that stay
    put within a layout; ``padded``: pads among the sinks and the compressed tokens (the kernel's validity rows)."""
    model = wide_llama(layers=3)
    q = QuantizerConfig(dim=2, size=16, group_size=64)
    ids = torch.randint(0, 128, (3, 200), generator=torch.Generator().manual_seed(0))
    bundle = calibrate_in_memory(model, ids, q, QuantizerConfig(dim=2, size=256, group_size=64),
                                 cache=CacheConfig(recent_window=32), rank=64)
    mask = None
    if padded:
        prompt, mask = _padded_prompt(3, 60)
        ids = torch.cat([prompt, ids[:, 60:]], 1)
        mask = mask.to(DEV)
    model, ids = model.to(DEV, torch.bfloat16), ids.to(DEV)
    settings = KernelSettings(prediction="stored", key_residual="post_rope")
    plain, captured = (AquaKVCache.from_bundle(bundle, model, kernels=settings) for _ in range(2))
    run: dict = {}
    want, got = _steps(model, plain, ids, 60, mask=mask), _steps(model, captured, ids, 60, run, mask)
    assert captured.backend.name == "cuda" and captured.layers[2].compressed_len == 192
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-3
    _same_state(plain, captured)
    assert run["runner"].counts["captures"] >= 4 and run["runner"].counts["replays"] >= 100


def test_generate_picks_the_tokens_of_transformers_greedy_generate(model_and_bundle):
    model, bundle = model_and_bundle
    prompt = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    settings = KernelSettings(enabled=False, attention="fused")
    ours = generate(model, AquaKVCache.from_bundle(bundle, model, kernels=settings), prompt, 50, graphs=False)
    cache = AquaKVCache.from_bundle(bundle, model, kernels=settings)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=50, do_sample=False, **cache_kwargs(model, cache))
    assert ours.shape == (2, 80) and torch.equal(ours, want)
    eos = int(ours[0, 45])  # a token the first sequence produces: it stops there, the other goes on or stops too
    stopped = generate(model, AquaKVCache.from_bundle(bundle, model, kernels=settings), prompt, 50, graphs=False,
                       eos_token_id=eos)
    cache = AquaKVCache.from_bundle(bundle, model, kernels=settings)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=50, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                              **cache_kwargs(model, cache))
    assert torch.equal(stopped, want) and (stopped[0, 45:] == eos).all()
    least = generate(model, AquaKVCache.from_bundle(bundle, model, kernels=settings), prompt, 40, graphs=False,
                     sample=lambda logits: logits.argmin(-1, keepdim=True))  # any picker: the least likely token
    plain = AquaKVCache.from_bundle(bundle, model, kernels=settings)
    with torch.no_grad():
        logits = model(prompt, **cache_kwargs(model, plain)).logits
        for i in range(30, 70):
            assert torch.equal(least[:, i], logits[:, -1].argmin(-1))
            logits = model(least[:, i : i + 1], **cache_kwargs(model, plain)).logits
    with pytest.raises(ValueError, match="max_new_tokens >= 0"):
        generate(model, cache, prompt, -1, graphs=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            CapturedDecode(model, cache, graphs=True)


@pytest.mark.skipif(DEV != "cuda" or not kernels.available(DEV), reason="needs CUDA and Triton")
def test_transformers_generate_replays_graphs_on_cuda():
    """The same on the Triton backend, replayed from CUDA graphs under the installed transformers: greedy tokens of a
    left-padded batch, over compressions of the window, equal transformers' ordinary ones."""
    model = tiny_llama(layers=4, kv_heads=2, head_dim=64)
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(0))
    q = QuantizerConfig(dim=2, size=16, group_size=64)
    bundle = calibrate_in_memory(model, ids, q, QuantizerConfig(dim=2, size=256, group_size=64),
                                 cache=CacheConfig(recent_window=32), rank=32)
    model = model.to(DEV)
    prompt, mask = (x.to(DEV) for x in _padded_prompt(3, 40))
    out = []
    for custom in (True, False):
        cache = AquaKVCache.from_bundle(bundle, model, kernels=KernelSettings(prediction="stored"))
        extra = {"custom_generate": captured_decoding} if custom else {}
        with torch.no_grad():
            out.append(model.generate(prompt, attention_mask=mask, max_new_tokens=100, do_sample=False,
                                      pad_token_id=0, **cache_kwargs(model, cache), **extra))
        assert cache.backend.name == "triton" and cache.layers[1].compressed_len >= 96
    assert out[0].shape == (3, 140) and torch.equal(out[0], out[1])
