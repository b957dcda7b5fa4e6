"""pipeline.resident: the fused, device-resident collect+fit equals the staged collect -> fit_all chain (one driver,
pipeline.chain.fit_chain, over resident or Zarr-backed shards)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from aquakv.config import CacheConfig, CalibrationConfig, QuantizerConfig
from aquakv.errors import CalibrationError, NonFiniteError
from pipeline.chain import fit_chain, saved_layer, shard_ranges, shards_call
from pipeline.checkpoint import Checkpoint
from pipeline.collect import KINDS, collect_shard, layer_complete, open_activations, read_activations
from pipeline.fit import fit_all
from pipeline.resident import ResidentShard
from pipeline.staged import zarr_shards
from pipeline.store import load_fits
from pipeline.testing import poison_values, write_tiny_llama

LAYERS, SAMPLES, SEQ = 3, 5, 48
Q = QuantizerConfig(dim=2, size=16, group_size=32)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resident")
    model = write_tiny_llama(root / "model", num_layers=LAYERS, max_positions=256)
    tokens = root / "tokens.zarr"
    group = zarr.open_group(str(tokens), mode="w")
    data = np.random.default_rng(0).integers(3, 320, (SAMPLES, SEQ), dtype=np.int32)
    group.create_array("calib", data=data, chunks=(1, SEQ))
    return {"root": root, "model": model, "tokens": tokens, "data": data}


def _cfg(assets: dict) -> CalibrationConfig:
    return CalibrationConfig(model=str(assets["model"]), data="synthetic", seq_len=SEQ, num_samples=SAMPLES, keys=Q,
                             values=Q, first_layer=QuantizerConfig(dim=2, size=256, group_size=32))


def _shards(assets: dict, n: int, **kw: object) -> list[ResidentShard]:
    return [ResidentShard(assets["model"], assets["tokens"], a, b, device="cpu", **kw)
            for a, b in shard_ranges(SAMPLES, n)]


@pytest.fixture(scope="module")
def staged(assets: dict) -> dict[int, list]:
    """The staged path: collect_shard into activations.zarr, then fit_all with 1 and with 2 shards."""
    ckpt = Checkpoint(assets["model"])
    act = assets["root"] / "activations.zarr"
    open_activations(act, LAYERS, SAMPLES, SEQ, ckpt.kv_dim)
    collect_shard(ckpt, assets["data"], 0, act, progress=False)
    return {n: fit_all(act, assets["root"] / f"staged{n}", _cfg(assets), progress=False, num_shards=n)
            for n in (1, 2)}


def _assert_same(a: list, b: list, exact: bool) -> None:
    assert len(a) == len(b) == LAYERS
    for fa, fb in zip(a, b, strict=True):
        for p, q in ((fa.codec.key_predictor, fb.codec.key_predictor),
                     (fa.codec.value_predictor, fb.codec.value_predictor)):
            assert (p is None) == (q is None) == (fa.layer == 0)
            if p is not None:
                if exact:
                    assert torch.equal(p.weight, q.weight) and torch.equal(p.bias, q.bias)
                else:
                    torch.testing.assert_close(p.weight, q.weight, rtol=1e-5, atol=1e-6)
                    torch.testing.assert_close(p.bias, q.bias, rtol=1e-5, atol=1e-6)
        assert fa.metrics.keys() == fb.metrics.keys()
        for k, v in fa.metrics.items():
            assert fb.metrics[k] == pytest.approx(v, rel=0 if exact else 1e-5), k


@pytest.mark.parametrize("n", [1, 2])
def test_resident_equals_staged(assets: dict, staged: dict, n: int, tmp_path: Path) -> None:
    cfg = _cfg(assets)
    shards = _shards(assets, n)
    calls: list[str] = []
    inner = shards_call(shards)

    def counting(method: str, *args: object) -> list:
        calls.append(method)
        return inner(method, *args)

    seconds: dict[str, float] = {}
    fits = fit_chain(counting, cfg, tmp_path, LAYERS, progress=False, seconds=seconds)
    assert calls.count("forward") == LAYERS
    # where the time went: every shard method the driver waited on, its own solves, the whole loop, layer 0, the median
    medians = {"median_layer", "median_solve"}
    assert set(seconds) == {*calls} - {"shape", "resume_point"} | {"solve", "layers", "first_layer", *medians}
    assert all(v >= 0 for v in seconds.values())
    assert seconds["first_layer"] + seconds["median_layer"] <= seconds["layers"]
    assert seconds["median_solve"] <= seconds["solve"]
    assert sum(v for k, v in seconds.items() if k not in {"layers", "first_layer", *medians}) <= seconds["layers"]
    _assert_same(staged[n], fits, exact=True)  # same shards, same row batches, same sums: bit-identical
    _assert_same(staged[1], fits, exact=False)  # another split only reorders float64 sums
    # the same driver over Zarr-backed shards of the collected activations: the same codecs, the same time breakdown
    act, zarr_seconds = assets["root"] / "activations.zarr", {}
    on_disk = fit_chain(shards_call(zarr_shards(act, tmp_path / "zarr" / "recon.zarr", n)), cfg, tmp_path / "zarr",
                        LAYERS, progress=False, seconds=zarr_seconds)
    _assert_same(on_disk, fits, exact=True)
    assert set(zarr_seconds) == set(seconds)
    # saved in fit_all's layout: load_fits reads them; a finished run is loaded, never recomputed
    _assert_same(load_fits(tmp_path, cfg, LAYERS), fits, exact=True)
    # the staged chain resume needs recon.zarr: from this work directory it refits from layer 0
    assert zarr_shards(act, tmp_path / "recon.zarr", 1)[0].resume_point(LAYERS, None) == 0
    calls.clear()
    _assert_same(fit_chain(counting, cfg, tmp_path, LAYERS, progress=False), fits, exact=True)
    assert calls == []
    # an unfinished run restarts from layer 0, on the same shards, to the same result
    (tmp_path / "fit" / f"{LAYERS - 1}.json").unlink()
    _assert_same(fit_chain(counting, cfg, tmp_path, LAYERS, progress=False), fits, exact=True)
    assert calls.count("forward") == LAYERS


def test_activations_written_for_a_staged_refit(assets: dict, staged: dict, tmp_path: Path) -> None:
    """With an activations store, the workers write K/V as collect does; fit_all then refits from it."""
    ckpt = Checkpoint(assets["model"])
    act = tmp_path / "activations.zarr"
    group = open_activations(act, LAYERS, SAMPLES, SEQ, ckpt.kv_dim)
    shards = _shards(assets, 2, activations_path=act)
    fit_chain(shards_call(shards), _cfg(assets), tmp_path / "resident", LAYERS, progress=False)
    ref = zarr.open_group(str(assets["root"] / "activations.zarr"), mode="r")
    for layer in range(LAYERS):
        assert layer_complete(group, layer)
        for kind in KINDS:
            assert torch.equal(read_activations(group, kind, layer), read_activations(ref, kind, layer))
    _assert_same(fit_all(act, tmp_path / "staged", _cfg(assets), progress=False, num_shards=2), staged[2],
                 exact=True)
    for shard in shards:
        shard.close()


def test_non_finite_names_the_layer(assets: dict, tmp_path: Path) -> None:
    shards = _shards(assets, 2)
    poison_values(shards[1].checkpoint, 2)
    with pytest.raises(NonFiniteError, match=r"layer 2: non-finite .* samples \[2, 3\)"):
        fit_chain(shards_call(shards), _cfg(assets), tmp_path, LAYERS, progress=False)
    assert len(load_fits(tmp_path, _cfg(assets), LAYERS)) == 2  # layers 0-1 were saved


def test_out_of_order_calls_are_refused(assets: dict) -> None:
    shard = _shards(assets, 1)[0]
    with pytest.raises(CalibrationError, match="chain order"):
        shard.forward(1)
    shard.forward(0)
    with pytest.raises(CalibrationError, match="chain order"):
        shard.key_stats(1)


def test_fitted_grids_and_sinks_out_equal_staged(assets: dict, tmp_path: Path) -> None:
    """With per-layer fitted grids and the sinks left out of the statistics, resident == staged, grids included."""
    cfg = _cfg(assets).model_copy(update={"grids": "fitted", "exclude_sinks": True})
    act = assets["root"] / "activations.zarr"  # collected by the `staged` fixture's run of the same model
    if not act.exists():
        ckpt = Checkpoint(assets["model"])
        open_activations(act, LAYERS, SAMPLES, SEQ, ckpt.kv_dim)
        collect_shard(ckpt, assets["data"], 0, act, progress=False)
    staged = fit_all(act, tmp_path / "staged", cfg, progress=False, num_shards=2)
    resident = fit_chain(shards_call(_shards(assets, 2)), cfg, tmp_path / "resident", LAYERS, progress=False)
    _assert_same(staged, resident, exact=True)
    gaussian = fit_all(act, tmp_path / "gaussian", _cfg(assets).model_copy(update={"exclude_sinks": True}),
                       progress=False, num_shards=2)
    for s, r, g in zip(staged, resident, gaussian, strict=True):
        for kind in KINDS:
            fitted = getattr(s.codec, kind).grid
            assert torch.equal(fitted, getattr(r.codec, kind).grid)
            assert not torch.equal(fitted, getattr(g.codec, kind).grid)  # each layer's own grid
    # weighted Lloyd from the Gaussian grid on each layer's own residuals: the chain's errors shrink
    for kind in KINDS:
        assert sum(f.metrics[f"{kind}_rel_mse"] for f in staged) < sum(f.metrics[f"{kind}_rel_mse"] for f in gaussian)


def test_one_two_and_four_workers_fit_the_same_bits(assets: dict, tmp_path: Path) -> None:
    """Statistics are summed per sample in a fixed tree (pipeline.stats.PairwiseSum): shards that are aligned
    power-of-two blocks of samples give bit-identical predictors, staged and resident alike (the bundle of 2 GPUs
    equals the bundle of 1)."""
    ckpt = Checkpoint(assets["model"])
    act = tmp_path / "activations.zarr"
    open_activations(act, LAYERS, 4, SEQ, ckpt.kv_dim)
    collect_shard(ckpt, assets["data"][:4], 0, act, progress=False)
    cfg = _cfg(assets).model_copy(update={"num_samples": 4})
    staged = {n: fit_all(act, tmp_path / f"staged{n}", cfg, progress=False, num_shards=n) for n in (1, 2, 4)}
    for n in (2, 4):
        _assert_same(staged[1], staged[n], exact=True)
        shards = [ResidentShard(assets["model"], assets["tokens"], a, b, device="cpu") for a, b in shard_ranges(4, n)]
        _assert_same(staged[1], fit_chain(shards_call(shards), cfg, tmp_path / f"resident{n}", LAYERS,
                                             progress=False), exact=True)


def test_a_crashed_run_resumes_after_the_saved_layer(assets: dict, staged: dict, tmp_path: Path) -> None:
    """With ``resident_checkpoint_every: 1`` the workers save their state after every layer; a run that dies in the
    last layer resumes after the saved one (no forward of the earlier layers) and fits the same bits."""
    cfg = _cfg(assets).model_copy(update={"resident_checkpoint_every": 1})

    class Crash(RuntimeError):
        pass

    def calls_of(shards: list[ResidentShard], calls: list, crash_at: int | None = None):
        inner = shards_call(shards)

        def call(method: str, *args: object) -> list:
            calls.append((method, *args[:1]))
            if method == "forward" and args[0] == crash_at:
                raise Crash
            return inner(method, *args)

        return call

    first: list = []
    with pytest.raises(Crash):
        fit_chain(calls_of(_shards(assets, 2), first, crash_at=LAYERS - 1), cfg, tmp_path, LAYERS, progress=False)
    assert (tmp_path / "resident-state" / "state.json").exists()
    second: list = []
    fits = fit_chain(calls_of(_shards(assets, 2), second), cfg, tmp_path, LAYERS, progress=False)
    assert ("restore_state", LAYERS - 2) in second
    assert [c for c in second if c[0] == "forward"] == [("forward", LAYERS - 1)]
    _assert_same(staged[2], fits, exact=True)
    assert not (tmp_path / "resident-state").exists()  # removed once the fit is complete
    # a state saved for other shards is not used: the run starts over
    third: list = []
    with pytest.raises(Crash):
        fit_chain(calls_of(_shards(assets, 2), third, crash_at=LAYERS - 1), cfg, tmp_path / "b", LAYERS,
                     progress=False)
    fourth: list = []
    _assert_same(staged[1], fit_chain(calls_of(_shards(assets, 1), fourth), cfg, tmp_path / "b", LAYERS,
                                         progress=False), exact=False)
    assert ("forward", 0) in fourth and not any(c[0] == "restore_state" for c in fourth)


def test_a_broken_saved_state_is_refused_or_ignored(assets: dict, tmp_path: Path) -> None:
    """``state.json`` that is not this fit's (garbage, another digest) makes the run start over; a shard file of
    another shard or a truncated one is refused with a one-line error naming the file."""
    cfg = _cfg(assets)
    states = tmp_path / "resident-state"
    states.mkdir()
    shards = [(0, SAMPLES)]
    shard, other = _shards(assets, 1)[0], _shards(assets, 2)[0]
    garbage = ["not json", "[1, 2]", '{"layer": "1"}', json.dumps({"layer": 1, "digest": "other", "shards": [[0, 5]]}),
               json.dumps({"layer": 5, "digest": cfg.fit_digest(), "shards": [[0, SAMPLES]]})]
    for text in garbage:
        (states / "state.json").write_text(text)
        assert shard.resume_point(3, saved_layer(states, cfg, shards)) == 0
    (states / "state.json").write_text(json.dumps({"layer": 1, "digest": cfg.fit_digest(), "shards": [[0, SAMPLES]]}))
    assert shard.resume_point(3, saved_layer(states, cfg, shards)) == 2
    assert shard.resume_point(1, saved_layer(states, cfg, shards)) == 0  # layer 1's fit is not saved

    shards_call([shard])("shape")
    for layer in range(2):
        shard.forward(layer)
        codec = _fit_codec(cfg, layer, shard)
        shard.reconstruct(layer, codec)
    shard.save_state(1, states)
    with pytest.raises(CalibrationError, match="resident state .* is for"):
        shard.restore_state(0, states)
    with pytest.raises(CalibrationError, match="unreadable"):
        other.restore_state(1, states)  # no file for this shard
    path = next(states.glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CalibrationError, match="unreadable"):
        shard.restore_state(1, states)


def _fit_codec(cfg: CalibrationConfig, layer: int, shard: ResidentShard):
    from pipeline.solve import solve_layer

    return solve_layer(cfg, layer, None if layer == 0 else layer - 1, lambda: shard.key_stats(layer),
                       lambda partial: shard.value_stats(layer, partial), None)


HELDOUT_LAYOUT = CacheConfig(sinks=2, recent_window=16)


def _with_heldout(assets: dict, tmp_path: Path, rows: int) -> tuple[Path, np.ndarray]:
    """A tokens store with the calibration samples and ``rows`` held-out sequences of 80 tokens."""
    tokens = tmp_path / "tokens.zarr"
    group = zarr.open_group(str(tokens), mode="w")
    group.create_array("calib", data=assets["data"], chunks=(1, SEQ))
    heldout = np.random.default_rng(1).integers(3, 320, (rows, 80), dtype=np.int32)
    group.create_array("heldout", data=heldout, chunks=(1, 80))
    return tokens, heldout


@pytest.mark.parametrize("along", [True, False], ids=["along-the-chain", "after-the-chain"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_validation_on_the_resident_shard_equals_streamed_sums(assets: dict, tmp_path: Path, device: str,
                                                               along: bool) -> None:
    """Resident mode validates on its collect+fit workers (the flow's ``validate_stage`` with actors): along the chain
    (``validate_along``: each layer's held-out passes run while the chain holds the layer) or, for a chain that did
    not run from layer 0 here, by streaming the checkpoint after it. Either way: the same sums as a fresh streamed
    validation of the same held-out rows, and the chain's buffers freed."""
    from pipeline.validate import streamed_sums

    tokens, heldout = _with_heldout(assets, tmp_path, 3)
    shard = ResidentShard(assets["model"], tokens, 0, SAMPLES, device=device)
    if along:
        shard.validate_along(1, 3, HELDOUT_LAYOUT)
    fits = fit_chain(shards_call([shard]), _cfg(assets), tmp_path / "fit", LAYERS, progress=False)
    codecs = [f.codec for f in fits]
    assert (shard.heldout is not None and shard.heldout.done) == along
    ours, fingerprint = shard.validate(1, 3, codecs, HELDOUT_LAYOUT)
    assert ours["seconds"].get("along_chain") == (1.0 if along else None)  # the passes that rode along were used
    assert shard.hidden is None and not shard.kv and not shard.recon and shard.heldout is None
    want, want_fingerprint = streamed_sums(Checkpoint(assets["model"]), torch.from_numpy(heldout[1:3]).long(),
                                           codecs, HELDOUT_LAYOUT, device=device)
    assert fingerprint == want_fingerprint
    for key in ("nll_exact", "nll_aquakv", "count", "cache_bits", "cached_values"):
        assert ours[key] == pytest.approx(want[key], rel=1e-6), key
    assert ours["nll_aquakv"] != ours["nll_exact"]


def test_validation_along_the_chain_of_other_codecs_streams_them(assets: dict, tmp_path: Path) -> None:
    """Codecs other than those the chain reconstructed with (here one predictor's bias moved) are validated by
    streaming the checkpoint with them, never answered with the passes that rode along the chain."""
    import dataclasses

    from aquakv.predictors import Predictor
    from pipeline.validate import streamed_sums

    tokens, heldout = _with_heldout(assets, tmp_path, 2)
    shard = ResidentShard(assets["model"], tokens, 0, SAMPLES, device="cpu")
    shard.validate_along(0, 2, HELDOUT_LAYOUT)
    codecs = [f.codec for f in fit_chain(shards_call([shard]), _cfg(assets), tmp_path / "fit", LAYERS,
                                         progress=False)]
    along, _ = shard.heldout.sums()
    moved = codecs[1].key_predictor
    other = [*codecs[:1], dataclasses.replace(codecs[1], key_predictor=Predictor(moved.weight, moved.bias + 0.5)),
             *codecs[2:]]
    ours, _ = shard.validate(0, 2, other, HELDOUT_LAYOUT)
    assert "along_chain" not in ours["seconds"]
    want, _ = streamed_sums(Checkpoint(assets["model"]), torch.from_numpy(heldout).long(), other, HELDOUT_LAYOUT)
    assert ours["nll_aquakv"] == pytest.approx(want["nll_aquakv"], rel=1e-6)
    assert ours["nll_aquakv"] != pytest.approx(along["nll_aquakv"], rel=1e-6)
    assert ours["nll_exact"] == pytest.approx(along["nll_exact"], rel=1e-6)


def test_a_resumed_chain_validates_by_streaming(assets: dict, tmp_path: Path) -> None:
    """A chain resumed after a saved layer missed the held-out passes of the layers before it: its validation streams
    the checkpoint instead (the same sums as a fresh streamed validation), never reads half-run passes out."""
    from pipeline.validate import streamed_sums

    tokens, heldout = _with_heldout(assets, tmp_path, 2)
    cfg = _cfg(assets).model_copy(update={"resident_checkpoint_every": 1})
    crashed = ResidentShard(assets["model"], tokens, 0, SAMPLES, device="cpu")
    crashed.validate_along(0, 2, HELDOUT_LAYOUT)
    inner = shards_call([crashed])

    def crash_in_the_last_layer(method: str, *args: object) -> list:
        if method == "forward" and args[0] == LAYERS - 1:
            raise RuntimeError("killed")
        return inner(method, *args)

    with pytest.raises(RuntimeError, match="killed"):
        fit_chain(crash_in_the_last_layer, cfg, tmp_path / "fit", LAYERS, progress=False)
    resumed = ResidentShard(assets["model"], tokens, 0, SAMPLES, device="cpu")
    resumed.validate_along(0, 2, HELDOUT_LAYOUT)
    codecs = [f.codec for f in fit_chain(shards_call([resumed]), cfg, tmp_path / "fit", LAYERS, progress=False)]
    ours, _ = resumed.validate(0, 2, codecs, HELDOUT_LAYOUT)
    assert "along_chain" not in ours["seconds"]
    want, _ = streamed_sums(Checkpoint(assets["model"]), torch.from_numpy(heldout).long(), codecs, HELDOUT_LAYOUT)
    for key in ("nll_exact", "nll_aquakv", "count", "cache_bits"):
        assert ours[key] == pytest.approx(want[key], rel=1e-6), key


def test_a_shard_worker_refuses_calls_before_its_shard_is_opened() -> None:
    from aquakv.errors import AquaKVError
    from cluster.workers import ShardWorker

    with pytest.raises(AquaKVError, match=r"timings\(\) before open\(\)"):
        ShardWorker().call("timings")


def test_a_warm_started_shard_fits_what_a_cold_one_does(assets: dict, staged: dict, tmp_path: Path) -> None:
    """A worker opens the checkpoint and loads layer 0 before its shard exists (pipeline.resident.warm_start): the
    shard uses them and fits the same codecs; a warm start for another placement is not used."""
    from pipeline.resident import warm_start

    warm = warm_start(assets["model"], "cpu", "float32")
    shard = ResidentShard(assets["model"], assets["tokens"], 0, SAMPLES, device="cpu", warm=warm)
    assert shard.checkpoint is warm.checkpoint and shard._pending[0] is warm.layer0
    _assert_same(staged[1], fit_chain(shards_call([shard]), _cfg(assets), tmp_path, LAYERS, progress=False),
                 exact=True)
    other = ResidentShard(assets["model"], assets["tokens"], 0, SAMPLES, device="cpu", dtype="bfloat16",
                          warm=warm_start(assets["model"], "cpu", "float32"))
    assert other.checkpoint is not warm.checkpoint and not other._pending
