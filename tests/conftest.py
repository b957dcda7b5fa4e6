"""Shared fixtures: tiny random Llama models and an in-memory AQUA-KV calibration of them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aquakv.bundle import Bundle, decode_bundle, encode_bundle, fingerprint_of
from aquakv.codec import LayerCodec, encode, gaussian_residual
from aquakv.config import CacheConfig, QuantizerConfig
from aquakv.family import predecessors
from aquakv.predictors import fit_ridge, ridge_stats

torch.set_num_threads(1)  # tiny models: threads only contend on a busy 2-core machine


def tiny_llama(layers: int = 3, kv_heads: int = 2, head_dim: int = 16, seed: int = 0, **kw: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=4 * head_dim, intermediate_size=8 * head_dim,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=4096, **kw)
    return LlamaForCausalLM(cfg).eval()


def wide_llama(layers: int = 3) -> LlamaForCausalLM:
    """A tiny Llama with an 8B model's attention shape (the CUDA decode kernel's): 8 KV heads of 128, 32 query heads;
    queries scaled up so attention is sharp (a wrong rotation, mask or code order shows in the logits)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data *= 8
    return model


@pytest.fixture(scope="module")
def model_and_bundle() -> tuple[LlamaForCausalLM, Bundle]:
    """A 3-layer tiny Llama (2 KV heads of 16) and its in-memory bundle: 2-bit d=2 grids, a 32-token window."""
    model = tiny_llama(layers=3, kv_heads=2, head_dim=16, seed=4)
    ids = torch.randint(0, 128, (2, 160), generator=torch.Generator().manual_seed(1))
    q = QuantizerConfig(dim=2, size=256, group_size=32)
    return model, calibrate_in_memory(model, ids, q, q, cache=CacheConfig(recent_window=32))


def pre_rope_kv(model: LlamaForCausalLM, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer pre-RoPE keys and values ``[tokens, D]`` of a forward pass (k_proj / v_proj outputs)."""
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: keys.append(o.flatten(0, 1))))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(lambda m, a, o: values.append(o.flatten(0, 1))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [k.float() for k in keys], [v.float() for v in values]


def calibrate_in_memory(model: LlamaForCausalLM, ids: torch.Tensor, q: QuantizerConfig, first: QuantizerConfig,
                        predictors: bool = True, cache: CacheConfig | None = None, rank: int | None = None) -> Bundle:
    """The chain fit of docs/design.md §1 on one batch, in memory (``rank``: of every predictor); returns a verified
    bundle via bytes."""
    keys, values = pre_rope_kv(model, ids)
    return chain_fit(keys, values, q, first, fingerprint_of(model), predictors, cache, rank=rank)


def chain_fit(keys: list[torch.Tensor], values: list[torch.Tensor], q: QuantizerConfig, first: QuantizerConfig,
              fingerprint: dict, predictors: bool = True, cache: CacheConfig | None = None,
              windows: list[int | None] | None = None, rank: int | None = None) -> Bundle:
    """Fit codecs on per-layer pre-RoPE ``keys``, ``values [tokens, D]``, each layer predicted from its predecessor
    (``windows``: each layer's sliding window, :func:`aquakv.family.predecessors`); a verified bundle via bytes."""
    codecs, recon = [], {}
    for i, (k, v, p) in enumerate(zip(keys, values, predecessors(windows or [None] * len(keys)), strict=True)):
        cfg = first if p is None else q
        codec = LayerCodec(gaussian_residual(cfg, 2 * i), gaussian_residual(cfg, 2 * i + 1))
        prev = recon.get(p)
        if predictors and prev is not None:
            codec.key_predictor = fit_ridge(ridge_stats(prev[0], k), rank=rank)
            _, (k_hat, _) = encode(k, v, prev, codec)
            codec.value_predictor = fit_ridge(ridge_stats(LayerCodec.value_inputs(k_hat, prev[1]), v), rank=rank)
        _, recon[i] = encode(k, v, prev, codec)
        codecs.append(codec)
    return decode_bundle(encode_bundle(codecs, cache or CacheConfig(), fingerprint))


@pytest.fixture(scope="session")
def model3() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def bundle3(model3: LlamaForCausalLM) -> Bundle:
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(1))
    return calibrate_in_memory(model3, ids, QuantizerConfig(dim=2, size=256, group_size=32),
                               QuantizerConfig(dim=2, size=256, group_size=32), cache=CacheConfig(recent_window=32))
