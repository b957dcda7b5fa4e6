"""The fit stage (pipeline.fit, .chain, .staged, .solve) on synthetic activations with planted inter-layer relations
(no model, no collect stage)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from aquakv.codec import LayerCodec, encode
from aquakv.config import CalibrationConfig, QuantizerConfig
from aquakv.errors import CalibrationError, NonFiniteError
from aquakv.predictors import fit_ridge, relative_mse, residual_mse
from pipeline import chain, fit, solve, staged, stats
from pipeline.chain import shards_call

DIM, SEQ, SAMPLES, LAYERS = 32, 16, 24, 3
Q2 = QuantizerConfig(dim=2, size=16, group_size=32)


def _cfg(**kw: object) -> CalibrationConfig:
    base = dict(model="synthetic", data="synthetic", keys=Q2, values=Q2,
                first_layer=QuantizerConfig(dim=2, size=256, group_size=32))
    return CalibrationConfig(**{**base, **kw})


def _orthogonal(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=gen))[0]


def write_store(path: Path, layers: int = LAYERS, noise: float = 0.05, samples: int = SAMPLES, seq: int = SEQ,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Activations where K_l = K_{l-1} A_l + b_l + noise and V_l = [K_l, V_{l-1}] B_l + noise; returns the maps."""
    gen = torch.Generator().manual_seed(seed)
    n = samples * seq
    scale = torch.linspace(0.3, 3.0, DIM)  # anisotropic channels
    keys, values = torch.randn(n, DIM, generator=gen) * scale, torch.randn(n, DIM, generator=gen)
    group = zarr.open_group(str(path), mode="w")
    planted = {}
    for layer in range(layers):
        if layer:
            a, b = _orthogonal(gen, DIM), torch.randn(DIM, generator=gen)
            keys = keys @ a + b + noise * torch.randn(n, DIM, generator=gen)
            m = torch.cat([_orthogonal(gen, DIM), _orthogonal(gen, DIM)]) * 0.7
            values = torch.cat([keys, values], 1) @ m + noise * torch.randn(n, DIM, generator=gen)
            planted[f"A{layer}"], planted[f"b{layer}"] = a, b
        for kind, t in (("keys", keys), ("values", values)):
            arr = group.create_array(f"{kind}/{layer}", shape=(samples, seq, DIM), chunks=(1, seq, DIM),
                                     dtype="float32")
            arr[:] = t.view(samples, seq, DIM).numpy()
    return planted


def _counting_map(calls: list[str]):
    def map_fn(fn, *iterables):
        calls.append(fn.__name__)
        return map(fn, *iterables)

    return map_fn


def _first_layer(act: Path, recon: str, cfg: CalibrationConfig) -> None:
    """Layer 0 (no predictors) fitted and reconstructed into ``recon``, the input of layer 1's statistics."""
    shard = staged.zarr_shards(act, recon, 1)[0]
    shard.forward(0)
    shard.reconstruct(0, solve.solve_layer(cfg, 0, None, shard.key_stats, shard.value_stats, shard.grid_samples))


def _no_predictor_rel_mse(act: Path, layer: int, cfg: CalibrationConfig) -> tuple[float, float]:
    """Relative MSE of quantizing layer ``layer`` directly with the same quantizers (the baseline)."""
    group = zarr.open_group(str(act), mode="r")
    keys = torch.from_numpy(group[f"keys/{layer}"][:]).reshape(-1, DIM)
    values = torch.from_numpy(group[f"values/{layer}"][:]).reshape(-1, DIM)
    _, (k_hat, v_hat) = encode(keys, values, None, LayerCodec(*solve.residual_quantizers(cfg, layer, layer == 0)))
    return relative_mse(keys, k_hat), relative_mse(values, v_hat)


def test_shard_ranges() -> None:
    assert chain.shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert chain.shard_ranges(2, 5) == [(0, 1), (1, 2)]
    assert chain.shard_ranges(7, 1) == [(0, 7)]
    with pytest.raises(ValueError):
        chain.shard_ranges(0, 2)


def test_pairwise_sum_does_not_depend_on_how_the_sequence_is_sharded() -> None:
    """The tree of PairwiseSum is over the items' order: aligned power-of-two shards summed the same way give the
    same bits as one pass; a running sum (what the fit did before) does not, on data where float order matters."""
    gen = torch.Generator().manual_seed(0)
    items = [torch.randn(256, dtype=torch.float64, generator=gen) * 10.0 ** torch.randint(-8, 9, (256,), generator=gen)
             for _ in range(16)]

    def pairwise(seq: list) -> torch.Tensor:
        total = stats.PairwiseSum()
        for x in seq:
            total.add(x)
        return total.total()

    def running(seq: list) -> torch.Tensor:
        total = seq[0]
        for x in seq[1:]:
            total = total + x
        return total

    whole = pairwise(items)
    for shards in (2, 4, 8, 16):
        n = len(items) // shards
        assert torch.equal(pairwise([pairwise(items[i:i + n]) for i in range(0, len(items), n)]), whole), shards
    assert not torch.equal(running([running(items[:8]), running(items[8:])]), running(items))
    assert torch.allclose(whole, running(items), rtol=1e-12, atol=1e-6)
    assert stats.PairwiseSum().total() is None
    odd = pairwise(items[:5])  # not a power of two: still the exact sum's value
    assert torch.allclose(odd, sum(items[:5]), rtol=1e-12, atol=1e-6)


def test_sharded_stats_equal_one_shot(tmp_path: Path) -> None:
    act = tmp_path / "act.zarr"
    write_store(act)
    cfg = _cfg()
    recon = str(tmp_path / "recon.zarr")
    _first_layer(act, recon, cfg)
    one = staged.layer_stats_keys(str(act), recon, 1, 0, 0, SAMPLES)
    parts = [staged.layer_stats_keys(str(act), recon, 1, 0, a, b) for a, b in chain.shard_ranges(SAMPLES, 5)]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    # the same per-shard work as methods of Zarr-backed chain shards, called over all of them at once
    call = shards_call(staged.zarr_shards(act, recon, 5))
    for a, b in zip(call("key_stats", 1), parts, strict=True):
        assert torch.equal(a.xtx, b.xtx) and torch.equal(a.xty, b.xty) and a.count == b.count
    assert total.count == one.count == SAMPLES * SEQ
    torch.testing.assert_close(total.xtx, one.xtx, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(total.xty, one.xty, rtol=1e-10, atol=1e-8)
    assert total.yty == pytest.approx(one.yty, rel=1e-12)


def test_chain_recovers_planted_relation(tmp_path: Path) -> None:
    act = tmp_path / "act.zarr"
    planted = write_store(act, noise=0.0)
    # an 8-bit first layer makes K̂_0 ≈ K_0, so layer 1's key predictor must find A_1, b_1
    cfg = _cfg(first_layer=QuantizerConfig(dim=1, size=256, group_size=32))
    fits = fit.fit_all(act, tmp_path / "work", cfg, progress=False, num_shards=3)
    assert fits[1].metrics["keys_pred_rel_mse"] < 1e-3
    torch.testing.assert_close(fits[1].codec.key_predictor.weight, planted["A1"], atol=0.05, rtol=0)
    torch.testing.assert_close(fits[1].codec.key_predictor.bias, planted["b1"], atol=0.05, rtol=0)
    for f in fits[1:]:
        no_pred = _no_predictor_rel_mse(act, f.layer, cfg)
        assert f.metrics["keys_rel_mse"] < 0.5 * no_pred[0]
        assert f.metrics["values_rel_mse"] < 0.5 * no_pred[1]


def test_chain_vs_parallel(tmp_path: Path) -> None:
    act = tmp_path / "act.zarr"
    write_store(act, layers=4, noise=0.1)
    report = []
    results = {}
    for mode in ("chain", "parallel"):
        cfg = _cfg(fit_mode=mode)
        results[mode] = fit.fit_all(act, tmp_path / mode, cfg, progress=False, num_shards=2)
    for layer in range(1, 4):
        no_pred = _no_predictor_rel_mse(act, layer, _cfg())
        row = {m: (f[layer].metrics["keys_rel_mse"], f[layer].metrics["values_rel_mse"]) for m, f in results.items()}
        report.append(f"layer {layer}: none {no_pred[0]:.4f}/{no_pred[1]:.4f} "
                      + " ".join(f"{m} {k:.4f}/{v:.4f}" for m, (k, v) in row.items()))
        for k, v in row.values():
            assert k < no_pred[0] and v < no_pred[1]
    print("\nkeys/values relative MSE\n" + "\n".join(report))


@pytest.mark.parametrize("mode", ["chain", "parallel"])
def test_keys_and_values_get_their_own_ranks(tmp_path: Path, mode: str) -> None:
    """``predictor_rank: {keys, values}`` fits each kind at its own rank; one int gives both the same."""
    act = tmp_path / "act.zarr"
    write_store(act, layers=3, noise=0.1)
    split = fit.fit_all(act, tmp_path / "split", _cfg(fit_mode=mode, predictor_rank={"keys": 4, "values": 12}),
                        progress=False, num_shards=2)
    for f in split[1:]:
        assert (f.codec.key_predictor.rank, f.codec.value_predictor.rank) == (4, 12)
        assert torch.linalg.matrix_rank(f.codec.key_predictor.weight, rtol=1e-4) == 4
        assert torch.linalg.matrix_rank(f.codec.value_predictor.weight, rtol=1e-4) == 12
        assert f.metrics["keys_predictor_rank"] == 4 and f.metrics["values_predictor_rank"] == 12
    same = _cfg(fit_mode=mode, predictor_rank=8)
    assert (same.rank_of("keys"), same.rank_of("values")) == (8, 8)


def test_parallel_noise_model_matches_chain(tmp_path: Path) -> None:
    """Layer 1's parallel key predictor (exact inputs + modelled noise) is close to the chain's on held-out
    reconstructions, and better than a plain fit on exact inputs."""
    act, recon, half = tmp_path / "act.zarr", str(tmp_path / "recon.zarr"), 8
    write_store(act, layers=2, samples=2 * half, seq=256)
    cfg = _cfg(first_layer=Q2)  # a coarse first layer makes the noise matter
    _first_layer(act, recon, cfg)
    train, test = (staged.layer_stats_keys(str(act), recon, 1, 0, a, b) for a, b in ((0, half), (half, 2 * half)))
    exact = [staged.layer_stats_exact(str(act), layer, layer - 1 if layer else None, 0, half) for layer in range(2)]
    chain_err = residual_mse(test, fit_ridge(train, cfg.damping))
    parallel_err = residual_mse(test, solve.solve_parallel(exact, cfg, [None, 0])[1].key_predictor)
    naive_err = residual_mse(test, fit_ridge(exact[1].keys, cfg.damping))
    print(f"\nlayer-1 key predictor, held-out relative MSE: chain {chain_err:.4f} parallel {parallel_err:.4f} "
          f"exact-input {naive_err:.4f}")
    assert parallel_err < min(1.1 * chain_err, naive_err)


def test_resume_loads_finished_layers(tmp_path: Path) -> None:
    act = tmp_path / "act.zarr"
    write_store(act)
    work = tmp_path / "work"
    cfg = _cfg()
    calls: list[str] = []
    first = fit.fit_all(act, work, cfg, map_fn=_counting_map(calls), progress=False, num_shards=2)
    assert calls.count("reconstruct") == LAYERS
    assert sorted(p.name for p in (work / "fit").iterdir()) == [f"{i}.{e}" for i in range(LAYERS)
                                                               for e in ("json", "safetensors")]
    calls.clear()
    second = fit.fit_all(act, work, cfg, map_fn=_counting_map(calls), progress=False, num_shards=2)
    assert calls == []
    for a, b in zip(first, second, strict=True):
        assert a.metrics == pytest.approx(b.metrics)
        torch.testing.assert_close(a.codec.keys.signs, b.codec.keys.signs)
        if a.codec.key_predictor is not None:
            torch.testing.assert_close(a.codec.value_predictor.weight, b.codec.value_predictor.weight)
    # losing the last layer's marker refits only that layer, to the same result
    (work / "fit" / f"{LAYERS - 1}.json").unlink()
    third = fit.fit_all(act, work, cfg, map_fn=_counting_map(calls), progress=False, num_shards=2)
    assert calls.count("reconstruct") == 1
    assert third[-1].metrics == pytest.approx(first[-1].metrics)
    # another quantizer config is another digest: everything is refitted
    calls.clear()
    fit.fit_all(act, work, _cfg(values=QuantizerConfig(dim=2, size=64, group_size=32)), map_fn=_counting_map(calls),
                progress=False)
    assert calls.count("reconstruct") == LAYERS


def test_saved_layers_are_in_the_bundle_format_and_checked_like_bundles(tmp_path: Path) -> None:
    """fit/{l} holds a bundle manifest entry and the bundle's tensor names: decoding it with the bundle's own
    decoder gives the fitted codec, and a layer file whose tensors a bundle would refuse (Hadamard signs not ±1,
    behind a matching SHA-256) is fitted again rather than used."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from aquakv.bundle import decode_layer
    from pipeline.store import load_codec

    act = tmp_path / "act.zarr"
    write_store(act)
    work, cfg = tmp_path / "work", _cfg()
    first = fit.fit_all(act, work, cfg, progress=False, num_shards=2)
    stem = work / "fit" / "1"
    meta = json.loads(stem.with_name("1.json").read_text())
    tensors = load_safetensors(stem.with_name("1.safetensors").read_bytes())
    codec = decode_layer(0, meta["entry"], tensors, tensors, "test")
    torch.testing.assert_close(codec.value_predictor.weight, first[1].codec.value_predictor.weight)
    torch.testing.assert_close(codec.keys.grid, first[1].codec.keys.grid)
    assert load_codec(stem, cfg.fit_digest())[0].key_predictor.rank == first[1].codec.key_predictor.rank

    tensors[meta["entry"]["keys"]["signs"]] = tensors[meta["entry"]["keys"]["signs"]] * 2
    blob = save_safetensors(tensors)
    stem.with_name("1.safetensors").write_bytes(blob)
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    stem.with_name("1.json").write_text(json.dumps(meta))
    assert load_codec(stem, cfg.fit_digest()) is None
    calls: list[str] = []
    again = fit.fit_all(act, work, cfg, map_fn=_counting_map(calls), progress=False, num_shards=2)
    assert calls.count("reconstruct") == LAYERS - 1  # layer 1 and its successors
    torch.testing.assert_close(again[1].codec.keys.signs, first[1].codec.keys.signs)


def test_parallel_resume(tmp_path: Path) -> None:
    act = tmp_path / "act.zarr"
    write_store(act)
    work, cfg = tmp_path / "work", _cfg(fit_mode="parallel")
    calls: list[str] = []
    first = fit.fit_all(act, work, cfg, map_fn=_counting_map(calls), progress=False)
    assert calls.count("layer_stats_exact") == 1 and calls.count("reconstruct") == LAYERS
    (work / "fit" / "1.json").unlink()
    calls.clear()
    again = fit.fit_all(act, work, cfg, map_fn=_counting_map(calls), progress=False)
    assert {"layer_stats_exact", "key_stats", "value_stats"}.isdisjoint(calls)  # solved codecs reloaded
    assert calls.count("reconstruct") == LAYERS - 1  # layers 1.. re-encoded
    for a, b in zip(first, again, strict=True):
        assert a.metrics == pytest.approx(b.metrics)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("mode", ["chain", "parallel"])
def test_nan_names_the_layer(tmp_path: Path, layer: int, mode: str) -> None:
    act = tmp_path / "act.zarr"
    write_store(act)
    arr = zarr.open_group(str(act), mode="r+")[f"keys/{layer}"]
    arr[3, 5, 7] = np.nan
    with pytest.raises(NonFiniteError, match=f"layer {layer}"):
        fit.fit_all(act, tmp_path / "work", _cfg(fit_mode=mode), progress=False)


def test_empty_or_missing_store(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no activations store"):
        fit.fit_all(tmp_path / "missing.zarr", tmp_path / "work", _cfg(), progress=False)
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(CalibrationError, match="collect"):
        fit.fit_all(tmp_path / "empty.zarr", tmp_path / "work", _cfg(), progress=False)
    group = zarr.open_group(str(tmp_path / "zero.zarr"), mode="w")
    for kind in ("keys", "values"):
        group.create_array(f"{kind}/0", shape=(0, SEQ, DIM), chunks=(1, SEQ, DIM), dtype="float32")
    with pytest.raises(CalibrationError, match="no activations"):
        fit.fit_all(tmp_path / "zero.zarr", tmp_path / "work", _cfg(), progress=False)


def test_bfloat16_store_is_read(tmp_path: Path) -> None:
    """A store written as uint16 bit patterns with attrs dtype=bfloat16 (as the collect stage may do) is read."""
    act = tmp_path / "act.zarr"
    write_store(act, layers=2)
    src = zarr.open_group(str(act), mode="r")
    bf = zarr.open_group(str(tmp_path / "bf.zarr"), mode="w")
    for kind in ("keys", "values"):
        for layer in range(2):
            t = torch.from_numpy(src[f"{kind}/{layer}"][:]).to(torch.bfloat16)
            arr = bf.create_array(f"{kind}/{layer}", shape=t.shape, chunks=(1, SEQ, DIM), dtype="uint16")
            arr.attrs["dtype"] = "bfloat16"
            arr[:] = t.view(torch.int16).numpy().view(np.uint16)
    a = fit.fit_all(act, tmp_path / "w1", _cfg(), progress=False)
    b = fit.fit_all(tmp_path / "bf.zarr", tmp_path / "w2", _cfg(), progress=False)
    assert b[1].metrics["keys_rel_mse"] == pytest.approx(a[1].metrics["keys_rel_mse"], rel=0.2)


def test_sinks_left_out_of_the_statistics(tmp_path: Path) -> None:
    """``exclude_sinks``: every sample's first ``cache.sinks`` tokens (exact at inference) enter no statistics."""
    act = tmp_path / "act.zarr"
    write_store(act)
    recon = str(tmp_path / "recon.zarr")
    cfg = _cfg(exclude_sinks=True, seq_len=SEQ)
    _first_layer(act, recon, cfg)
    full = staged.layer_stats_keys(str(act), recon, 1, 0, 0, SAMPLES)
    skipped = staged.layer_stats_keys(str(act), recon, 1, 0, 0, SAMPLES, cfg.skipped_tokens)
    assert cfg.skipped_tokens == cfg.cache.sinks == 4
    assert full.count == SAMPLES * SEQ and skipped.count == SAMPLES * (SEQ - 4)
    assert cfg.fit_digest() != cfg.model_copy(update={"exclude_sinks": False}).fit_digest()
    with pytest.raises(ValueError, match="fit_mode: chain"):
        _cfg(grids="fitted", fit_mode="parallel")
