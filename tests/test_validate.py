"""pipeline.validate on a tiny random Llama: collect K/V with hooks, fit, bundle, held-out perplexity, gate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import zarr
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from aquakv.bundle import decode_bundle, encode_bundle, fingerprint_of
from aquakv.config import CacheConfig, CalibrationConfig, QuantizerConfig
from aquakv.errors import CalibrationError
from aquakv.eval import chunk_starts, decode_chunking, window_nll
from pipeline.fit import fit_all
from pipeline.inputs import check_inputs
from pipeline.validate import check_gate, compressed_predictions, validate

VOCAB, SEQ = 96, 64


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def collect(model: LlamaForCausalLM, tokens: torch.Tensor, path: Path) -> None:
    """Pre-RoPE keys and values (k_proj / v_proj outputs) of every layer into a Zarr store."""
    group = zarr.open_group(str(path), mode="w")
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind, proj in (("keys", layer.self_attn.k_proj), ("values", layer.self_attn.v_proj)):
            hooks.append(proj.register_forward_hook(
                lambda _m, _i, out, name=f"{kind}/{i}": captured.__setitem__(name, out.detach())))
    with torch.no_grad():
        model(input_ids=tokens)
    for h in hooks:
        h.remove()
    for name, t in captured.items():
        arr = group.create_array(name, shape=t.shape, chunks=(1, *t.shape[1:]), dtype="float32")
        arr[:] = t.float().numpy()


@pytest.fixture(scope="module")
def fitted(model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("validate")
    gen = torch.Generator().manual_seed(1)
    collect(model, torch.randint(0, VOCAB, (32, SEQ), generator=gen), tmp / "activations.zarr")
    q = QuantizerConfig(dim=2, size=16, group_size=32)
    cfg = CalibrationConfig(model="tiny", data="random", keys=q, values=q,
                            first_layer=QuantizerConfig(dim=2, size=256, group_size=32))
    fits = fit_all(tmp / "activations.zarr", tmp / "work", cfg, progress=False)
    files = encode_bundle([f.codec for f in fits], CacheConfig(sinks=4, recent_window=16), fingerprint_of(model))
    return fits, decode_bundle(files)


def test_chunk_starts() -> None:
    assert chunk_starts(10, 4) == [0, 4, 8]
    assert chunk_starts(9, 4) == [0, 4]  # the last token is only a target
    assert chunk_starts(40, 16, first=20) == [0, 20, 36]
    assert chunk_starts(1, 4) == []
    with pytest.raises(ValueError, match=">= 1 token"):
        chunk_starts(10, 0)


def test_decode_chunks_give_token_by_token_decode(model: LlamaForCausalLM, fitted) -> None:
    """Validation's default chunks (each ends where the recent window fills) give the NLL of feeding one token at a
    time, what a generated token sees; fixed 8-token chunks do not (some tokens see more exact ones). Attention is
    sharpened (q, k x 8) so that which tokens are exact shows in the NLL."""
    from aquakv.cache import AquaKVCache
    from aquakv.kernels import KernelSettings

    _, bundle = fitted
    sharp = LlamaForCausalLM(model.config).eval()
    sharp.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in sharp.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(4))
    kernels = KernelSettings(enabled=False, attention="full", keep_reconstructions=True)

    def nll(step: int, first: int | None = None) -> float:
        cache = AquaKVCache(bundle.codecs, bundle.cache, sharp.model.rotary_emb, kernels=kernels)  # not its bundle
        return window_nll(sharp, ids, cache, step, first)[0]

    assert decode_chunking(bundle.cache) == (16, 20)
    by_token = nll(1)
    assert nll(*decode_chunking(bundle.cache)) == pytest.approx(by_token, rel=1e-6)
    assert nll(8, 20) == pytest.approx(by_token, rel=1e-6)  # any chunks that end where the window fills
    assert abs(nll(8) / by_token - 1) > 2e-5
    assert compressed_predictions(96, bundle.cache) == 95 - 20


def test_chunked_nll_matches_full_forward(model: LlamaForCausalLM) -> None:
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    total, count = window_nll(model, ids, DynamicCache(config=model.config), step=7)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                             reduction="sum")
    assert count == 2 * 39
    assert total == pytest.approx(float(full), rel=1e-4)


def test_validate_and_gate(model: LlamaForCausalLM, fitted) -> None:
    fits, bundle = fitted
    heldout = torch.randint(0, VOCAB, (3, 96), generator=torch.Generator().manual_seed(3))
    metrics = validate(model, heldout, bundle, step=8, fits=fits, batch_size=2)
    assert metrics["tokens"] == 3 * 95
    assert math.isfinite(metrics["ppl_aquakv"]) and math.isfinite(metrics["ppl_exact"])
    assert metrics["ppl_increase"] == pytest.approx(metrics["ppl_aquakv"] / metrics["ppl_exact"] - 1)
    assert abs(metrics["ppl_increase"]) < 0.05
    assert metrics["ppl_aquakv"] != metrics["ppl_exact"]  # the cache really compressed during the pass
    assert metrics["bits_per_value"]["total"] == pytest.approx((4.5 + 2 * 2.5) / 3)  # 4-bit first layer
    assert metrics["bits_per_value"]["total"] < metrics["cache_bits_per_value"] < 32
    assert [layer["layer"] for layer in metrics["layers"]] == [0, 1, 2]
    for layer in metrics["layers"][1:]:
        assert layer["keys_rel_mse"] < layer["keys_pred_rel_mse"] < 1
    # without compression the AQUA-KV cache is exact
    exact = validate(model, heldout, bundle, step=8, cache=CacheConfig(compress=False))
    assert exact["ppl_aquakv"] == pytest.approx(exact["ppl_exact"], rel=1e-5)

    check_gate(metrics, max_ppl_increase=0.05)
    with pytest.raises(CalibrationError, match="validation gate missed"):
        check_gate({**metrics, "ppl_increase": 0.5, "ppl_aquakv": 1.5 * metrics["ppl_exact"]}, 0.05)
    if metrics["ppl_increase"] > 0:
        with pytest.raises(CalibrationError, match="validation gate missed"):
            check_gate(metrics, max_ppl_increase=metrics["ppl_increase"] / 2)
    with pytest.raises(CalibrationError, match="validation gate missed"):
        check_gate({**metrics, "ppl_increase": float("nan")}, 0.05)


def test_validate_rejects_bad_tokens(model: LlamaForCausalLM, fitted) -> None:
    with pytest.raises(CalibrationError, match="held-out tokens"):
        validate(model, torch.zeros(4, dtype=torch.long), fitted[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fit_reads_the_collect_stage_store(tmp_path: Path, dtype: str) -> None:
    """Integration with pipeline.collect (skipped where that stage is absent): same activations as the hooks."""
    collect_stage = pytest.importorskip("pipeline.collect")
    checkpoint_mod = pytest.importorskip("pipeline.checkpoint")
    testing = pytest.importorskip("pipeline.testing")
    path = testing.write_tiny_llama(tmp_path / "model", num_layers=2)
    checkpoint = checkpoint_mod.Checkpoint(path)
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(4))
    theirs = tmp_path / "activations.zarr"
    collect_stage.open_activations(theirs, 2, 4, 32, checkpoint.kv_dim, dtype=dtype)
    collect_stage.collect_shard(checkpoint, tokens, 0, theirs, dtype=dtype, progress=False)
    ours = tmp_path / "hooks.zarr"
    collect(LlamaForCausalLM.from_pretrained(path).eval(), tokens, ours)
    q = QuantizerConfig(dim=2, size=16, group_size=32)
    cfg = CalibrationConfig(model="tiny", data="random", keys=q, values=q,
                            first_layer=QuantizerConfig(dim=2, size=256, group_size=32))
    a = fit_all(theirs, tmp_path / "w1", cfg, progress=False)
    b = fit_all(ours, tmp_path / "w2", cfg, progress=False)
    tol = 1e-5 if dtype == "float32" else 0.1
    for x, y in zip(a, b, strict=True):
        assert x.metrics["keys_rel_mse"] == pytest.approx(y.metrics["keys_rel_mse"], rel=tol)
        assert x.metrics["values_rel_mse"] == pytest.approx(y.metrics["values_rel_mse"], rel=tol)


def test_heldout_within_the_recent_window_is_refused(model: LlamaForCausalLM, fitted) -> None:
    """Sequences that never leave sinks + recent window (4 + 16 here) would make AQUA-KV equal to exact: refused."""
    short = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with pytest.raises(CalibrationError, match="never leave the exact sinks \\+ recent window.*smaller recent window"):
        validate(model, short, fitted[1], step=8)
    assert compressed_predictions(24, fitted[1].cache, 8) == 0
    assert compressed_predictions(26, fitted[1].cache, 8) == 1  # compressed after tokens 0..23, read by token 24
    metrics = validate(model, short, fitted[1], step=8, cache=CacheConfig(compress=False))
    with pytest.raises(CalibrationError, match="validation measured nothing"):
        check_gate(metrics, max_ppl_increase=0.05)


def test_flow_refuses_too_short_heldout_windows_before_any_work(tmp_path: Path) -> None:
    """``heldout_seq_len`` within sinks + recent window is refused by the flow's up-front checks (before the model,
    data or collection are touched), not after collect+fit."""
    cfg = CalibrationConfig(model=str(tmp_path / "no-model"), data=str(tmp_path / "no-data"), seq_len=1024,
                            heldout_seq_len=128, cache=CacheConfig(sinks=4, recent_window=128))
    with pytest.raises(CalibrationError, match="held-out sequences of 128 tokens never leave.*heldout_seq_len"):
        check_inputs(cfg)


def test_kept_reconstructions_give_the_same_nll_with_each_token_reconstructed_once(model, fitted) -> None:
    """``keep_reconstructions`` (validation's setting): the same NLL as reconstructing every compressed token at every
    chunk, while each layer reconstructs each token once."""
    from aquakv.cache import AquaKVCache
    from aquakv.kernels import KernelSettings

    _, bundle = fitted
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(4))
    results = {}
    for keep in (False, True):
        kernels = KernelSettings(enabled=False, attention="full", keep_reconstructions=keep)
        cache = AquaKVCache.from_bundle(bundle, model, kernels=kernels)
        reads: list[int] = []
        cache_read = type(cache.layers[0])._read_compressed

        def counting(layer, cache_read=cache_read, reads=reads):
            before = 0 if layer.kept is None else layer.kept[0].shape[-2]
            out = cache_read(layer)
            reads.append(layer.compressed_len - (before if keep else 0))  # noqa: B023
            return out

        for layer in cache.layers:
            layer._read_compressed = counting.__get__(layer)
        results[keep] = (window_nll(model, ids, cache, step=8), sum(reads), cache.layers[-1].compressed_len)
    (nll, _), reconstructed, final = results[True]
    assert nll == pytest.approx(results[False][0][0], rel=1e-5)
    assert final > 0 and reconstructed == len(model.model.layers) * final  # each token once per layer
    assert results[False][1] > 3 * reconstructed  # O(T²): every chunk re-reads all compressed tokens
    with pytest.raises(ValueError, match="keep_reconstructions needs attention='full'"):
        KernelSettings(keep_reconstructions=True)
